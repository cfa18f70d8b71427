r"""The skew KL divergences of DistiLLM: one side against a two-sided mix.

:func:`skew_kl_divergence` compares the teacher with
:math:`\alpha p^T + (1 - \alpha) p^S`, :func:`skew_reverse_kl_divergence`
the student with :math:`\alpha p^S + (1 - \alpha) p^T`; both are the KL to
a mixture of :mod:`jaxkd.losses._mixture`, computed from the logit
difference like the other divergences (accurate in float32 at any
temperature).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxkd.losses import _log_ratio
from jaxkd.losses import _mixture
from jaxkd.losses import _soft_target
from jaxkd.losses import validation as v

Array = jax.Array
ArrayLike = Any


def skew_kl_divergence(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    alpha: ArrayLike = 0.1,
    temperature: ArrayLike = 1.0,
    axis: int = -1,
    where: ArrayLike | None = None,
) -> Array:
  r"""Skew KL divergence of DistiLLM: the teacher against a teacher-student mix.

  .. math::
    \mathrm{SKL}_\alpha = \mathrm{KL}\big(p^T \,\big\|\,
    \alpha\, p^T + (1 - \alpha)\, p^S\big),
    \quad p = \mathrm{softmax}(z / T)

  ``alpha = 0`` is the forward KL :math:`\mathrm{KL}(p^T \| p^S)` of
  :func:`kl_divergence` (returned exactly), ``alpha = 1`` is 0. Mixing in
  the teacher bounds the divergence by :math:`-\log \alpha` and keeps its
  gradient finite where the student gives a class almost no mass, which
  stabilises early training of language-model students. The log of the
  mixture is a ``logaddexp`` of the weighted log-probabilities, and the
  divergence is computed from the logit difference (accurate in float32 at
  any temperature).

  This is the true KL. distillm's ``skewed_forward_kl`` returns the
  cross-entropy :math:`-\sum_c p^T_c \log m_c`, that is this value plus the
  teacher's entropy :math:`H(p^T)` (a constant for a frozen teacher, so the
  same gradient); its ``lam`` is ``alpha`` here. No :math:`T^2` factor is
  applied.

  Args:
    student_logits: Floating logits of shape ``[..., num_classes]`` (for a
      language model ``[..., vocab]``, one distribution per token).
    teacher_logits: Floating logits of the same shape.
    alpha: Weight :math:`\alpha \in [0, 1]` of the teacher in the mixture
      (DistiLLM uses 0.1). A traced value outside ``[0, 1]`` gives ``nan``.
    temperature: Softmax temperature :math:`T > 0` applied to both.
    axis: The class axis.
    where: Optional boolean mask broadcastable to the per-example shape
      ``[...]`` (a token mask); masked-out examples give 0 and no gradient.

  Returns:
    The per-example divergence, shape ``[...]``; float32 for bfloat16 and
    float16 inputs. Finite for ``alpha > 0`` whenever each row holds a finite
    logit.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses
    >>> student = jnp.array([[0.0, -jnp.inf], [0.0, 0.0]])
    >>> teacher = jnp.array([[-jnp.inf, 0.0], [0.0, 2.0]])
    >>> print(losses.skew_kl_divergence(student, teacher).round(4))
    [2.3026 0.2726]

  References:
    Ko, Kim, Chen and Yun, `DistiLLM: Towards Streamlined Distillation for
    Large Language Models <https://arxiv.org/abs/2402.03898>`_, 2024.

  .. seealso:: :func:`skew_reverse_kl_divergence`, :func:`kl_divergence`.

  .. versionadded:: 0.1.0
  """
  return _skew(
      student_logits, teacher_logits, alpha=alpha, temperature=temperature,
      axis=axis, where=where, reverse=False,
  )


def skew_reverse_kl_divergence(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    alpha: ArrayLike = 0.1,
    temperature: ArrayLike = 1.0,
    axis: int = -1,
    where: ArrayLike | None = None,
) -> Array:
  r"""Skew reverse KL of DistiLLM: the student against a student-teacher mix.

  .. math::
    \mathrm{SRKL}_\alpha = \mathrm{KL}\big(p^S \,\big\|\,
    \alpha\, p^S + (1 - \alpha)\, p^T\big),
    \quad p = \mathrm{softmax}(z / T)

  ``alpha = 0`` is the reverse KL :math:`\mathrm{KL}(p^S \| p^T)` of
  :func:`reverse_kl_divergence` (returned exactly), ``alpha = 1`` is 0; the
  divergence is at most :math:`-\log \alpha`. It equals distillm's
  ``skewed_reverse_kl`` (which, unlike its forward counterpart, is a true KL)
  with ``lam = alpha``. Computed like :func:`skew_kl_divergence`; no
  :math:`T^2` factor is applied.

  Args:
    student_logits: Floating logits of shape ``[..., num_classes]``.
    teacher_logits: Floating logits of the same shape.
    alpha: Weight :math:`\alpha \in [0, 1]` of the student in the mixture.
      A traced value outside ``[0, 1]`` gives ``nan``.
    temperature: Softmax temperature :math:`T > 0` applied to both.
    axis: The class axis.
    where: Optional boolean mask broadcastable to the per-example shape
      ``[...]``; masked-out examples give 0 and no gradient.

  Returns:
    The per-example divergence, shape ``[...]``; float32 for bfloat16 and
    float16 inputs.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses
    >>> student = jnp.array([[0.0, -jnp.inf], [0.0, 0.0]])
    >>> teacher = jnp.array([[-jnp.inf, 0.0], [0.0, 2.0]])
    >>> print(losses.skew_reverse_kl_divergence(student, teacher).round(4))
    [2.3026 0.3173]

  References:
    Ko, Kim, Chen and Yun, `DistiLLM: Towards Streamlined Distillation for
    Large Language Models <https://arxiv.org/abs/2402.03898>`_, 2024.

  .. seealso:: :func:`skew_kl_divergence`, :func:`reverse_kl_divergence`.

  .. versionadded:: 0.1.0
  """
  return _skew(
      student_logits, teacher_logits, alpha=alpha, temperature=temperature,
      axis=axis, where=where, reverse=True,
  )


def _skew(student_logits, teacher_logits, *, alpha, temperature, axis, where,
          reverse):
  return _soft_target.logit_pair_loss(
      lambda student, teacher, axis, _: _skew_core(
          student, teacher, alpha, temperature, reverse, axis
      ),
      student_logits, teacher_logits, temperature=temperature, axis=axis,
      where=where, checks=(v.check_in_unit_interval("alpha", alpha),),
  )


@functools.partial(jax.jit, static_argnames=("reverse", "axis"))
def _skew_core(
    student_logits: Array,
    teacher_logits: Array,
    alpha: ArrayLike,
    temperature: ArrayLike,
    reverse: bool,
    axis: int,
) -> Array:
  dtype = student_logits.dtype
  pair, alpha, interior, safe = _mixture.weighted_pair(
      student_logits, teacher_logits, alpha, temperature, axis
  )
  skew = _mixture.kl_to_mixture(
      pair, _mixture.mixture_weights(safe), of_student=reverse
  )
  plain = _log_ratio.reverse_kl(pair) if reverse else _log_ratio.forward_kl(
      pair
  )
  loss = jnp.where(
      interior, skew, jnp.where(alpha == 0, plain, jnp.zeros((), dtype))
  )
  return v.nan_where_nan(loss, student_logits, teacher_logits, axis=axis)
