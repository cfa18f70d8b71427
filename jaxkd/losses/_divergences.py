r"""Divergences between the student's and the teacher's soft targets.

Alternatives to the forward KL of :func:`jaxkd.losses.kl_divergence`: the
mode-seeking reverse KL, the generalized Jensen-Shannon divergence that
interpolates between the two, and the total variation distance. All of them
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
  student_logits, teacher_logits, axis, where, valid = (
      _soft_target.prepare_logit_pair(
          student_logits, teacher_logits, temperature=temperature, axis=axis,
          where=where,
      )
  )
  # The forward KL with the roles swapped: the student is the reference
  # distribution, so its impossible classes contribute exactly zero.
  loss = _soft_target.kl_from_logits(
      student_logits, teacher_logits, temperature, axis
  )
  return v.nan_unless(valid, v.apply_where(loss, where))


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
  beta_valid = v.check_in_unit_interval("beta", beta)
  student_logits, teacher_logits, axis, where, valid = (
      _soft_target.prepare_logit_pair(
          student_logits, teacher_logits, temperature=temperature, axis=axis,
          where=where,
      )
  )
  loss = _jsd_core(
      student_logits, teacher_logits, beta, temperature, normalize, axis
  )
  return v.nan_unless(
      v.all_valid(valid, beta_valid), v.apply_where(loss, where)
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
  beta = jnp.asarray(beta).astype(dtype)
  pair = _log_ratio.logit_pair(
      teacher_logits, student_logits, temperature, axis
  )
  # At beta = 0 or 1 one of log(beta), log(1 - beta) is -inf and its KL term
  # is 0 * (possibly inf): compute with a harmless beta there and return the
  # exact limit instead (double where: no nan in either pass).
  interior = (beta > 0) & (beta < 1)
  safe_beta = jnp.where(interior, beta, jnp.full((), 0.5, dtype))
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


def _kl_to_mixture(
    log_self: Array,
    log_other: Array,
    log_ratio: Array,
    both: Array,
    self_only: Array,
    other_only: Array,
    weights: tuple[Array, Array, Array, Array],
    axis: int,
) -> Array:
  r""":math:`\mathrm{KL}(r \,\|\, m)` for :math:`m = w r + (1 - w) o`.

  ``log_ratio`` is :math:`\log(o / r)` on ``both``; ``log_self`` and
  ``log_other`` are the normalised log-probabilities of :math:`r` and
  :math:`o`. On ``both`` :math:`\log(m / r) = \log(w + (1 - w) e^{g})`;
  where only :math:`r` has mass it is :math:`\log w`. The divergence is the
  centred gap of these log-ratios over :math:`r`'s support plus
  :math:`-\log m(\mathrm{supp}\, r)`, the mixture's mass outside it.
  ``weights`` is ``(w, 1 - w, log w, log(1 - w))``, each formed directly so
  that a tiny ``w`` or ``1 - w`` keeps its precision.
  """
  dtype = log_self.dtype
  zero = jnp.zeros((), dtype)
  weight_self, weight_other, log_w_self, log_w_other = weights
  log_m_over_r = jnp.where(
      both,
      _log_ratio.log_two_point(
          log_ratio, weight_self, weight_other, log_w_self, log_w_other
      ),
      jnp.where(self_only, log_w_self, zero),
  )
  support = both | self_only
  # log m itself, the exponent of each term: for classes where r and o are
  # far apart, log r + log(m / r) would add a large negative and a large
  # positive number, so it is formed as a log-sum of the two parts there.
  safe_self = jnp.where(support, log_self, zero)
  safe_other = jnp.where(both, log_other, zero)
  near = both & (jnp.abs(log_ratio) <= 1)
  log_m = jnp.where(
      near,
      safe_self + log_m_over_r,
      jnp.where(
          both,
          jnp.logaddexp(log_w_self + safe_self, log_w_other + safe_other),
          log_w_self + safe_self,
      ),
  )
  gap, _ = _log_ratio.centered_gap(
      log_self, log_m_over_r, support, axis, log_p_plus_d=log_m
  )
  # m(supp r) = w + (1 - w) O(both) = 1 - (1 - w) O(other only).
  other_out = jnp.exp(_log_ratio.masked_logsumexp(log_other, other_only, axis))
  log_other_in = _log_ratio.masked_logsumexp(log_other, both, axis)
  log_mass = jnp.where(
      other_out < 0.5,
      jnp.log1p(-weight_other * other_out),
      jnp.logaddexp(log_w_self, log_w_other + log_other_in),
  )
  return gap - log_mass


def _generalized_jsd(pair: _log_ratio.LogitPair, beta: Array) -> Array:
  """``beta KL(p_T || m) + (1 - beta) KL(p_S || m)`` for ``0 < beta < 1``."""
  g = _log_ratio.log_ratio(pair)  # log(p_S / p_T) on both
  one_minus = 1 - beta
  log_beta, log_one_minus = jnp.log(beta), jnp.log1p(-beta)
  teacher_term = _kl_to_mixture(
      pair.log_p, pair.log_q, g, pair.both, pair.p_only, pair.q_only,
      (beta, one_minus, log_beta, log_one_minus), pair.axis,
  )
  student_term = _kl_to_mixture(
      pair.log_q, pair.log_p, -g, pair.both, pair.q_only, pair.p_only,
      (one_minus, beta, log_one_minus, log_beta), pair.axis,
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
  student_logits, teacher_logits, axis, where, valid = (
      _soft_target.prepare_logit_pair(
          student_logits, teacher_logits, temperature=temperature, axis=axis,
          where=where,
      )
  )
  loss = _tvd_core(student_logits, teacher_logits, temperature, axis)
  return v.nan_unless(valid, v.apply_where(loss, where))


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


def _check_skew(alpha: ArrayLike) -> Any:
  return v.check_in_unit_interval("alpha", alpha)


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
  alpha_valid = _check_skew(alpha)
  student_logits, teacher_logits, axis, where, valid = (
      _soft_target.prepare_logit_pair(
          student_logits, teacher_logits, temperature=temperature, axis=axis,
          where=where,
      )
  )
  loss = _skew_core(
      student_logits, teacher_logits, alpha, temperature, reverse, axis
  )
  return v.nan_unless(
      v.all_valid(valid, alpha_valid), v.apply_where(loss, where)
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
  alpha = jnp.asarray(alpha).astype(dtype)
  pair = _log_ratio.logit_pair(
      teacher_logits, student_logits, temperature, axis
  )
  interior = (alpha > 0) & (alpha < 1)
  safe = jnp.where(interior, alpha, jnp.full((), 0.5, dtype))
  weights = (safe, 1 - safe, jnp.log(safe), jnp.log1p(-safe))
  g = _log_ratio.log_ratio(pair)  # log(p_S / p_T) on both
  if reverse:
    skew = _kl_to_mixture(
        pair.log_q, pair.log_p, -g, pair.both, pair.q_only, pair.p_only,
        weights, axis,
    )
    plain = _log_ratio.reverse_kl(pair)
  else:
    skew = _kl_to_mixture(
        pair.log_p, pair.log_q, g, pair.both, pair.p_only, pair.q_only,
        weights, axis,
    )
    plain = _log_ratio.forward_kl(pair)
  loss = jnp.where(
      interior, skew, jnp.where(alpha == 0, plain, jnp.zeros((), dtype))
  )
  return v.nan_where_nan(loss, student_logits, teacher_logits, axis=axis)
