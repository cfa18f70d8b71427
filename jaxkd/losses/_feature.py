"""Feature-map distillation losses: hints, attention transfer and NST.

Feature maps are channels-last, ``[..., height, width, channels]`` (NHWC), and
embeddings are ``[batch, features]``. Every loss here is per-example: it
returns one value per example and leaves the reduction over the batch to the
caller. bfloat16 and float16 features are computed in float32.

Normalisations use :func:`safe_l2_normalize`, which divides by the exact norm
(no epsilon) and maps an all-zero vector to zero with a finite gradient.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxkd.losses import validation as v

Array = jax.Array
ArrayLike = Any

# Losses are small next to the networks that produce their inputs; ask for
# full float32 matmuls so that no backend silently uses reduced precision
# (TF32 on recent GPUs) inside differences of nearly equal terms.
_PRECISION = jax.lax.Precision.HIGHEST

_HINT_KINDS = ("mse", "l1", "cosine")


def safe_l2_normalize(x: Array, axis: int) -> Array:
  """``x / ||x||_2`` along ``axis``; an all-zero vector maps to zero.

  The norm is ``sqrt(sum x^2)`` exactly, with no epsilon. For an all-zero
  vector the ``sqrt`` sees the constant 1 instead of 0 (a ``where`` before the
  ``sqrt``), so the value is ``0 / 1 = 0`` and the gradient is finite instead
  of ``0 * inf``. This is what PyTorch's ``F.normalize`` gives for a zero
  vector, without its ``eps`` floor on small non-zero norms.
  """
  squared_norm = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  nonzero = squared_norm != 0  # nan stays nan
  one = jnp.ones((), squared_norm.dtype)
  return x / jnp.sqrt(jnp.where(nonzero, squared_norm, one))


def safe_norm(x: Array, axis: int) -> Array:
  """``||x||_2`` along ``axis``, exactly 0 with a finite gradient at 0.

  The double ``where`` keeps the ``sqrt`` away from 0 in both passes: the
  value at an all-zero vector is 0 and its gradient is 0 instead of ``nan``.
  """
  squared_norm = jnp.sum(jnp.square(x), axis=axis)
  positive = squared_norm != 0  # nan stays nan
  one = jnp.ones((), squared_norm.dtype)
  root = jnp.sqrt(jnp.where(positive, squared_norm, one))
  return jnp.where(positive, root, jnp.zeros((), root.dtype))


def prepare_feature_pair(
    student_name: str,
    student: Any,
    teacher_name: str,
    teacher: Any,
    *,
    advice: str,
) -> tuple[Array, Array]:
  """Checks two floating arrays of one shape (rank >= 2); casts them.

  Returns both in the compute dtype. A shape mismatch raises ``ValueError``
  naming both arguments and ending with ``advice`` (how to project one onto
  the other).
  """
  v.check_floating(student_name, student)
  v.check_floating(teacher_name, teacher)
  v.check_min_rank(student_name, student, 2)
  if tuple(student.shape) != tuple(teacher.shape):
    raise ValueError(
        f"`{student_name}` and `{teacher_name}` must have the same shape, got"
        f" {tuple(student.shape)} and {tuple(teacher.shape)}. {advice}"
    )
  return v.as_compute_dtype(student, teacher)


def mask_examples(x: Array, where: Array | None) -> Array:
  """Zeros the examples of ``x`` where the leading-shape mask is ``False``.

  ``where`` covers the leading ``where.ndim`` axes of ``x``. Whatever a
  masked-out example held (``nan``, ``inf``) then reaches neither the value
  nor the gradient.
  """
  if where is None:
    return x
  mask = where.reshape(where.shape + (1,) * (x.ndim - where.ndim))
  return jnp.where(mask, x, jnp.zeros((), x.dtype))


def _check_feature_maps(student_features: Any, teacher_features: Any) -> None:
  """Checks a pair of ``[..., H, W, C]`` maps that may differ in ``H, W, C``."""
  v.check_floating("student_features", student_features)
  v.check_floating("teacher_features", teacher_features)
  v.check_min_rank("student_features", student_features, 3)
  v.check_min_rank("teacher_features", teacher_features, 3)
  s_lead = tuple(student_features.shape[:-3])
  t_lead = tuple(teacher_features.shape[:-3])
  if s_lead != t_lead:
    raise ValueError(
        "`student_features` and `teacher_features` must share the leading"
        " (batch) shape before [height, width, channels], got shapes"
        f" {tuple(student_features.shape)} and"
        f" {tuple(teacher_features.shape)}."
    )


def _average_pool_to(x: Array, size: tuple[int, int]) -> Array:
  """Average-pools ``[..., H, W, C]`` to ``size`` with non-overlapping windows.

  ``size`` divides ``(H, W)`` exactly, so this equals PyTorch's
  ``adaptive_avg_pool2d`` to that size.
  """
  height, width = x.shape[-3:-1]
  out_height, out_width = size
  if (height, width) == (out_height, out_width):
    return x
  x = x.reshape(
      x.shape[:-3]
      + (out_height, height // out_height, out_width, width // out_width)
      + x.shape[-1:]
  )
  return jnp.mean(x, axis=(-4, -2))


def _match_spatial_sizes(
    student_features: Array, teacher_features: Array
) -> tuple[Array, Array]:
  """Pools the larger spatial size down to the smaller one, axis by axis."""
  s_size = tuple(student_features.shape[-3:-1])
  t_size = tuple(teacher_features.shape[-3:-1])
  if s_size == t_size:
    return student_features, teacher_features
  target = (min(s_size[0], t_size[0]), min(s_size[1], t_size[1]))
  for size in (s_size, t_size):
    if size[0] % target[0] or size[1] % target[1]:
      raise ValueError(
          "The spatial sizes (height, width) of `student_features`"
          f" {s_size} and `teacher_features` {t_size} differ, and the larger"
          " is not an integer multiple of the smaller along each axis, so"
          " neither can be average-pooled to the other. Resize one of them"
          " (or use an adaptor) first."
      )
  return (
      _average_pool_to(student_features, target),
      _average_pool_to(teacher_features, target),
  )


def hint_loss(
    student_features: ArrayLike,
    teacher_features: ArrayLike,
    *,
    kind: str = "mse",
    where: ArrayLike | None = None,
) -> Array:
  r"""FitNets hint loss between (adapted) student and teacher features.

  The student's features are first projected to the teacher's shape by an
  adaptor (the FitNets "regressor"); the loss then compares the two
  element-wise. It reduces over every axis except the first (batch) axis:

  .. math::
    \text{mse:}\; \frac{1}{n}\sum_k (s_k - t_k)^2, \qquad
    \text{l1:}\; \frac{1}{n}\sum_k |s_k - t_k|, \qquad
    \text{cosine:}\; \frac{1}{m}\sum_{\text{positions}}
      \Big(1 - \frac{s \cdot t}{\|s\|\,\|t\|}\Big)

  where :math:`n` is the number of elements of one example and the cosine is
  taken along the last (channel/feature) axis and averaged over the
  :math:`m` other non-batch positions. An all-zero feature vector has cosine
  similarity 0 with anything (loss 1) and a finite gradient.

  Args:
    student_features: Floating features of shape ``[batch, ...]`` (rank >= 2),
      e.g. ``[batch, height, width, channels]`` or ``[batch, features]``,
      already projected to the teacher's shape.
    teacher_features: Floating features of exactly the same shape.
    kind: ``"mse"`` (the FitNets loss, up to a constant factor), ``"l1"`` or
      ``"cosine"``.
    where: Optional boolean mask broadcastable to ``[batch]``; masked-out
      examples give 0 and no gradient.

  Returns:
    The per-example loss, shape ``[batch]``; float32 for bfloat16 and float16
    inputs.

  Raises:
    ValueError: If the shapes differ (project the student's features with
      ``jaxkd.adaptors`` first), the rank is below 2 or ``kind`` is unknown.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses
    >>> student = jnp.array([[1.0, 2.0], [0.0, 1.0]])
    >>> teacher = jnp.array([[1.0, 0.0], [0.0, 3.0]])
    >>> print(losses.hint_loss(student, teacher).round(4))
    [2. 2.]
    >>> print(losses.hint_loss(student, teacher, kind="cosine").round(4))
    [0.5528 0.    ]

  References:
    Romero, Ballas, Kahou, Chassang, Gatta and Bengio, `FitNets: Hints for
    Thin Deep Nets <https://arxiv.org/abs/1412.6550>`_, 2015.

  .. versionadded:: 0.1.0
  """
  v.check_choice("kind", kind, _HINT_KINDS)
  student, teacher = prepare_feature_pair(
      "student_features", student_features, "teacher_features",
      teacher_features,
      advice="Project the student's features to the teacher's shape with an"
      " adaptor from `jaxkd.adaptors`.",
  )
  where = v.broadcast_where(where, student.shape[:1])
  student = mask_examples(student, where)
  teacher = mask_examples(teacher, where)
  feature_axes = tuple(range(1, student.ndim))
  if kind == "mse":
    loss = jnp.mean(jnp.square(student - teacher), axis=feature_axes)
  elif kind == "l1":
    loss = jnp.mean(jnp.abs(student - teacher), axis=feature_axes)
  else:
    cosine = jnp.sum(
        safe_l2_normalize(student, -1) * safe_l2_normalize(teacher, -1),
        axis=-1,
    )
    loss = jnp.mean(1 - cosine, axis=feature_axes[:-1])
  return v.apply_where(loss, where)


def _attention_map(features: Array, p: ArrayLike) -> Array:
  """``[..., H, W, C]`` -> normalised ``mean_c |f|^p``, shape ``[..., HW]``."""
  if isinstance(p, (int, float)) and float(p) == 2.0:
    powered = jnp.square(features)
  elif isinstance(p, (int, float)) and float(p).is_integer():
    powered = jnp.abs(features) ** int(p)
  else:
    powered = jnp.abs(features) ** jnp.asarray(p).astype(features.dtype)
  attention = jnp.mean(powered, axis=-1)
  attention = attention.reshape(attention.shape[:-2] + (-1,))
  return safe_l2_normalize(attention, -1)


def attention_transfer_loss(
    student_features: ArrayLike,
    teacher_features: ArrayLike,
    *,
    p: ArrayLike = 2,
    where: ArrayLike | None = None,
) -> Array:
  r"""Attention transfer: match L2-normalised spatial attention maps.

  The attention map of a feature map :math:`F \in \mathbb{R}^{H \times W
  \times C}` is the channel mean of :math:`|F|^p`, flattened over the
  :math:`HW` positions and L2-normalised:

  .. math::
    a = \frac{q}{\|q\|_2}, \quad q_{hw} = \frac{1}{C}\sum_c |F_{hwc}|^p,
    \qquad
    \mathcal{L}_{AT} = \frac{1}{HW}\sum_{hw} (a^S_{hw} - a^T_{hw})^2

  This is the per-example form of the widely used RepDistiller
  implementation (``(at(f_s) - at(f_t)).pow(2).mean()``); for even ``p`` its
  ``f.pow(p)`` equals :math:`|F|^p`. Channel counts may differ. If the
  spatial sizes differ, each spatial axis of the larger map is average-pooled
  (non-overlapping windows, before the power) down to the smaller size, which
  must divide it exactly. An all-zero attention map stays zero, with a finite
  gradient.

  Args:
    student_features: Floating features of shape ``[..., H_s, W_s, C_s]``.
    teacher_features: Floating features of shape ``[..., H_t, W_t, C_t]``
      with the same leading shape ``[...]``.
    p: The power :math:`p > 0` applied to the absolute activations; a
      Python number or a scalar array. At a zero activation the gradient is
      infinite for :math:`p < 1`, and so is the second derivative for a
      non-integer :math:`p < 2`; the paper's :math:`p = 2` is smooth.
    where: Optional boolean mask broadcastable to ``[...]``; masked-out
      examples give 0 and no gradient.

  Returns:
    The per-example loss, shape ``[...]``; float32 for bfloat16 and float16
    inputs.

  Raises:
    ValueError: If the leading shapes differ or the spatial sizes differ by a
      non-integer factor.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses
    >>> student = jnp.arange(16.0).reshape(1, 2, 2, 4)
    >>> teacher = jnp.ones((1, 4, 4, 8))
    >>> loss = losses.attention_transfer_loss(student, teacher)
    >>> print(loss.shape, f"{loss[0]:.4f}")
    (1,) 0.1265

  References:
    Zagoruyko and Komodakis, `Paying More Attention to Attention: Improving
    the Performance of Convolutional Neural Networks via Attention Transfer
    <https://arxiv.org/abs/1612.03928>`_, 2017.

  .. versionadded:: 0.1.0
  """
  _check_feature_maps(student_features, teacher_features)
  valid = v.check_positive("p", p)
  student, teacher = v.as_compute_dtype(student_features, teacher_features)
  student, teacher = _match_spatial_sizes(student, teacher)
  where = v.broadcast_where(where, student.shape[:-3])
  student = mask_examples(student, where)
  teacher = mask_examples(teacher, where)
  difference = _attention_map(student, p) - _attention_map(teacher, p)
  loss = jnp.mean(jnp.square(difference), axis=-1)
  return v.nan_unless(valid, v.apply_where(loss, where))


def nst_loss(
    student_features: ArrayLike,
    teacher_features: ArrayLike,
    *,
    where: ArrayLike | None = None,
) -> Array:
  r"""Neuron selectivity transfer: MMD between channel activation patterns.

  Each channel's spatial map, flattened over the :math:`HW` positions and
  L2-normalised, is one sample; the loss is the squared maximum mean
  discrepancy between the student's :math:`C_S` samples :math:`s_i` and the
  teacher's :math:`C_T` samples :math:`t_j` under the polynomial kernel
  :math:`k(x, y) = (x^\top y)^2`:

  .. math::
    \mathcal{L}_{NST} = \frac{1}{C_T^2}\sum_{j,j'} k(t_j, t_{j'})
      + \frac{1}{C_S^2}\sum_{i,i'} k(s_i, s_{i'})
      - \frac{2}{C_S C_T}\sum_{i,j} k(s_i, t_j)
    = \Big\| \frac{1}{C_S}\sum_i s_i s_i^\top
      - \frac{1}{C_T}\sum_j t_j t_j^\top \Big\|_F^2

  as in the RepDistiller ``NSTLoss`` (degree 2, no constant term), per
  example. The two forms are equal; the code evaluates whichever is cheaper
  for the shapes (the second, :math:`HW \times HW`, form is exactly
  non-negative; the first, built from :math:`C \times C` Gram matrices, can
  round to a value slightly below zero). Channel counts may differ; spatial
  sizes are matched by average pooling as in
  :func:`attention_transfer_loss`.

  Args:
    student_features: Floating features of shape ``[..., H_s, W_s, C_s]``.
    teacher_features: Floating features of shape ``[..., H_t, W_t, C_t]``
      with the same leading shape ``[...]``.
    where: Optional boolean mask broadcastable to ``[...]``; masked-out
      examples give 0 and no gradient.

  Returns:
    The per-example loss, shape ``[...]``; float32 for bfloat16 and float16
    inputs.

  Raises:
    ValueError: If the leading shapes differ or the spatial sizes differ by a
      non-integer factor.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses
    >>> student = jnp.arange(8.0).reshape(1, 2, 2, 2)
    >>> teacher = jnp.eye(4).reshape(1, 2, 2, 4)
    >>> loss = losses.nst_loss(student, teacher)
    >>> print(loss.shape, f"{loss[0]:.4f}")
    (1,) 0.7415

  References:
    Huang and Wang, `Like What You Like: Knowledge Distill via Neuron
    Selectivity Transfer <https://arxiv.org/abs/1707.01219>`_, 2017.

  .. versionadded:: 0.1.0
  """
  _check_feature_maps(student_features, teacher_features)
  student, teacher = v.as_compute_dtype(student_features, teacher_features)
  student, teacher = _match_spatial_sizes(student, teacher)
  where = v.broadcast_where(where, student.shape[:-3])
  student = mask_examples(student, where)
  teacher = mask_examples(teacher, where)
  # [..., HW, C]: one column per channel, normalised over the positions.
  student = safe_l2_normalize(
      student.reshape(student.shape[:-3] + (-1, student.shape[-1])), -2
  )
  teacher = safe_l2_normalize(
      teacher.reshape(teacher.shape[:-3] + (-1, teacher.shape[-1])), -2
  )
  loss = _polynomial_mmd(student, teacher)
  return v.apply_where(loss, where)


def _polynomial_mmd(student: Array, teacher: Array) -> Array:
  """Squared MMD with ``k(x, y) = (x . y)^2`` between the columns.

  ``student`` is ``[..., P, C_s]`` and ``teacher`` ``[..., P, C_t]``. The
  route is chosen statically by the number of multiply-adds.
  """
  positions, s_channels = student.shape[-2:]
  t_channels = teacher.shape[-1]
  second_moment_cost = positions * positions * (s_channels + t_channels)
  gram_cost = positions * (
      s_channels * s_channels + t_channels * t_channels
      + s_channels * t_channels
  )
  if second_moment_cost <= gram_cost:
    # ||S/C_s - T/C_t||_F^2 with S = sum_i s_i s_i^T: the difference is
    # formed before squaring, so equal inputs give exactly 0.
    moments = [
        jnp.einsum("...pc,...qc->...pq", x, x, precision=_PRECISION)
        / x.shape[-1]
        for x in (student, teacher)
    ]
    return jnp.sum(jnp.square(moments[0] - moments[1]), axis=(-2, -1))

  def mean_kernel(a: Array, b: Array) -> Array:
    gram = jnp.einsum("...pi,...pj->...ij", a, b, precision=_PRECISION)
    return jnp.mean(jnp.square(gram), axis=(-2, -1))

  return (
      mean_kernel(teacher, teacher)
      + mean_kernel(student, student)
      - 2 * mean_kernel(student, teacher)
  )
