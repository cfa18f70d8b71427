r"""Distillation from several teachers stacked on a leading axis.

Teacher logits have shape ``[K, ..., num_classes]``: ``K`` teachers, each with
the shape of the student's logits ``[..., num_classes]``. Same-architecture
teachers produce this layout directly when their parameters are stacked and
their forward pass is vmapped; teachers of different architectures are stacked
with ``jnp.stack``.

Ensembles are formed in log space: the probability average
:math:`\sum_k w_k p_k` is ``logsumexp_k(log w_k + log_softmax(z_k / T))``, so
no function takes the log of a softmax, adds an epsilon or clips. A ``-inf``
logit marks a class as impossible for that teacher and is handled exactly.

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
import numpy as np

from jaxkd.losses import _log_ratio
from jaxkd.losses import _soft_target
from jaxkd.losses import _validation as v

Array = jax.Array
ArrayLike = Any

_MODES = ("probability", "logit")
_REDUCTIONS = ("ensemble", "mean")


def _check_teacher_stack(teacher_logits: ArrayLike) -> None:
  """``teacher_logits`` is floating with a non-empty leading teacher axis."""
  v.check_floating("teacher_logits", teacher_logits)
  if teacher_logits.ndim < 2:
    raise ValueError(
        "`teacher_logits` must have a leading teacher axis [K, ...]: shape"
        " [K, ..., num_classes] with at least 2 dimensions, got shape"
        f" {tuple(teacher_logits.shape)}."
    )
  if teacher_logits.shape[0] == 0:
    raise ValueError(
        "`teacher_logits` must hold at least one teacher on its leading"
        f" teacher axis [K, ...], got shape {tuple(teacher_logits.shape)}."
    )


def _check_teacher_matches_student(
    student_logits: ArrayLike, teacher_logits: ArrayLike
) -> None:
  """``teacher_logits`` has the shape ``(K, *student_logits.shape)``."""
  student_shape = tuple(student_logits.shape)
  teacher_shape = tuple(teacher_logits.shape)
  if teacher_logits.ndim != student_logits.ndim + 1 or (
      teacher_shape[1:] != student_shape
  ):
    hint = ""
    if teacher_shape == student_shape:
      hint = (
          " It has the student's shape: for a single teacher add the axis,"
          " `teacher_logits[None]`, or use `kd_loss`."
      )
    raise ValueError(
        "`teacher_logits` must have a leading teacher axis [K, ...] followed"
        f" by the shape of `student_logits`, i.e. (K, *{student_shape}); got"
        f" shape {teacher_shape}.{hint}"
    )


def _normalized_weights(
    weights: ArrayLike | None,
    *,
    num_teachers: int,
    per_example_shape: tuple[int, ...],
    dtype: jnp.dtype,
    where: Array | None = None,
) -> tuple[Array, Any]:
  """Checks ``weights`` and returns them as ``[K, *per_example_shape]``.

  Returns ``(weights, valid)``: the weights sum to one over the teacher
  axis, and ``valid`` is the check for :func:`_validation.nan_unless` (a
  traced negative weight or zero sum makes every example ``nan``). ``weights`` may be ``None``
  (uniform), ``[K]`` (one weight per teacher) or ``[K, ...]`` with ``...``
  broadcastable to ``per_example_shape`` (per-example weights). In rows that
  ``where`` masks out the weights are replaced by ones, so whatever those
  rows held reaches neither the value nor the gradient.
  """
  full_shape = (num_teachers, *per_example_shape)
  if weights is None:
    return jnp.full(full_shape, 1.0 / num_teachers, dtype), True
  # Read the concrete value first: under jit, jnp operations on a constant
  # may already give tracers.
  raw = v.concrete_value(weights)
  weights = jnp.asarray(weights)
  if not (
      jnp.issubdtype(weights.dtype, jnp.floating)
      or jnp.issubdtype(weights.dtype, jnp.integer)
  ):
    raise TypeError(
        "`weights` must be a real (floating or integer) array, got dtype"
        f" {weights.dtype}."
    )
  expected = (
      f"[K] = ({num_teachers},) or [K, ...] with ... broadcastable to the"
      f" per-example shape {per_example_shape}"
  )
  if weights.ndim == 0 or weights.shape[0] != num_teachers:
    raise ValueError(
        f"`weights` must have shape {expected}; got shape"
        f" {tuple(weights.shape)}."
    )
  rest = tuple(weights.shape[1:])
  try:
    broadcastable = np.broadcast_shapes(rest, per_example_shape) == tuple(
        per_example_shape
    )
  except ValueError:
    broadcastable = False
  if not broadcastable:
    raise ValueError(
        f"`weights` must have shape {expected}; got shape"
        f" {tuple(weights.shape)}."
    )
  # [K, *rest] -> [K, 1, ..., 1, *rest]: the per-example part is aligned to
  # the right, like NumPy broadcasting, and never mixed with the teacher axis.
  aligned = (num_teachers,) + (1,) * (
      len(per_example_shape) - len(rest)
  ) + rest
  weights = weights.reshape(aligned)
  weights = jnp.broadcast_to(weights.astype(dtype), full_shape)
  if where is not None:
    weights = jnp.where(where[None], weights, jnp.ones((), dtype))
  concrete = None
  if raw is not None:
    concrete = np.broadcast_to(raw.reshape(aligned), full_shape)
    if where is not None:
      kept = v.concrete_value(where)
      concrete = None if kept is None else np.where(kept[None], concrete, 1)
  valid = True
  if concrete is None:
    valid = jnp.all(weights >= 0) & jnp.all(jnp.sum(weights, axis=0) > 0)
  else:
    if not np.all(concrete >= 0):
      raise ValueError(
          "`weights` must be >= 0 (non-negative teacher weights), got minimum"
          f" {np.min(concrete)} in weights of shape {tuple(weights.shape)}."
      )
    if not np.all(concrete.sum(axis=0) > 0):
      raise ValueError(
          "`weights` must have a positive sum over the teacher axis for every"
          " example (they are normalised over K); got a zero sum for"
          f" {int(np.sum(concrete.sum(axis=0) <= 0))} example(s)."
      )
  return weights / jnp.sum(weights, axis=0, keepdims=True), valid


def _log_mixture(log_probs: Array, weights: Array, axis: int) -> Array:
  """``log sum_k w_k p_k`` over axis 0 from ``log p_k``; exact ``-inf`` zeros.

  ``log_probs`` is ``[K, ..., C]`` with the class axis at ``axis``; ``weights``
  is ``[K, ...]`` (normalised) without it.
  """
  weights = jnp.expand_dims(weights, axis)
  # log 0 = -inf through the double where: a zero weight removes its teacher
  # from the sum, and the gradient never sees log(0) or 1 / 0.
  positive = weights != 0
  safe_weights = jnp.where(positive, weights, jnp.ones((), weights.dtype))
  log_weights = jnp.where(
      positive, jnp.log(safe_weights), jnp.full((), -jnp.inf, weights.dtype)
  )
  terms = log_weights + log_probs
  # A class that no teacher with positive weight supports has log p = -inf.
  # Its logsumexp would be over -inf only, whose gradient is 0 / 0, so it is
  # computed on zeros and replaced afterwards.
  supported = jnp.any(terms != -jnp.inf, axis=0)
  safe_terms = jnp.where(supported[None], terms, jnp.zeros((), terms.dtype))
  log_mixture = jax.nn.logsumexp(safe_terms, axis=0)
  return jnp.where(
      supported, log_mixture, jnp.full((), -jnp.inf, log_mixture.dtype)
  )


def _mean_logits(logits: Array, weights: Array, axis: int) -> Array:
  """``sum_k w_k z_k`` over axis 0, with ``-inf`` logits kept exact."""
  weights = jnp.expand_dims(weights, axis)
  finite = logits != -jnp.inf
  safe_logits = jnp.where(finite, logits, jnp.zeros((), logits.dtype))
  # Only finite logits enter the product, so a zero weight on a -inf logit
  # never forms 0 * inf, and the weights' gradient never sees an infinity.
  mean = jnp.sum(weights * safe_logits, axis=0)
  impossible = jnp.any(~finite & (weights > 0), axis=0)
  return jnp.where(impossible, jnp.full((), -jnp.inf, mean.dtype), mean)


def _ensemble_log_probs(
    teacher_logits: Array,
    weights: Array,
    *,
    temperature: ArrayLike,
    mode: str,
    axis: int,
) -> Array:
  """The ensemble's log-probabilities ``[..., C]``; ``axis`` is per-teacher."""
  if mode == "probability":
    log_probs = _soft_target.scaled_log_softmax(
        teacher_logits, temperature, axis + 1
    )
    return _log_mixture(log_probs, weights, axis + 1)
  mean = _mean_logits(teacher_logits, weights, axis + 1)
  return _soft_target.scaled_log_softmax(mean, temperature, axis)


def _per_teacher_axis(teacher_logits: Array, axis: int) -> int:
  """Normalises ``axis``, counted in one teacher's logits ``[..., C]``."""
  one_teacher = jax.ShapeDtypeStruct(
      teacher_logits.shape[1:], teacher_logits.dtype
  )
  return v.normalize_axis("teacher_logits[k]", one_teacher, axis)


def ensemble_log_soft_targets(
    teacher_logits: ArrayLike,
    *,
    temperature: ArrayLike = 1.0,
    weights: ArrayLike | None = None,
    mode: str = "probability",
    axis: int = -1,
) -> Array:
  r"""Log-probabilities of a weighted ensemble of teachers' soft targets.

  With ``mode="probability"`` (the default) the teachers' soft targets are
  averaged:

  .. math::
    \log \bar p_c = \log \sum_k w_k \, \mathrm{softmax}(z_k / T)_c
    = \operatorname{logsumexp}_k \big(\log w_k
    + \log\mathrm{softmax}(z_k / T)_c\big)

  With ``mode="logit"`` the logits are averaged first:

  .. math::
    \log \bar p_c = \log\mathrm{softmax}\Big(\sum_k w_k z_k \,/\, T\Big)_c

  The weights are normalised over the teacher axis,
  :math:`w_k = \tilde w_k / \sum_j \tilde w_j`. A teacher with weight 0 is
  left out exactly (as :math:`\log 0 = -\infty`), and a class that every
  teacher with positive weight gives a ``-inf`` logit has log-probability
  ``-inf``.

  Args:
    teacher_logits: Floating logits of shape ``[K, ..., num_classes]``: ``K``
      teachers stacked on a leading axis.
    temperature: Softmax temperature :math:`T > 0`; a scalar.
    weights: Non-negative teacher weights, normalised over ``K``: ``None``
      (uniform), shape ``[K]`` (one weight per teacher) or ``[K, ...]`` with
      ``...`` broadcastable to the per-example shape (for example the output
      of :func:`teacher_confidence_weights`). Cast to the logits' compute
      dtype.
    mode: ``"probability"`` to average soft targets, ``"logit"`` to average
      logits.
    axis: The class axis of one teacher's logits ``[..., num_classes]`` (the
      teacher axis is not counted); it is also the class axis of the output.

  Returns:
    Log-probabilities of shape ``[..., num_classes]`` (the input shape without
    the teacher axis); float32 for bfloat16 and float16 inputs.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses
    >>> teachers = jnp.log(jnp.array([[0.5, 0.5], [0.9, 0.1]]))
    >>> log_probs = losses.ensemble_log_soft_targets(teachers)
    >>> print(" ".join(f"{p:.4f}" for p in jnp.exp(log_probs)))
    0.7000 0.3000

  References:
    Hinton, Vinyals and Dean, `Distilling the Knowledge in a Neural Network
    <https://arxiv.org/abs/1503.02531>`_, 2015 (distilling an ensemble).

  .. seealso:: :func:`ensemble_soft_targets` (the probabilities).

  .. versionadded:: 0.1.0
  """
  _check_teacher_stack(teacher_logits)
  valid = v.check_positive("temperature", temperature)
  v.check_choice("mode", mode, _MODES)
  axis = _per_teacher_axis(teacher_logits, axis)
  (teacher_logits,) = v.as_compute_dtype(teacher_logits)
  per_example_shape = tuple(
      d for i, d in enumerate(teacher_logits.shape[1:]) if i != axis
  )
  weights, weights_valid = _normalized_weights(
      weights,
      num_teachers=teacher_logits.shape[0],
      per_example_shape=per_example_shape,
      dtype=teacher_logits.dtype,
  )
  return v.nan_unless(
      v.all_valid(valid, weights_valid),
      _ensemble_log_probs(
          teacher_logits, weights, temperature=temperature, mode=mode,
          axis=axis,
      ),
  )


def ensemble_soft_targets(
    teacher_logits: ArrayLike,
    *,
    temperature: ArrayLike = 1.0,
    weights: ArrayLike | None = None,
    mode: str = "probability",
    axis: int = -1,
) -> Array:
  r"""Probabilities of a weighted ensemble of teachers' soft targets.

  The exponential of :func:`ensemble_log_soft_targets` (which computes in log
  space; losses use that one):

  .. math::
    \bar p = \sum_k w_k \, \mathrm{softmax}(z_k / T)
    \quad \text{or} \quad
    \bar p = \mathrm{softmax}\Big(\sum_k w_k z_k \,/\, T\Big)

  for ``mode="probability"`` and ``mode="logit"``, with the weights
  normalised over the ``K`` teachers.

  Args:
    teacher_logits: Floating logits of shape ``[K, ..., num_classes]``.
    temperature: Softmax temperature :math:`T > 0`; a scalar.
    weights: Non-negative teacher weights, normalised over ``K``: ``None``
      (uniform), ``[K]`` or ``[K, ...]`` broadcastable to the per-example
      shape.
    mode: ``"probability"`` or ``"logit"``.
    axis: The class axis of one teacher's logits (the teacher axis is not
      counted).

  Returns:
    Probabilities of shape ``[..., num_classes]``; float32 for bfloat16 and
    float16 inputs.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses
    >>> teachers = jnp.log(jnp.array([[0.5, 0.5], [0.9, 0.1]]))
    >>> probs = losses.ensemble_soft_targets(
    ...     teachers, weights=jnp.array([1.0, 3.0]))
    >>> print(" ".join(f"{p:.4f}" for p in probs))
    0.8000 0.2000
    >>> probs = losses.ensemble_soft_targets(teachers, mode="logit")
    >>> print(" ".join(f"{p:.4f}" for p in probs))
    0.7500 0.2500

  References:
    Hinton, Vinyals and Dean, `Distilling the Knowledge in a Neural Network
    <https://arxiv.org/abs/1503.02531>`_, 2015 (distilling an ensemble).

  .. versionadded:: 0.1.0
  """
  return jnp.exp(
      ensemble_log_soft_targets(
          teacher_logits, temperature=temperature, weights=weights, mode=mode,
          axis=axis,
      )
  )


def _entropy_from_log_probs(log_p: Array, axis: int) -> Array:
  """``-sum_c p_c log p_c`` with ``0 log 0 = 0`` (double ``where``)."""
  supported = log_p != -jnp.inf
  safe_log_p = jnp.where(supported, log_p, jnp.zeros((), log_p.dtype))
  terms = jnp.exp(safe_log_p) * safe_log_p
  return -jnp.sum(
      jnp.where(supported, terms, jnp.zeros((), terms.dtype)), axis=axis
  )


def teacher_confidence_weights(
    teacher_logits: ArrayLike,
    *,
    temperature: ArrayLike = 1.0,
    axis: int = -1,
) -> Array:
  r"""Per-example teacher weights from each teacher's entropy.

  A confident teacher (low entropy) gets more weight:

  .. math::
    w_k = \frac{\exp(-H(p_k))}{\sum_j \exp(-H(p_j))}, \quad
    H(p_k) = -\sum_c p_{k,c} \log p_{k,c}, \quad
    p_k = \mathrm{softmax}(z_k / T)

  computed from log-probabilities (classes with a ``-inf`` logit contribute
  :math:`0 \log 0 = 0`). Entropies are in nats and lie in
  :math:`[0, \log C]`, so the largest and smallest weight differ by a factor
  of at most :math:`C`. The weights depend on the teacher logits only; pass
  them as ``weights`` to :func:`multi_teacher_kd_loss` or
  :func:`ensemble_soft_targets`. They are not wrapped in ``stop_gradient``:
  teachers are frozen by the train step, which gives them no gradient.

  Args:
    teacher_logits: Floating logits of shape ``[K, ..., num_classes]``.
    temperature: Softmax temperature :math:`T > 0` of the teachers' soft
      targets whose entropy is measured.
    axis: The class axis of one teacher's logits (the teacher axis is not
      counted).

  Returns:
    Weights of shape ``[K, ...]`` (the input shape without the class axis)
    that sum to one over ``K``; float32 for bfloat16 and float16 inputs.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses
    >>> teachers = jnp.array([[0.0, 0.0], [100.0, 0.0]])
    >>> print(losses.teacher_confidence_weights(teachers).round(4))
    [0.3333 0.6667]

  References:
    Kwon, Na, Lee and Kim, `Adaptive Knowledge Distillation Based on
    Entropy <https://doi.org/10.1109/ICASSP40776.2020.9054698>`_, ICASSP 2020
    (lower-entropy teachers weighted more; the softmax of negative entropies
    above is one such weighting).

    Zhang, Chen and Wang, `Confidence-Aware Multi-Teacher Knowledge
    Distillation <https://arxiv.org/abs/2201.00007>`_, ICASSP 2022 (CA-MKD;
    weights from each teacher's cross-entropy to the labels instead).

  .. versionadded:: 0.1.0
  """
  _check_teacher_stack(teacher_logits)
  valid = v.check_positive("temperature", temperature)
  axis = _per_teacher_axis(teacher_logits, axis)
  (teacher_logits,) = v.as_compute_dtype(teacher_logits)
  log_probs = _soft_target.scaled_log_softmax(
      teacher_logits, temperature, axis + 1
  )
  entropy = _entropy_from_log_probs(log_probs, axis + 1)
  return v.nan_unless(valid, jax.nn.softmax(-entropy, axis=0))


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
  log_ensemble = _log_mixture(pairs.log_p, weights, class_axis)
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
  _check_teacher_matches_student(student_logits, teacher_logits)
  _check_teacher_stack(teacher_logits)
  valid = v.check_positive("temperature", temperature)
  v.check_choice("reduction", reduction, _REDUCTIONS)
  v.check_choice("mode", mode, _MODES)
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
  if where is not None:
    # Masked rows are zeroed before anything is computed, so nan or inf in
    # them reach neither the value nor the gradient.
    row_mask = jnp.expand_dims(where, axis)
    zero = jnp.zeros((), dtype)
    student_logits = jnp.where(row_mask, student_logits, zero)
    teacher_logits = jnp.where(row_mask[None], teacher_logits, zero)
  weights, weights_valid = _normalized_weights(
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
    mean_logits = _mean_logits(teacher_logits, weights, axis + 1)
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

