"""Argument checks shared by the loss modules.

Every check runs at trace time on shapes, dtypes and Python-level values, so a
bad call fails before anything is compiled. Values that are traced (for
example a temperature produced by a schedule inside ``jax.jit``) cannot be
inspected and are passed through unchecked.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _describe(x: Any) -> str:
  shape = getattr(x, "shape", None)
  dtype = getattr(x, "dtype", None)
  if shape is None:
    return f"{type(x).__name__} {x!r}"
  return f"array of shape {tuple(shape)} and dtype {dtype}"


def check_floating(name: str, x: Any) -> None:
  """Raises ``TypeError`` unless ``x`` is an array of a floating dtype."""
  dtype = getattr(x, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f"`{name}` must be a floating-point array (logits, features), got"
        f" {_describe(x)}. Cast it, e.g. `{name}.astype(jnp.float32)`."
    )


def check_integer(name: str, x: Any) -> None:
  """Raises ``TypeError`` unless ``x`` is an array of an integer dtype."""
  dtype = getattr(x, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
    raise TypeError(
        f"`{name}` must be an integer array, got {_describe(x)}."
    )


def concrete_value(x: Any) -> np.ndarray | None:
  """Returns ``x`` as a NumPy array when it is known at trace time."""
  if isinstance(x, jax.core.Tracer):
    return None
  try:
    return np.asarray(x)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return None


def check_positive(name: str, value: Any) -> None:
  """Raises ``ValueError`` if a concrete ``value`` is not strictly positive."""
  concrete = concrete_value(value)
  if concrete is not None and not np.all(concrete > 0):
    raise ValueError(f"`{name}` must be > 0, got {value!r}.")


def check_non_negative(name: str, value: Any) -> None:
  """Raises ``ValueError`` if a concrete ``value`` is negative."""
  concrete = concrete_value(value)
  if concrete is not None and not np.all(concrete >= 0):
    raise ValueError(f"`{name}` must be >= 0, got {value!r}.")


def check_in_unit_interval(name: str, value: Any) -> None:
  """Raises ``ValueError`` if a concrete ``value`` lies outside ``[0, 1]``."""
  concrete = concrete_value(value)
  if concrete is not None and not np.all((concrete >= 0) & (concrete <= 1)):
    raise ValueError(f"`{name}` must lie in [0, 1], got {value!r}.")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
  """Raises ``ValueError`` unless ``value`` is one of ``choices``."""
  if value not in choices:
    raise ValueError(
        f"`{name}` must be one of {', '.join(map(repr, choices))}; got"
        f" {value!r}."
    )


def check_same_shape(name_a: str, a: Any, name_b: str, b: Any) -> None:
  """Raises ``ValueError`` unless ``a`` and ``b`` have the same shape."""
  if tuple(a.shape) != tuple(b.shape):
    raise ValueError(
        f"`{name_a}` and `{name_b}` must have the same shape, got"
        f" {tuple(a.shape)} and {tuple(b.shape)}."
    )


def check_rank(name: str, x: Any, rank: int | tuple[int, ...]) -> None:
  """Raises ``ValueError`` unless ``x.ndim`` is ``rank`` (or one of them)."""
  ranks = (rank,) if isinstance(rank, int) else tuple(rank)
  if x.ndim not in ranks:
    expected = " or ".join(str(r) for r in ranks)
    raise ValueError(
        f"`{name}` must have rank {expected}, got shape {tuple(x.shape)}."
    )


def check_min_rank(name: str, x: Any, rank: int) -> None:
  """Raises ``ValueError`` if ``x`` has fewer than ``rank`` dimensions."""
  if x.ndim < rank:
    raise ValueError(
        f"`{name}` must have at least {rank} dimension(s), got shape"
        f" {tuple(x.shape)}."
    )


def normalize_axis(name: str, x: Any, axis: int) -> int:
  """Returns ``axis`` as a non-negative index into ``x``'s dimensions."""
  if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
    raise TypeError(f"`axis` must be an int, got {axis!r}.")
  if not -x.ndim <= axis < x.ndim:
    raise ValueError(
        f"`axis`={axis} is out of range for `{name}` of shape"
        f" {tuple(x.shape)}."
    )
  return int(axis) % x.ndim


def compute_dtype(*arrays: Any) -> jnp.dtype:
  """The floating dtype a loss computes in: the widest input, >= float32.

  bfloat16 and float16 inputs are computed (and returned) in float32; float64
  inputs stay float64 when x64 is enabled.
  """
  # Chosen by width rather than `jnp.promote_types`, which refuses mixed
  # float32/float64 inputs under strict dtype promotion.
  widest = max(jnp.dtype(a.dtype).itemsize for a in arrays)
  return jnp.dtype(jnp.float64 if widest > 4 else jnp.float32)


def as_compute_dtype(*arrays: Any) -> tuple[jax.Array, ...]:
  """Casts every array to :func:`compute_dtype` of all of them."""
  dtype = compute_dtype(*arrays)
  return tuple(jnp.asarray(a).astype(dtype) for a in arrays)


def broadcast_where(where: Any, shape: tuple[int, ...]) -> jax.Array | None:
  """Checks a per-example boolean mask and broadcasts it to ``shape``."""
  if where is None:
    return None
  where = jnp.asarray(where)
  if where.dtype != jnp.bool_:
    raise TypeError(
        f"`where` must be a boolean mask, got {_describe(where)}."
    )
  try:
    np.broadcast_shapes(where.shape, shape)
  except ValueError:
    raise ValueError(
        f"`where` of shape {tuple(where.shape)} does not broadcast to the"
        f" per-example loss shape {tuple(shape)}."
    ) from None
  if len(where.shape) > len(shape):
    raise ValueError(
        f"`where` of shape {tuple(where.shape)} has more dimensions than the"
        f" per-example loss shape {tuple(shape)}."
    )
  return jnp.broadcast_to(where, shape)


def apply_where(loss: jax.Array, where: jax.Array | None) -> jax.Array:
  """Zeros the per-example ``loss`` where the mask is ``False``."""
  if where is None:
    return loss
  return jnp.where(where, loss, jnp.zeros((), loss.dtype))
