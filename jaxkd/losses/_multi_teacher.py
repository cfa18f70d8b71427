r"""Distillation from several teachers stacked on a leading axis: the loss.

Teacher logits have shape ``[K, ..., num_classes]``: ``K`` teachers, each with
the shape of the student's logits ``[..., num_classes]``. Same-architecture
teachers produce this layout directly when their parameters are stacked and
their forward pass is vmapped; teachers of different architectures are stacked
with ``jnp.stack``.

Ensembles are formed in log space: the probability average
:math:`\sum_k w_k p_k` is ``logsumexp_k(log w_k + log_softmax(z_k / T))``, so
no function takes the log of a softmax, adds an epsilon or clips. A ``-inf``
logit marks a class as impossible for that teacher and is handled exactly.
The ensemble targets and the confidence weights are in
:mod:`jaxkd.losses._ensemble`, the checks of the stack in
:mod:`jaxkd.losses._teacher_stack`.

Everything here is a pure function of its arguments and is differentiable with
respect to every one of them, teachers included. Teachers are frozen during
distillation: the train step never passes teacher parameters to the optimiser,
so no ``stop_gradient`` is applied here.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxkd.losses import _ensemble
from jaxkd.losses import _log_ratio
from jaxkd.losses import _soft_target
from jaxkd.losses import _teacher_stack
from jaxkd.losses import validation as v

Array = jax.Array
ArrayLike = Any

_REDUCTIONS = ("ensemble", "mean")


def _ensemble_kl(
    pairs: _log_ratio.LogitPair, weights: Array, axis: int
) -> Array:
  r""":math:`\mathrm{KL}(\bar p \,\|\, p^S)` for the probability average.

  ``pairs`` holds the ``K`` (teacher, student) pairs stacked on axis 0, with
  the class axis at ``axis + 1``; ``weights`` is ``[K, ...]``, normalised.
  The log-ratio of the ensemble to the student is a weighted log-mean-exp of
  the per-teacher log-ratios, :math:`\log(\bar p_c / p^S_c) = \log \sum_k
  w_k \exp(\log(p_{k,c} / p^S_c))`, each of which keeps the precision of its
  logit difference; the KL is the centred gap of it under :math:`\bar p`
  (:mod:`_log_ratio`), plus the student's mass outside the ensemble's
  support, and ``inf`` if a teacher with positive weight supports a class
  the student rules out.
  """
  class_axis = axis + 1
  dtype = pairs.d.dtype
  zero = jnp.zeros((), dtype)
  neg_inf = jnp.full((), -jnp.inf, dtype)
  positive = weights != 0
  hole = jnp.any(positive & jnp.any(pairs.p_only, axis=class_axis), axis=0)
  expanded = jnp.expand_dims(weights, class_axis)
  used = jnp.expand_dims(positive, class_axis) & pairs.both
  # log(p_k / p_S) on the classes teacher k and the student both support.
  log_teacher_over_student = jnp.where(
      used, -_log_ratio.log_ratio(pairs), neg_inf
  )
  weight = jnp.where(used, expanded, zero)
  log_weight = jnp.where(
      used, jnp.log(jnp.where(used, expanded, jnp.ones((), dtype))), zero
  )
  log_ensemble_over_student = _log_ratio.log_weighted_mean_exp(
      log_teacher_over_student, weight, log_weight, axis=0
  )
  log_ensemble = _ensemble.log_mixture(pairs.log_p, weights, class_axis)
  log_student = pairs.log_q[0]
  inside = _log_ratio.supported(log_ensemble) & _log_ratio.supported(
      log_student
  )
  outside = _log_ratio.supported(log_student) & ~inside
  # log p_bar + log(p_S / p_bar) = log p_S: the exponent of every term.
  gap, _ = _log_ratio.centered_gap(
      log_ensemble, -log_ensemble_over_student, inside, axis,
      log_p_plus_d=log_student,
  )
  loss = gap + _log_ratio.outside_mass(log_student, inside, outside, axis)
  return jnp.where(hole, jnp.full((), jnp.inf, dtype), loss)


def multi_teacher_kd_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperature: ArrayLike = 1.0,
    weights: ArrayLike | None = None,
    reduction: str = "ensemble",
    mode: str = "probability",
    axis: int = -1,
    where: ArrayLike | None = None,
) -> Array:
  r"""Knowledge-distillation loss from ``K`` teachers.

  ``reduction="ensemble"`` distils from the weighted ensemble
  :math:`\bar p` of :func:`ensemble_log_soft_targets` (``mode`` chooses
  probability or logit averaging):

  .. math::
    \mathcal{L}_{ens} = T^2 \, \mathrm{KL}(\bar p \,\|\, p^S)

  ``reduction="mean"`` takes the weighted mean of the per-teacher KD losses:

  .. math::
    \mathcal{L}_{mean} = \sum_k w_k \, T^2 \, \mathrm{KL}(p_k \,\|\, p^S),
    \quad p = \mathrm{softmax}(z / T)

  With probability averaging the two give the same gradient with respect to
  the student logits, :math:`T (p^S - \sum_k w_k p_k)`, because the KL is
  linear in its first argument up to the teachers' entropies, which do not
  depend on the student. Their values differ by the weighted Jensen gap,
  the diversity of the teachers around their ensemble:

  .. math::
    \mathcal{L}_{mean} - \mathcal{L}_{ens}
    = T^2 \sum_k w_k \, \mathrm{KL}(p_k \,\|\, \bar p) \ge 0

  This holds for per-example weights too. ``"ensemble"`` is zero when the
  student matches the ensemble; ``"mean"`` is not.

  Both reductions are computed from each teacher's logit difference to the
  student (the ensemble through a weighted log-mean-exp of the per-teacher
  log-ratios), so they stay float32-accurate at temperatures up to
  :math:`10^4`. ``nan`` in any teacher (even one of weight 0) gives ``nan``
  for that example; a traced invalid ``temperature`` or ``weights`` gives
  ``nan`` everywhere.

  Args:
    student_logits: Floating logits of shape ``[..., num_classes]``.
    teacher_logits: Floating logits of shape ``[K, ..., num_classes]``: ``K``
      teachers on a leading axis, each with the student's shape.
    temperature: Softmax temperature :math:`T > 0` applied to all logits.
    weights: Non-negative teacher weights, normalised over ``K``: ``None``
      (uniform), ``[K]`` or ``[K, ...]`` broadcastable to the per-example
      shape (for example :func:`teacher_confidence_weights`).
    reduction: ``"ensemble"`` (KL to the ensemble) or ``"mean"`` (weighted
      mean of per-teacher KLs).
    mode: How the ensemble averages, ``"probability"`` or ``"logit"``; only
      ``"probability"`` is accepted with ``reduction="mean"``.
    axis: The class axis of ``student_logits`` (the teacher axis of
      ``teacher_logits`` is not counted).
    where: Optional boolean mask broadcastable to the per-example shape
      ``[...]``; masked-out examples give 0 and no gradient.

  Returns:
    The per-example loss, shape ``[...]`` (the student's shape without
    ``axis``); float32 for bfloat16 and float16 inputs.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses
    >>> teachers = jnp.log(jnp.array([[0.5, 0.5], [0.9, 0.1]]))
    >>> student = jnp.log(jnp.array([0.7, 0.3]))
    >>> loss = losses.multi_teacher_kd_loss(student, teachers)
    >>> print(loss.round(4))
    0.0
    >>> loss = losses.multi_teacher_kd_loss(student, teachers, reduction="mean")
    >>> print(loss.round(4))
    0.1017

  References:
    Hinton, Vinyals and Dean, `Distilling the Knowledge in a Neural Network
    <https://arxiv.org/abs/1503.02531>`_, 2015.

    You, Xu, Xu and Tao, `Learning from Multiple Teacher Networks
    <https://doi.org/10.1145/3097983.3098135>`_, KDD 2017 (averaged teacher
    soft targets).

  .. seealso:: :func:`teacher_confidence_weights`, :func:`kd_loss`.

  .. versionadded:: 0.1.0
  """
  v.check_floating("student_logits", student_logits)
  v.check_floating("teacher_logits", teacher_logits)
  v.check_min_rank("student_logits", student_logits, 1)
  _teacher_stack.check_teacher_matches_student(student_logits, teacher_logits)
  _teacher_stack.check_teacher_stack(teacher_logits)
  valid = v.check_positive("temperature", temperature)
  v.check_choice("reduction", reduction, _REDUCTIONS)
  v.check_choice("mode", mode, _ensemble.MODES)
  if reduction == "mean" and mode != "probability":
    raise ValueError(
        f"`mode`={mode!r} only applies to reduction='ensemble'; with"
        " reduction='mean' each teacher is compared with the student"
        " separately, so `mode` must be 'probability'."
    )
  axis = v.normalize_axis("student_logits", student_logits, axis)
  student_logits, teacher_logits = v.as_compute_dtype(
      student_logits, teacher_logits
  )
  dtype = student_logits.dtype
  per_example_shape = tuple(
      d for i, d in enumerate(student_logits.shape) if i != axis
  )
  where = v.broadcast_where(where, per_example_shape)
  # Masked rows are zeroed before anything is computed, so nan or inf in
  # them reach neither the value nor the gradient.
  student_logits = v.zero_masked_examples(student_logits, where, axis)
  teacher_logits = v.zero_masked_examples(
      teacher_logits, None if where is None else where[None], axis + 1
  )
  weights, weights_valid = _teacher_stack.normalized_weights(
      weights,
      num_teachers=teacher_logits.shape[0],
      per_example_shape=per_example_shape,
      dtype=dtype,
      where=where,
  )
  valid = v.all_valid(valid, weights_valid)
  loss = _multi_teacher_core(
      student_logits, teacher_logits, weights, temperature, reduction, mode,
      axis,
  )
  return v.nan_unless(valid, v.apply_where(loss, where))


# The numerical core is jitted (the checks stay outside): an eager call
# compiles one program per shape instead of dispatching each operation.
@functools.partial(
    jax.jit, static_argnames=("reduction", "mode", "axis")
)
def _multi_teacher_core(
    student_logits: Array,
    teacher_logits: Array,
    weights: Array,
    temperature: ArrayLike,
    reduction: str,
    mode: str,
    axis: int,
) -> Array:
  """The per-example loss ``T^2 KL`` of checked inputs (no ``where``)."""
  if reduction == "ensemble" and mode == "logit":
    mean_logits = _ensemble.mean_logits(teacher_logits, weights, axis + 1)
    loss = _soft_target.kl_from_logits(
        mean_logits, student_logits, temperature, axis
    )
  else:
    # One accurate (teacher k, student) pair per teacher, vectorised over K.
    pairs = _log_ratio.logit_pair(
        teacher_logits,
        jnp.broadcast_to(student_logits, teacher_logits.shape),
        temperature,
        axis + 1,
    )
    if reduction == "ensemble":
      loss = _ensemble_kl(pairs, weights, axis)
    else:
      per_teacher = _log_ratio.forward_kl(pairs)
      # A zero weight drops its teacher even where that teacher's KL is
      # infinite (it supports a class the student rules out): no 0 * inf.
      positive = weights != 0
      safe_per_teacher = jnp.where(
          positive, per_teacher, jnp.zeros((), per_teacher.dtype)
      )
      loss = jnp.sum(
          jnp.where(positive, weights * safe_per_teacher, 0.0), axis=0
      )
  # nan in any teacher (even one of weight 0) or in the student is never
  # read as an impossible class: the example's loss is nan.
  loss = v.nan_where_nan(loss, student_logits, axis=axis)
  loss = jnp.where(
      jnp.any(jnp.isnan(teacher_logits), axis=(0, axis + 1)),
      jnp.full((), jnp.nan, loss.dtype),
      loss,
  )
  temperature = jnp.asarray(temperature).astype(loss.dtype)
  loss = v.nan_where_nan(loss, weights, axis=0)
  return temperature**2 * loss

