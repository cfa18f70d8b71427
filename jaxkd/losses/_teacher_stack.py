r"""Checks of a stack of teachers' logits ``[K, ..., num_classes]``, and weights.

Shared by the ensemble targets (:mod:`jaxkd.losses._ensemble`) and the
multi-teacher loss (:mod:`jaxkd.losses._multi_teacher`): the stack's rank and
dtype, its match with the student's logits, the class axis counted in one
teacher's logits, and the per-teacher weights normalised to sum to 1.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.losses import validation as v

Array = jax.Array
ArrayLike = Any


def check_teacher_stack(teacher_logits: ArrayLike) -> None:
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


def check_teacher_matches_student(
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


def normalized_weights(
    weights: ArrayLike | None,
    *,
    num_teachers: int,
    per_example_shape: tuple[int, ...],
    dtype: jnp.dtype,
    where: Array | None = None,
) -> tuple[Array, Any]:
  """Checks ``weights`` and returns them as ``[K, *per_example_shape]``.

  Returns ``(weights, valid)``: the weights sum to one over the teacher
  axis, and ``valid`` is the check for :func:`validation.nan_unless` (a
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



def per_teacher_axis(teacher_logits: Array, axis: int) -> int:
  """Normalises ``axis``, counted in one teacher's logits ``[..., C]``."""
  one_teacher = jax.ShapeDtypeStruct(
      teacher_logits.shape[1:], teacher_logits.dtype
  )
  return v.normalize_axis("teacher_logits[k]", one_teacher, axis)
