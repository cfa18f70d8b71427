"""Teacher-free distillation: a hand-designed virtual teacher.

Yuan et al. (2020) observe that knowledge distillation acts like a learned
label smoothing and replace the teacher by a fixed "virtual teacher" that
puts probability :math:`a` on the correct class and spreads the rest evenly
(Tf-KD\\ :sub:`reg`). The functions here build that distribution from integer
labels and distil from it at a temperature.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.losses import _soft_target
from jaxkd.losses import validation as v

Array = jax.Array
ArrayLike = Any


def _check_correct_probability(value: Any) -> Any:
  """Checks ``0 < value <= 1``; returns the validity for ``nan_unless``."""
  concrete = v.concrete_value(value)
  if concrete is None:
    value = jnp.asarray(value)
    return jnp.all((value > 0) & (value <= 1))
  if not np.all((concrete > 0) & (concrete <= 1)):
    raise ValueError(
        f"`correct_probability` must lie in (0, 1], got {value!r}."
    )
  return True


def _check_labels(
    labels: Any,
    num_classes: int,
    shape: tuple[int, ...] | None = None,
    where: Any = None,
) -> Array:
  """Checks integer ``labels`` (dtype, shape, concrete range) and returns them.

  The range is checked only on the rows kept by ``where`` (padding rows may
  hold any label), and not at all when ``where`` or ``labels`` is traced.
  """
  v.check_integer("labels", labels)
  if shape is not None and tuple(labels.shape) != tuple(shape):
    raise ValueError(
        f"`labels` must have the per-example shape {tuple(shape)} (the"
        " logits without the class axis), got"
        f" {tuple(labels.shape)}."
    )
  concrete = v.concrete_value(labels)
  if where is not None and concrete is not None:
    kept = v.concrete_value(where)
    concrete = (
        None if kept is None
        else concrete[np.broadcast_to(kept, concrete.shape)]
    )
  if concrete is not None and concrete.size and (
      concrete.min() < 0 or concrete.max() >= num_classes
  ):
    raise ValueError(
        f"`labels` must lie in [0, {num_classes}), got values in"
        f" [{concrete.min()}, {concrete.max()}]."
    )
  return jnp.asarray(labels)


def _is_correct_class(labels: Array, num_classes: int) -> Array:
  """Boolean one-hot ``[..., num_classes]``; out-of-range labels give none."""
  classes = jnp.arange(num_classes).reshape((1,) * labels.ndim + (-1,))
  return labels[..., None] == classes


def _nan_for_bad_labels(x: Array, labels: Array, num_classes: int) -> Array:
  """``nan`` rows ``[..., C]`` where a (traced) label is outside [0, C)."""
  valid = (labels >= 0) & (labels < num_classes)
  return jnp.where(valid[..., None], x, jnp.full((), jnp.nan, x.dtype))


def _log_targets(
    labels: Array, num_classes: int, correct_probability: ArrayLike, dtype: Any
) -> Array:
  """Virtual-teacher log-probabilities, class axis last, in ``dtype``."""
  a = jnp.asarray(correct_probability).astype(dtype)
  log_correct = jnp.log(a)
  # log((1 - a) / (C - 1)) with log1p for a close to 1; -inf exactly at a = 1.
  log_other = jnp.log1p(-a) - math.log(num_classes - 1)
  is_correct = _is_correct_class(labels, num_classes)
  return _nan_for_bad_labels(
      jnp.where(is_correct, log_correct, log_other), labels, num_classes
  )


def _default_dtype(dtype: Any) -> jnp.dtype:
  if dtype is None:
    # float64 under x64, float32 otherwise.
    return jnp.dtype(jnp.result_type(float))
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"`dtype` must be a floating dtype, got {dtype}.")
  return dtype


def virtual_teacher_targets(
    labels: ArrayLike,
    num_classes: int,
    *,
    correct_probability: ArrayLike = 0.9,
    dtype: Any = None,
) -> Array:
  r"""The virtual teacher's distribution of Tf-KD\ :sub:`reg`.

  .. math::
    q_c = \begin{cases} a & c = y \\ \dfrac{1 - a}{C - 1} & c \neq y
    \end{cases}

  With :math:`a > 1/C` the correct class is the most probable (the paper
  uses :math:`a \ge 0.9`); :math:`a = 1/C` gives the uniform distribution
  and :math:`a = 1` the one-hot labels.

  Args:
    labels: Integer class indices of shape ``[...]``, in ``[0, num_classes)``
      (checked when known at trace time).
    num_classes: The number of classes :math:`C \ge 2` (a Python int).
    correct_probability: :math:`a \in (0, 1]`, the probability of the correct
      class.
    dtype: Floating dtype of the result; by default float32 (float64 when
      x64 is enabled).

  Returns:
    Probabilities of shape ``[..., num_classes]`` (class axis last).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses
    >>> targets = losses.virtual_teacher_targets(jnp.array([1]), 3)
    >>> print(targets.round(4))
    [[0.05 0.9  0.05]]

  References:
    Yuan, Tay, Li, Wang and Feng, `Revisiting Knowledge Distillation via
    Label Smoothing Regularization <https://arxiv.org/abs/1909.11723>`_,
    2020.

  .. seealso:: :func:`virtual_teacher_log_targets`,
    :func:`teacher_free_kd_loss`.

  .. versionadded:: 0.1.0
  """
  num_classes = v.check_int("num_classes", num_classes, minimum=2)
  valid = _check_correct_probability(correct_probability)
  labels = _check_labels(labels, num_classes)
  dtype = _default_dtype(dtype)
  a = jnp.asarray(correct_probability).astype(dtype)
  is_correct = _is_correct_class(labels, num_classes)
  return v.nan_unless(valid, _nan_for_bad_labels(
      jnp.where(is_correct, a, (1 - a) / (num_classes - 1)), labels,
      num_classes,
  ))


def virtual_teacher_log_targets(
    labels: ArrayLike,
    num_classes: int,
    *,
    correct_probability: ArrayLike = 0.9,
    dtype: Any = None,
) -> Array:
  r"""Log of :func:`virtual_teacher_targets`, computed directly in log space.

  .. math::
    \log q_c = \begin{cases} \log a & c = y \\
    \log(1 - a) - \log(C - 1) & c \neq y \end{cases}

  :math:`\log(1 - a)` is computed with ``log1p``, so the values are exact
  for :math:`a` close to 1; at :math:`a = 1` the wrong classes get
  ``-inf``.

  Args:
    labels: Integer class indices of shape ``[...]``.
    num_classes: The number of classes :math:`C \ge 2` (a Python int).
    correct_probability: :math:`a \in (0, 1]`.
    dtype: Floating dtype of the result; by default float32 (float64 when
      x64 is enabled).

  Returns:
    Log-probabilities of shape ``[..., num_classes]`` (class axis last).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses
    >>> log_targets = losses.virtual_teacher_log_targets(
    ...     jnp.array(0), 2, correct_probability=0.5)
    >>> print(log_targets.round(4))
    [-0.6931 -0.6931]

  References:
    Yuan, Tay, Li, Wang and Feng, `Revisiting Knowledge Distillation via
    Label Smoothing Regularization <https://arxiv.org/abs/1909.11723>`_,
    2020.

  .. versionadded:: 0.1.0
  """
  num_classes = v.check_int("num_classes", num_classes, minimum=2)
  valid = _check_correct_probability(correct_probability)
  labels = _check_labels(labels, num_classes)
  dtype = _default_dtype(dtype)
  return v.nan_unless(
      valid, _log_targets(labels, num_classes, correct_probability, dtype)
  )


def teacher_free_kd_loss(
    student_logits: ArrayLike,
    labels: ArrayLike,
    *,
    correct_probability: ArrayLike = 0.9,
    temperature: ArrayLike = 20.0,
    axis: int = -1,
    where: ArrayLike | None = None,
) -> Array:
  r"""Teacher-free KD (Tf-KD\ :sub:`reg`): distil from a virtual teacher.

  The virtual teacher's log-probabilities :math:`\log q` (see
  :func:`virtual_teacher_log_targets`) play the role of teacher logits and
  are softened at temperature :math:`T` like the student's:

  .. math::
    \mathcal{L} = T^2\, \mathrm{KL}\big(\mathrm{softmax}(\log q / T)
      \,\|\, \mathrm{softmax}(z / T)\big),
    \quad \mathrm{softmax}(\log q / T)_c \propto q_c^{1/T}

  Combine it with the hard-label cross-entropy yourself, as in the paper:
  :math:`(1 - \alpha) H(y, \mathrm{softmax}(z)) + \alpha \mathcal{L}`.

  Difference from the authors' code: the reference ``loss_kd_regularization``
  computes ``KLDivLoss()(log_softmax(outputs), softmax(teacher_soft / T)) *
  multiplier``, i.e. it applies the softmax to the *probabilities*
  :math:`q / T` (which for :math:`T = 20` is almost uniform whatever
  :math:`a`), leaves the student at temperature 1, averages over batch *and*
  classes, and scales by a tuned multiplier instead of :math:`T^2` (it also
  fixes :math:`a = 0.99`). This function follows the paper's formulation of
  a teacher softened at :math:`T`, taking the virtual teacher's
  log-probabilities as its logits, so that :math:`T = 1` distils exactly
  from :math:`q` and the gradient scale is the usual KD one.

  Args:
    student_logits: Floating logits of shape ``[..., num_classes]``.
    labels: Integer class indices of the per-example shape ``[...]``; values
      in ``[0, num_classes)`` (checked on unmasked rows when known at trace
      time).
    correct_probability: :math:`a \in (0, 1]`, the virtual teacher's
      probability of the correct class.
    temperature: Softmax temperature :math:`T > 0`.
    axis: The class axis of ``student_logits``.
    where: Optional boolean mask broadcastable to the per-example shape;
      masked-out examples give 0 and no gradient.

  Returns:
    The per-example loss, shape ``[...]`` (float32 for 16-bit inputs).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses
    >>> student = jnp.array([[2.0, 0.0, 0.0]])
    >>> loss = losses.teacher_free_kd_loss(
    ...     student, jnp.array([0]), temperature=1.0)
    >>> print(loss.round(4))
    [0.0451]

  References:
    Yuan, Tay, Li, Wang and Feng, `Revisiting Knowledge Distillation via
    Label Smoothing Regularization <https://arxiv.org/abs/1909.11723>`_,
    2020.

  .. seealso:: :func:`kd_loss`, :func:`distillation_loss`.

  .. versionadded:: 0.1.0
  """
  v.check_floating("student_logits", student_logits)
  v.check_min_rank("student_logits", student_logits, 1)
  valid = v.all_valid(
      v.check_positive("temperature", temperature),
      _check_correct_probability(correct_probability),
  )
  axis = v.normalize_axis("student_logits", student_logits, axis)
  (logits,) = v.as_compute_dtype(student_logits)
  num_classes = logits.shape[axis]
  if num_classes < 2:
    raise ValueError(
        "`student_logits` must have at least 2 classes along axis"
        f" {axis}, got shape {tuple(logits.shape)}."
    )
  per_example_shape = logits.shape[:axis] + logits.shape[axis + 1 :]
  where = v.broadcast_where(where, per_example_shape)
  labels = _check_labels(labels, num_classes, per_example_shape, where)
  if where is not None:
    logits = jnp.where(
        jnp.expand_dims(where, axis), logits, jnp.zeros((), logits.dtype)
    )
    # Padded rows may carry any label: never a nan target there.
    labels = jnp.where(where, labels, jnp.zeros((), labels.dtype))
  # A traced label outside [0, C) makes its example nan; it is computed on a
  # valid label so that no nan enters the other examples' gradients.
  label_valid = (labels >= 0) & (labels < num_classes)
  labels = jnp.where(label_valid, labels, jnp.zeros((), labels.dtype))
  log_q = _log_targets(labels, num_classes, correct_probability, logits.dtype)
  log_q = jnp.moveaxis(log_q, -1, axis)
  # log q / T is finite except for a = 1, where the wrong classes are -inf
  # and contribute exactly zero; the KL of the logit pair is accurate at
  # any temperature (see kd_loss).
  loss = _soft_target.kl_from_logits(log_q, logits, temperature, axis)
  loss = jnp.where(label_valid, loss, jnp.full((), jnp.nan, loss.dtype))
  temperature = jnp.asarray(temperature).astype(loss.dtype)
  return v.nan_unless(valid, v.apply_where(temperature**2 * loss, where))
