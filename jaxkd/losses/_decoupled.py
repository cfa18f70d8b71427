"""Decoupled knowledge distillation (Zhao et al., 2022).

DKD splits the Hinton KD loss into a target-class term (TCKD: how confident
each model is in the labelled class) and a non-target term (NCKD: how each
model spreads the remaining mass over the other classes) and weights the two
independently. Everything is computed from logits in log space, so the loss
and its gradient stay finite when either model is arbitrarily confident.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.losses import _log_ratio
from jaxkd.losses import _soft_target
from jaxkd.losses import validation as v

Array = jax.Array
ArrayLike = Any


def _target_indices(
    labels: ArrayLike,
    logits: Array,
    axis: int,
    where: Array | None,
) -> Array:
  """Checks ``labels`` and returns integer targets of the per-example shape.

  Index labels of the per-example shape are used as they are; labels of the
  logits' shape (one-hot or soft) are reduced to their argmax along ``axis``.
  Targets of rows masked out by ``where`` are replaced by 0, so padded rows
  may carry any label (for example -1).
  """
  # Read the concrete value first: under jit, jnp.asarray of a constant may
  # already be a tracer.
  concrete = v.concrete_value(labels)
  labels = jnp.asarray(labels)
  num_classes = logits.shape[axis]
  per_example_shape = tuple(
      d for i, d in enumerate(logits.shape) if i != axis
  )
  if labels.shape == logits.shape:
    # One-hot or soft labels: the target is the most probable class (the
    # first one on ties).
    if not (
        jnp.issubdtype(labels.dtype, jnp.number)
        or labels.dtype == jnp.bool_
    ):
      raise TypeError(
          "`labels` of the logits' shape must be numeric (one-hot or soft"
          f" labels), got dtype {labels.dtype}."
      )
    return jnp.argmax(labels, axis=axis).astype(jnp.int32)
  if labels.shape != per_example_shape:
    raise ValueError(
        f"`labels` must have the per-example shape {per_example_shape}"
        " (integer class indices) or the logits' shape"
        f" {tuple(logits.shape)} (one-hot labels), got shape"
        f" {tuple(labels.shape)}."
    )
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(
        "`labels` of the per-example shape must be integer class indices,"
        f" got dtype {labels.dtype}. Pass one-hot labels of the logits' shape"
        " or cast the indices to an integer dtype."
    )
  concrete_where = None if where is None else v.concrete_value(where)
  if concrete is not None and (where is None or concrete_where is not None):
    checked = concrete if where is None else concrete[concrete_where]
    bad = (checked < 0) | (checked >= num_classes)
    if np.any(bad):
      raise ValueError(
          f"`labels` must lie in [0, {num_classes}) (the number of classes),"
          f" got {checked[bad].ravel()[:5].tolist()}."
      )
  if where is not None:
    labels = jnp.where(where, labels, jnp.zeros((), labels.dtype))
  return labels.astype(jnp.int32)


def _binary_log_probs(target_margin: Array) -> Array:
  """``[log p_t, log(1 - p_t)]`` stacked on a new last axis.

  With ``d = z_t / T - logsumexp_{k != t}(z_k / T)`` the target probability is
  exactly ``sigmoid(d)``, so ``log p_t = log_sigmoid(d)`` and
  ``log(1 - p_t) = log_sigmoid(-d)``. This is the same as
  ``log_softmax`` at the target and ``logsumexp(non-target) - logsumexp(all)``
  but keeps relative precision when ``p_t`` is close to 0 or 1, where the
  difference of two large log-normalisers would cancel. ``1 - p`` is never
  formed.
  """
  return jnp.stack(
      [
          jax.nn.log_sigmoid(target_margin),
          jax.nn.log_sigmoid(-target_margin),
      ],
      axis=-1,
  )


def _binary_log_ratios(
    margin_difference: Array, log_teacher: Array, log_student: Array
) -> Array:
  """``log b^S - log b^T`` for the binary (target, rest) distributions.

  With ``x`` the teacher's margin and ``D`` the student's minus it,
  ``log sigmoid(x + D) - log sigmoid(x) = -log1p(sigmoid(-x) expm1(-D))`` and
  ``log sigmoid(-x - D) - log sigmoid(-x) = -log1p(sigmoid(x) expm1(D))``:
  accurate for small ``D`` (a high temperature), where subtracting the two
  ``log_sigmoid`` values would leave rounding noise. For ``|D| > 1`` (or
  infinite margins) the plain difference is accurate and used instead.
  """
  dtype = log_teacher.dtype
  zero = jnp.zeros((), dtype)
  near = jnp.abs(margin_difference) <= 1
  diff = jnp.where(near, margin_difference, zero)
  p_target = jnp.exp(log_teacher[..., 0])
  p_rest = jnp.exp(log_teacher[..., 1])
  accurate = jnp.stack(
      [
          -jnp.log1p(p_rest * jnp.expm1(-diff)),
          -jnp.log1p(p_target * jnp.expm1(diff)),
      ],
      axis=-1,
  )
  both = _log_ratio.supported(log_teacher) & _log_ratio.supported(
      log_student
  )
  plain = jnp.where(both, log_student, zero) - jnp.where(
      both, log_teacher, zero
  )
  return jnp.where(near[..., None], accurate, plain)


def dkd_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    labels: ArrayLike,
    *,
    alpha: ArrayLike = 1.0,
    beta: ArrayLike = 8.0,
    temperature: ArrayLike = 4.0,
    axis: int = -1,
    where: ArrayLike | None = None,
) -> Array:
  r"""Decoupled knowledge distillation: weighted target and non-target KD.

  With :math:`p = \mathrm{softmax}(z / T)` and target class :math:`t`, the
  binary distribution :math:`b = [p_t, 1 - p_t]` and the distribution over
  the non-target classes :math:`\hat p_c = p_c / (1 - p_t)`, :math:`c \ne t`:

  .. math::
    \mathrm{TCKD} = \mathrm{KL}(b^T \,\|\, b^S), \qquad
    \mathrm{NCKD} = \mathrm{KL}(\hat p^T \,\|\, \hat p^S),

    \mathcal{L}_{DKD} = T^2 \, (\alpha \, \mathrm{TCKD}
    + \beta \, \mathrm{NCKD}).

  The Hinton loss is the special case
  :math:`\mathrm{KL}(p^T \| p^S) = \mathrm{TCKD} + (1 - p^T_t)\,
  \mathrm{NCKD}`: plain KD weights the non-target term by the teacher's
  non-target mass, which a confident teacher makes small; DKD sets the weight
  :math:`\beta` freely.

  Numerics: :math:`\log p_t` and :math:`\log(1 - p_t)` both come from the
  margin :math:`d = z_t / T - \operatorname{logsumexp}_{k \ne t} z_k / T`
  (:math:`\log p_t = \log\sigma(d)`, :math:`\log(1-p_t) = \log\sigma(-d)`),
  and :math:`\hat p` is the ``log_softmax`` of the logits with the target
  replaced by :math:`-\infty`. The loss and its gradient are therefore finite
  at target-logit gaps of :math:`10^4` and when both models are confident, in
  float32 and bfloat16. Both KL terms are computed from the logit difference
  of the two models (and the binary one from the difference of their
  margins), so the loss stays within 1e-3 of float64 from :math:`T = 10^{-3}`
  to :math:`10^4`, where the difference of two log-softmaxes times
  :math:`T^2` would be rounding noise. The reference PyTorch implementation (mdistiller)
  takes ``log`` of the binary probabilities after a softmax, which gives
  ``log 0`` and an inf/NaN loss there, and masks the target by subtracting
  1000 from its logit, which is not exact once the logit gap divided by
  :math:`T` approaches 1000.

  mdistiller averages this per-example value over the batch and multiplies by
  :math:`T^2` in the same way; here the caller takes the ``.mean()``. DKD's
  warm-up (the loss weight ramped linearly from 0 over the first 20 epochs)
  is a schedule and belongs to :mod:`jaxkd.schedules`, not to this function.

  Args:
    student_logits: Floating logits of shape ``[..., num_classes]`` (class
      axis ``axis``), with ``num_classes >= 2``.
    teacher_logits: Floating logits of the same shape.
    labels: The target class: integer indices of the per-example shape
      ``[...]`` (the logits' shape without ``axis``), or one-hot or soft
      labels of the logits' shape, whose argmax along ``axis`` is the target
      (the first maximum on ties). Index labels outside ``[0, num_classes)``
      raise ``ValueError`` when they are concrete; traced ones cannot be
      checked and give ``nan`` for that example (zero gradient). Labels of
      rows masked out by ``where`` are ignored.
    alpha: Weight :math:`\alpha \ge 0` of the target-class term.
    beta: Weight :math:`\beta \ge 0` of the non-target term (8.0 is the
      paper's CIFAR-100 setting).
    temperature: Softmax temperature :math:`T > 0` applied to both models.
    axis: The class axis.
    where: Optional boolean mask broadcastable to the per-example shape;
      masked-out examples give 0 and no gradient.

  Returns:
    The per-example loss, shape ``[...]``; float32 for bfloat16 and float16
    inputs.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses
    >>> student = jnp.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    >>> teacher = jnp.array([[4.0, 1.0, 0.5], [1.0, 5.0, 0.0]])
    >>> labels = jnp.array([0, 1])
    >>> loss = losses.dkd_loss(student, teacher, labels, temperature=2.0)
    >>> print(loss.round(4))
    [0.6063 4.2749]
    >>> confident = jnp.array([[1e4, 0.0, 0.0]])
    >>> print(losses.dkd_loss(confident, confident, jnp.array([0])))
    [0.]

  References:
    Zhao, Cui, Song, Qiu and Liang, `Decoupled Knowledge Distillation
    <https://arxiv.org/abs/2203.08679>`_, 2022.

  .. seealso:: :func:`kd_loss`.

  .. versionadded:: 0.1.0
  """
  checks = (
      v.check_non_negative("alpha", alpha), v.check_non_negative("beta", beta)
  )

  def core(student, teacher, axis, where):
    if student.shape[axis] < 2:
      raise ValueError(
          "`student_logits` must have at least 2 classes along `axis` for DKD"
          f" (a target and a non-target class), got shape"
          f" {tuple(student.shape)} with axis={axis}."
      )
    targets = _target_indices(labels, student, axis, where)
    return _dkd_core(
        student, teacher, targets, alpha, beta, temperature, axis
    )

  return _soft_target.logit_pair_loss(
      core, student_logits, teacher_logits, temperature=temperature,
      axis=axis, where=where, checks=checks,
  )


# The numerical core is jitted (the checks stay outside): an eager call
# compiles one program per shape instead of dispatching each operation.
@functools.partial(jax.jit, static_argnames=("axis",))
def _dkd_core(
    student_logits: Array,
    teacher_logits: Array,
    targets: Array,
    alpha: ArrayLike,
    beta: ArrayLike,
    temperature: ArrayLike,
    axis: int,
) -> Array:
  """The per-example DKD loss of checked, cast inputs (no ``where``)."""
  dtype = student_logits.dtype
  class_ids = jax.lax.broadcasted_iota(jnp.int32, student_logits.shape, axis)
  is_target = class_ids == jnp.expand_dims(targets, axis)
  # Traced labels outside [0, C) select no class; such examples become nan.
  valid = jnp.any(is_target, axis=axis)

  temperature = jnp.asarray(temperature).astype(dtype)
  zero = jnp.zeros((), dtype)

  # NCKD: the KL of the two distributions over the non-target classes (the
  # target removed exactly, never by subtracting a large constant), computed
  # from the logit difference so it is accurate at any temperature.
  pair = _log_ratio.logit_pair(
      teacher_logits, student_logits, temperature, axis, classes=~is_target
  )
  nckd = _log_ratio.forward_kl(pair)

  # TCKD: margins m = z_t / T - logsumexp_{k != t} z_k / T in the shifted
  # frame of `pair`, and the student's margin minus the teacher's from the
  # accurate normaliser gap.
  def margin(shifted: Array, norm: Array) -> tuple[Array, Array]:
    has_target = jnp.any(is_target & (shifted > -jnp.inf), axis=axis)
    picked = jnp.sum(
        jnp.where(is_target & (shifted > -jnp.inf), shifted, zero), axis=axis
    )
    scaled = jnp.where(
        has_target, picked / temperature, jnp.full((), -jnp.inf, dtype)
    )
    return scaled - jnp.squeeze(norm, axis), picked

  teacher_margin, teacher_picked = margin(pair.shifted_p, pair.norm_p)
  student_margin, student_picked = margin(pair.shifted_q, pair.norm_q)
  margin_difference = (
      student_picked - teacher_picked
  ) / temperature - _log_ratio.log_normalizer_gap(pair)
  teacher_binary = _binary_log_probs(teacher_margin)
  student_binary = _binary_log_probs(student_margin)
  binary_d = _binary_log_ratios(
      margin_difference, teacher_binary, student_binary
  )
  binary_supp_t = _log_ratio.supported(teacher_binary)
  binary_supp_s = _log_ratio.supported(student_binary)
  binary_both = binary_supp_t & binary_supp_s
  tckd, _ = _log_ratio.centered_gap(teacher_binary, binary_d, binary_both, -1)
  tckd = tckd + _log_ratio.outside_mass(
      student_binary, binary_both, binary_supp_s & ~binary_both, -1
  )
  tckd = jnp.where(
      jnp.any(binary_supp_t & ~binary_both, axis=-1),
      jnp.full((), jnp.inf, dtype),
      tckd,
  )

  alpha = jnp.asarray(alpha).astype(dtype)
  beta = jnp.asarray(beta).astype(dtype)
  loss = temperature**2 * (alpha * tckd + beta * nckd)
  loss = jnp.where(valid, loss, jnp.full((), jnp.nan, dtype))
  return v.nan_where_nan(loss, student_logits, teacher_logits, axis=axis)
