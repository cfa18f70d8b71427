r"""Divergences between the student's and the teacher's soft targets.

Alternatives to the forward KL of :func:`jaxkd.losses.kl_divergence`: the
mode-seeking reverse KL, the generalized Jensen-Shannon divergence that
interpolates between the two (its KL-to-a-mixture step, shared with the
skew KLs of :mod:`jaxkd.losses._skew`, is :mod:`jaxkd.losses._mixture`),
and the total variation distance. All of them
take raw logits and form probabilities in log space
(``log_softmax(z / T)``); none applies a :math:`T^2` factor.

Each is computed from the logit difference of the two models
(:mod:`jaxkd.losses._log_ratio`): the log-ratio :math:`\log(p^S / p^T)` of
every class keeps the relative precision of the logit difference, so the
divergences stay accurate in float32 at temperatures up to :math:`10^4`,
where they are of order :math:`1 / T^2`.
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


def reverse_kl_divergence(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperature: ArrayLike = 1.0,
    axis: int = -1,
    where: ArrayLike | None = None,
) -> Array:
  r"""Reverse KL divergence: the student's soft targets against the teacher's.

  .. math::
    \mathrm{KL}(p^S \,\|\, p^T) = \sum_c p^S_c (\log p^S_c - \log p^T_c),
    \quad p = \mathrm{softmax}(z / T)

  Unlike the forward KL of :func:`kl_divergence`, which makes the student
  cover every mode of the teacher, the reverse KL is mode-seeking: it
  penalizes the student for putting mass where the teacher has little, and
  lets it ignore some of the teacher's modes. MiniLLM uses it to distill
  language models, whose output distributions have many modes.

  Classes whose student logit is ``-inf`` contribute exactly zero. A class
  with a ``-inf`` teacher logit and a finite student logit gives ``inf``.

  Args:
    student_logits: Floating logits of shape ``[..., num_classes]``.
    teacher_logits: Floating logits of the same shape.
    temperature: Softmax temperature :math:`T > 0` applied to both.
    axis: The class axis.
    where: Optional boolean mask broadcastable to the per-example shape
      ``[...]``; masked-out examples give 0 and no gradient.

  Returns:
    The per-example divergence, shape ``[...]`` (the input shape without
    ``axis``); float32 for bfloat16 and float16 inputs.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses
    >>> student = jnp.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    >>> teacher = jnp.array([[1.0, 2.0, 4.0], [0.0, 0.0, 0.0]])
    >>> print(losses.reverse_kl_divergence(student, teacher).round(4))
    [0.097 0.   ]

  References:
    Gu, Dong, Wei and Huang, `MiniLLM: Knowledge Distillation of Large
    Language Models <https://arxiv.org/abs/2306.08543>`_, 2024.

  .. seealso:: :func:`kl_divergence`, :func:`jensen_shannon_divergence`.

  .. versionadded:: 0.1.0
  """
  # The forward KL with the roles swapped: the student is the reference
  # distribution, so its impossible classes contribute exactly zero.
  return _soft_target.logit_pair_loss(
      lambda student, teacher, axis, _: _soft_target.kl_from_logits(
          student, teacher, temperature, axis
      ),
      student_logits, teacher_logits, temperature=temperature, axis=axis,
      where=where,
  )


def jensen_shannon_divergence(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    beta: ArrayLike = 0.5,
    temperature: ArrayLike = 1.0,
    normalize: bool = False,
    axis: int = -1,
    where: ArrayLike | None = None,
) -> Array:
  r"""Generalized Jensen-Shannon divergence of GKD, weighted by ``beta``.

  .. math::
    m = \beta\, p^T + (1 - \beta)\, p^S, \qquad
    \mathrm{JSD}_\beta = \beta\, \mathrm{KL}(p^T \,\|\, m)
    + (1 - \beta)\, \mathrm{KL}(p^S \,\|\, m),
    \quad p = \mathrm{softmax}(z / T)

  ``beta`` weights the teacher, both in the mixture :math:`m` and in front of
  the teacher's KL term; this is the convention of GKD, whose
  :math:`D_{JSD(\beta)}(P \| Q)` has :math:`P` the teacher and :math:`Q` the
  student. ``beta = 0.5`` gives the usual symmetric Jensen-Shannon
  divergence, bounded by :math:`\log 2`; in general
  :math:`0 \le \mathrm{JSD}_\beta \le -\beta \log \beta
  - (1 - \beta) \log (1 - \beta)`. :math:`\log m` is a ``logaddexp`` of the
  weighted log-probabilities (never the log of a probability mixture), and
  the divergence is computed from the logit difference, so it is accurate in
  float32 at any temperature.

  Near the endpoints it is a scaled forward or reverse KL:

  .. math::
    \lim_{\beta \to 0} \frac{\mathrm{JSD}_\beta}{\beta (1 - \beta)}
    = \mathrm{KL}(p^T \,\|\, p^S), \qquad
    \lim_{\beta \to 1} \frac{\mathrm{JSD}_\beta}{\beta (1 - \beta)}
    = \mathrm{KL}(p^S \,\|\, p^T).

  With ``normalize=False`` (the default) the value is :math:`\mathrm{JSD}_\beta`
  itself, exactly 0 (with zero gradient) at ``beta`` 0 and 1, where the
  mixture equals one of the two distributions. With ``normalize=True`` it is
  :math:`\mathrm{JSD}_\beta / (\beta (1 - \beta))`, continuous on
  :math:`[0, 1]`: the forward KL at ``beta = 0`` and the reverse KL at
  ``beta = 1`` (returned exactly there), as TRL's and Liger's endpoint
  special cases do, but without their jump. No :math:`T^2` factor is
  applied.

  Other conventions and how to convert them to ``beta`` here:

  ======================================  ==============================
  Library (argument)                      ``beta`` here
  ======================================  ==============================
  TRL ``GKDTrainer`` / ``beta`` (since    ``beta`` (teacher weight; the
  PR #3043, 2025)                         endpoints 0 / 1 are the forward
                                          / reverse KL: ``normalize=True``
                                          matches them there)
  Liger ``LigerJSD(beta)``,               ``beta`` (``log_p``, the target,
  ``LigerFusedLinearJSDLoss(jsd_beta)``   is the teacher)
  distillm ``js_distance(lam)``           ``1 - lam`` (``lam`` weights the
                                          student)
  ======================================  ==============================

  Earlier TRL releases formed the mixture with ``beta`` on the student; check
  the version before converting.

  Args:
    student_logits: Floating logits of shape ``[..., num_classes]`` (for a
      language model ``[..., vocab]``, one distribution per token).
    teacher_logits: Floating logits of the same shape.
    beta: Scalar weight :math:`\beta \in [0, 1]` of the teacher. Checked when
      it is known at trace time; a traced value outside ``[0, 1]`` gives
      ``nan``.
    temperature: Softmax temperature :math:`T > 0` applied to both.
    normalize: Divide by :math:`\beta (1 - \beta)` (a Python bool).
    axis: The class axis.
    where: Optional boolean mask broadcastable to the per-example shape
      ``[...]`` (a token mask); masked-out examples give 0 and no gradient.

  Returns:
    The per-example divergence, shape ``[...]`` (the input shape without
    ``axis``); float32 for bfloat16 and float16 inputs. With
    ``normalize=False`` it is finite whenever each row holds at least one
    finite logit, ``-inf`` ones included.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses
    >>> student = jnp.array([[0.0, -jnp.inf], [0.0, 0.0]])
    >>> teacher = jnp.array([[-jnp.inf, 0.0], [0.0, 2.0]])
    >>> print(losses.jensen_shannon_divergence(student, teacher).round(4))
    [0.6931 0.0895]
    >>> jsd = losses.jensen_shannon_divergence(student, teacher, beta=0.1)
    >>> print(jsd.round(4))
    [0.3251 0.0299]
    >>> forward = losses.jensen_shannon_divergence(
    ...     student[1:], teacher[1:], beta=0.0, normalize=True)
    >>> kl = losses.kl_divergence(student[1:], teacher[1:])
    >>> print(forward.round(4), kl.round(4))
    [0.3278] [0.3278]

  References:
    Agarwal, Vieillard, Zhou, Stanczyk, Ramos Garea, Geist and Bachem,
    `On-Policy Distillation of Language Models: Learning from Self-Generated
    Mistakes <https://arxiv.org/abs/2306.13649>`_, 2024.

    Lin, `Divergence Measures Based on the Shannon Entropy
    <https://doi.org/10.1109/18.61115>`_, 1991.

  .. seealso:: :func:`kl_divergence`, :func:`reverse_kl_divergence`,
    :func:`skew_kl_divergence`.

  .. versionadded:: 0.1.0
  """
  if not isinstance(normalize, bool):
    raise TypeError(f"`normalize` must be a bool, got {normalize!r}.")
  return _soft_target.logit_pair_loss(
      lambda student, teacher, axis, _: _jsd_core(
          student, teacher, beta, temperature, normalize, axis
      ),
      student_logits, teacher_logits, temperature=temperature, axis=axis,
      where=where, checks=(v.check_in_unit_interval("beta", beta),),
  )


# The numerical cores are jitted (the checks stay outside): an eager call
# compiles one program per shape instead of dispatching each operation.
@functools.partial(jax.jit, static_argnames=("normalize", "axis"))
def _jsd_core(
    student_logits: Array,
    teacher_logits: Array,
    beta: ArrayLike,
    temperature: ArrayLike,
    normalize: bool,
    axis: int,
) -> Array:
  dtype = student_logits.dtype
  pair, beta, interior, safe_beta = _mixture.weighted_pair(
      student_logits, teacher_logits, beta, temperature, axis
  )
  loss = _generalized_jsd(pair, safe_beta)
  if normalize:
    loss = loss / (safe_beta * (1 - safe_beta))
    forward = _log_ratio.forward_kl(pair)
    reverse = _log_ratio.reverse_kl(pair)
    endpoint = jnp.where(beta == 0, forward, reverse)
  else:
    endpoint = jnp.zeros((), dtype)
  loss = jnp.where(interior, loss, endpoint)
  return v.nan_where_nan(loss, student_logits, teacher_logits, axis=axis)


def _generalized_jsd(pair: _log_ratio.LogitPair, beta: Array) -> Array:
  """``beta KL(p_T || m) + (1 - beta) KL(p_S || m)`` for ``0 < beta < 1``."""
  weights = _mixture.mixture_weights(beta)
  teacher_term = _mixture.kl_to_mixture(pair, weights, of_student=False)
  student_term = _mixture.kl_to_mixture(
      pair, _mixture.swapped(weights), of_student=True
  )
  return beta * teacher_term + (1 - beta) * student_term


def total_variation_distance(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperature: ArrayLike = 1.0,
    axis: int = -1,
    where: ArrayLike | None = None,
) -> Array:
  r"""Total variation distance between the two soft-target distributions.

  .. math::
    \mathrm{TV}(p^T, p^S) = \frac{1}{2} \sum_c \left| p^T_c - p^S_c \right|,
    \quad p = \mathrm{softmax}(z / T)

  A symmetric distance in :math:`[0, 1]`; it is the largest difference in
  the probability that the two distributions give to any set of classes.
  Each probability is ``exp(log_softmax(z / T))``.

  Where :math:`p^T_c = p^S_c` exactly, the gradient uses the derivative that
  ``jnp.abs`` defines at 0 (a valid subgradient); at identical distributions
  the gradient with respect to the logits is 0 up to rounding.

  Args:
    student_logits: Floating logits of shape ``[..., num_classes]``.
    teacher_logits: Floating logits of the same shape.
    temperature: Softmax temperature :math:`T > 0` applied to both.
    axis: The class axis.
    where: Optional boolean mask broadcastable to the per-example shape
      ``[...]``; masked-out examples give 0 and no gradient.

  Returns:
    The per-example distance, shape ``[...]`` (the input shape without
    ``axis``); float32 for bfloat16 and float16 inputs.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses
    >>> student = jnp.array([[0.0, 0.0], [0.0, -jnp.inf]])
    >>> teacher = jnp.array([[0.0, 0.0], [-jnp.inf, 0.0]])
    >>> print(losses.total_variation_distance(student, teacher).round(4))
    [0. 1.]

  References:
    Wen, Li, Du and Mou, `f-Divergence Minimization for Sequence-Level
    Knowledge Distillation <https://arxiv.org/abs/2307.15190>`_, 2023.

  .. versionadded:: 0.1.0
  """
  return _soft_target.logit_pair_loss(
      lambda student, teacher, axis, _: _tvd_core(
          student, teacher, temperature, axis
      ),
      student_logits, teacher_logits, temperature=temperature, axis=axis,
      where=where,
  )


@functools.partial(jax.jit, static_argnames=("axis",))
def _tvd_core(
    student_logits: Array,
    teacher_logits: Array,
    temperature: ArrayLike,
    axis: int,
) -> Array:
  pair = _log_ratio.logit_pair(
      teacher_logits, student_logits, temperature, axis
  )
  zero = jnp.zeros((), student_logits.dtype)
  g = _log_ratio.log_ratio(pair)  # log(p_S / p_T) on both
  p_teacher = jnp.exp(pair.log_p)
  p_student = jnp.exp(pair.log_q)
  # |p_T - p_S| = p_T |expm1(g)| from the log-ratio (no cancellation when
  # the two are close), written on the larger side so nothing overflows.
  student_larger = g > 0
  g_pos = jnp.where(student_larger, g, zero)
  g_neg = jnp.where(student_larger, zero, g)
  gaps = jnp.where(
      student_larger,
      -p_student * jnp.expm1(-g_pos),
      -p_teacher * jnp.expm1(g_neg),
  )
  gaps = jnp.where(pair.both, gaps, zero)
  gaps = gaps + jnp.where(pair.p_only, p_teacher, zero)
  gaps = gaps + jnp.where(pair.q_only, p_student, zero)
  loss = 0.5 * jnp.sum(gaps, axis=axis)
  return v.nan_where_nan(loss, student_logits, teacher_logits, axis=axis)
