"""Trace-time argument checks of the language-model losses.

Each check looks only at shapes, dtypes and Python-level values, so a bad
call fails before anything is compiled; a value that is traced (a schedule's
temperature inside ``jax.jit``) cannot be inspected and passes unchecked, and
the losses turn it into ``nan`` where it is out of range.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def describe(x: Any) -> str:
  """``"array of shape (2, 3) and dtype float32"``, or the Python value."""
  shape = getattr(x, "shape", None)
  if shape is None:
    return f"{type(x).__name__} {x!r}"
  return f"array of shape {tuple(shape)} and dtype {getattr(x, 'dtype', None)}"


def concrete(x: Any) -> np.ndarray | None:
  """``x`` as a NumPy array when it is known at trace time, else ``None``."""
  if isinstance(x, jax.core.Tracer):
    return None
  try:
    return np.asarray(x)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return None


def floating(name: str, x: Any) -> None:
  """Raises ``TypeError`` unless ``x`` is an array of a floating dtype."""
  dtype = getattr(x, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f"`{name}` must be a floating-point array, got {describe(x)}."
    )


def integer(name: str, x: Any) -> None:
  """Raises ``TypeError`` unless ``x`` is an array of an integer dtype."""
  dtype = getattr(x, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
    raise TypeError(f"`{name}` must be an integer array, got {describe(x)}.")


def boolean_mask(name: str, mask: Any, shape: tuple[int, ...]) -> jax.Array:
  """Checks that ``mask`` is boolean and of exactly ``shape``; returns it."""
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    raise TypeError(f"`{name}` must be a boolean mask, got {describe(mask)}.")
  if tuple(mask.shape) != tuple(shape):
    raise ValueError(
        f"`{name}` must have shape {tuple(shape)}, got {tuple(mask.shape)}."
    )
  return mask


def rank(name: str, x: Any, ranks: int | tuple[int, ...]) -> None:
  """Raises ``ValueError`` unless ``x.ndim`` is one of ``ranks``."""
  ranks = (ranks,) if isinstance(ranks, int) else tuple(ranks)
  if x.ndim not in ranks:
    expected = " or ".join(str(r) for r in ranks)
    raise ValueError(
        f"`{name}` must have rank {expected}, got shape {tuple(x.shape)}."
    )


def min_rank(name: str, x: Any, minimum: int) -> None:
  """Raises ``ValueError`` if ``x`` has fewer than ``minimum`` dimensions."""
  if x.ndim < minimum:
    raise ValueError(
        f"`{name}` must have at least {minimum} dimension(s), got shape"
        f" {tuple(x.shape)}."
    )


def positive_int(name: str, value: Any) -> int:
  """Returns ``value`` as an ``int`` >= 1, or raises naming ``name``."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"`{name}` must be a Python int, got {value!r}.")
  if value < 1:
    raise ValueError(f"`{name}` must be >= 1, got {value}.")
  return int(value)


def choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
  """Raises ``ValueError`` unless ``value`` is one of ``choices``."""
  if not isinstance(value, str) or value not in choices:
    raise ValueError(
        f"`{name}` must be one of {', '.join(map(repr, choices))}; got"
        f" {value!r}."
    )


def positive(name: str, value: Any) -> None:
  """Raises ``ValueError`` if a concrete ``value`` is not strictly positive."""
  known = concrete(value)
  if known is not None and not np.all(known > 0):
    raise ValueError(f"`{name}` must be > 0, got {value!r}.")


def unit_interval(name: str, value: Any) -> None:
  """Raises ``ValueError`` if a concrete ``value`` lies outside ``[0, 1]``."""
  known = concrete(value)
  if known is not None and not np.all((known >= 0) & (known <= 1)):
    raise ValueError(f"`{name}` must lie in [0, 1], got {value!r}.")


def compute_dtype(*arrays: Any) -> jnp.dtype:
  """float64 if any input is 64-bit, else float32 (16-bit inputs included)."""
  widest = max(jnp.dtype(a.dtype).itemsize for a in arrays)
  return jnp.dtype(jnp.float64 if widest > 4 else jnp.float32)


def nan_unless(ok: jax.Array, value: jax.Array) -> jax.Array:
  """``value`` where ``ok``, else ``nan``: a traced bad value shows."""
  return jnp.where(ok, value, jnp.full((), jnp.nan, value.dtype))
