"""Divergences between the student's and the teacher's soft targets.

Alternatives to the forward KL of :func:`jaxkd.losses.kl_divergence`: the
mode-seeking reverse KL, the generalized Jensen-Shannon divergence that
interpolates between the two, and the total variation distance. All of them
take raw logits and form probabilities in log space
(``log_softmax(z / T)``); none applies a :math:`T^2` factor.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxkd.losses import _soft_target
from jaxkd.losses import _validation as v

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
  student_logits, teacher_logits, axis, where = _soft_target.prepare_logit_pair(
      student_logits, teacher_logits, temperature=temperature, axis=axis,
      where=where,
  )
  log_p_teacher = _soft_target.scaled_log_softmax(
      teacher_logits, temperature, axis
  )
  log_p_student = _soft_target.scaled_log_softmax(
      student_logits, temperature, axis
  )
  # The forward KL with the arguments swapped; its 0 log 0 = 0 handling now
  # applies to the student's impossible classes.
  loss = _soft_target.kl_from_log_probs(log_p_student, log_p_teacher, axis)
  return v.apply_where(loss, where)


def jensen_shannon_divergence(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    beta: ArrayLike = 0.5,
    temperature: ArrayLike = 1.0,
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
  - (1 - \beta) \log (1 - \beta)`.

  At ``beta`` exactly 0 or 1 the divergence is exactly 0 (the mixture equals
  one of the two distributions, whose own KL term is 0, and the other term
  has weight 0), with zero gradient. Near the endpoints it is a scaled
  forward or reverse KL:

  .. math::
    \lim_{\beta \to 0} \mathrm{JSD}_\beta / \beta
    = \mathrm{KL}(p^T \,\|\, p^S), \qquad
    \lim_{\beta \to 1} \mathrm{JSD}_\beta / (1 - \beta)
    = \mathrm{KL}(p^S \,\|\, p^T).

  So ``beta`` near 0 or 1 chooses the direction of the KL and also shrinks
  the loss by the factor ``beta`` or ``1 - beta``. Some implementations
  return the pure KLs at the endpoints instead; to train with those, call
  :func:`kl_divergence` or :func:`reverse_kl_divergence`. No :math:`T^2`
  factor is applied.

  Args:
    student_logits: Floating logits of shape ``[..., num_classes]``.
    teacher_logits: Floating logits of the same shape.
    beta: Scalar weight :math:`\beta \in [0, 1]` of the teacher. Checked when
      it is known at trace time; a traced value outside ``[0, 1]`` gives
      ``nan``.
    temperature: Softmax temperature :math:`T > 0` applied to both.
    axis: The class axis.
    where: Optional boolean mask broadcastable to the per-example shape
      ``[...]``; masked-out examples give 0 and no gradient.

  Returns:
    The per-example divergence, shape ``[...]`` (the input shape without
    ``axis``); float32 for bfloat16 and float16 inputs. It is finite
    whenever each row holds at least one finite logit, ``-inf`` ones
    included.

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

  References:
    Agarwal, Vieillard, Zhou, Stanczyk, Ramos Garea, Geist and Bachem,
    `On-Policy Distillation of Language Models: Learning from Self-Generated
    Mistakes <https://arxiv.org/abs/2306.13649>`_, 2024.

    Lin, `Divergence Measures Based on the Shannon Entropy
    <https://doi.org/10.1109/18.61115>`_, 1991.

  .. seealso:: :func:`kl_divergence`, :func:`reverse_kl_divergence`.

  .. versionadded:: 0.1.0
  """
  v.check_in_unit_interval("beta", beta)
  student_logits, teacher_logits, axis, where = _soft_target.prepare_logit_pair(
      student_logits, teacher_logits, temperature=temperature, axis=axis,
      where=where,
  )
  log_p_teacher = _soft_target.scaled_log_softmax(
      teacher_logits, temperature, axis
  )
  log_p_student = _soft_target.scaled_log_softmax(
      student_logits, temperature, axis
  )
  dtype = log_p_teacher.dtype
  beta = jnp.asarray(beta).astype(dtype)
  # At beta = 0 or 1 one of log(beta), log(1 - beta) is -inf and its KL term
  # is 0 * (possibly inf): compute with a harmless beta there and return the
  # exact limit 0 instead (double where: no nan in either pass).
  interior = (beta > 0) & (beta < 1)
  safe_beta = jnp.where(interior, beta, jnp.full((), 0.5, dtype))
  # log m by logaddexp, never log(beta p_T + (1 - beta) p_S); log1p keeps
  # log(1 - beta) accurate for small beta.
  log_weighted_teacher = jnp.log(safe_beta) + log_p_teacher
  log_weighted_student = jnp.log1p(-safe_beta) + log_p_student
  # A class impossible for both has m = 0 and contributes 0 to both KL terms;
  # logaddexp(-inf, -inf) has a nan gradient, so feed it zeros there.
  neither = (log_p_teacher == -jnp.inf) & (log_p_student == -jnp.inf)
  zero = jnp.zeros((), dtype)
  log_mixture = jnp.where(
      neither,
      jnp.full((), -jnp.inf, dtype),
      jnp.logaddexp(
          jnp.where(neither, zero, log_weighted_teacher),
          jnp.where(neither, zero, log_weighted_student),
      ),
  )
  loss = safe_beta * _soft_target.kl_from_log_probs(
      log_p_teacher, log_mixture, axis
  ) + (1 - safe_beta) * _soft_target.kl_from_log_probs(
      log_p_student, log_mixture, axis
  )
  # Unlike the KL, equal inputs do not give an exact 0 here: log m only
  # equals log p up to rounding, so the result can be a few ulps below 0.
  loss = jnp.where(interior, loss, jnp.zeros((), loss.dtype))
  return v.apply_where(loss, where)


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
  student_logits, teacher_logits, axis, where = _soft_target.prepare_logit_pair(
      student_logits, teacher_logits, temperature=temperature, axis=axis,
      where=where,
  )
  p_teacher = jnp.exp(
      _soft_target.scaled_log_softmax(teacher_logits, temperature, axis)
  )
  p_student = jnp.exp(
      _soft_target.scaled_log_softmax(student_logits, temperature, axis)
  )
  loss = 0.5 * jnp.sum(jnp.abs(p_teacher - p_student), axis=axis)
  return v.apply_where(loss, where)
