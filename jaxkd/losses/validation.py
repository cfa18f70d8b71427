"""The argument checks the losses use, offered to extensions.

``jaxkd.losses``, ``jaxkd.lm`` and the methods validate their arguments with
these helpers, and a loss written outside the package can use them to fail
the same way. Every check runs at trace time on shapes, dtypes and Python-level values, so a
bad call fails before anything is compiled. Values that are traced (for
example a temperature produced by a schedule inside ``jax.jit``) cannot be
inspected at trace time: the value checks then return a traced boolean, and
the loss passes its result through :func:`nan_unless`, so an invalid traced
value gives ``nan`` rather than a plausible number.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

__all__ = [
    "all_valid",
    "apply_where",
    "as_compute_dtype",
    "broadcast_where",
    "check_boolean_mask",
    "check_choice",
    "check_floating",
    "check_in_unit_interval",
    "check_int",
    "check_integer",
    "check_min_rank",
    "check_non_negative",
    "check_positive",
    "check_rank",
    "check_same_shape",
    "compute_dtype",
    "concrete_value",
    "describe",
    "example_where",
    "nan_unless",
    "nan_where_nan",
    "normalize_axis",
    "zero_masked_examples",
]


def describe(x: Any) -> str:
  """``"array of shape (2, 3) and dtype float32"``, or the Python value."""
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
        f" {describe(x)}. Cast it, e.g. `{name}.astype(jnp.float32)`."
    )


def check_integer(name: str, x: Any) -> None:
  """Raises ``TypeError`` unless ``x`` is an array of an integer dtype."""
  dtype = getattr(x, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
    raise TypeError(
        f"`{name}` must be an integer array, got {describe(x)}."
    )


def concrete_value(x: Any) -> np.ndarray | None:
  """Returns ``x`` as a NumPy array when it is known at trace time."""
  if isinstance(x, jax.core.Tracer):
    return None
  try:
    return np.asarray(x)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return None


def _value_check(
    name: str, value: Any, ok: Any, expected: str
) -> bool | jax.Array:
  """Raises for a concrete invalid ``value``; else returns its validity.

  ``ok`` maps an array (NumPy for a concrete value, jax for a traced one) to
  an elementwise boolean. A concrete valid value gives ``True``; a traced
  one gives a traced scalar boolean for :func:`nan_unless`.
  """
  concrete = concrete_value(value)
  if concrete is not None:
    if not np.issubdtype(concrete.dtype, np.number) or (
        np.issubdtype(concrete.dtype, np.complexfloating)
    ):
      raise TypeError(f"`{name}` must be a real number, got {value!r}.")
    with np.errstate(invalid="ignore"):
      valid = bool(np.all(ok(concrete)))
    if not valid:
      raise ValueError(f"`{name}` must be {expected}, got {value!r}.")
    return True
  return jnp.all(ok(jnp.asarray(value)))


def check_positive(name: str, value: Any) -> bool | jax.Array:
  """Checks that ``value`` is finite and > 0.

  Raises ``ValueError`` when a concrete ``value`` is not; returns ``True``
  for a concrete valid value and a traced boolean for a traced one (pass it
  to :func:`nan_unless`).
  """
  return _value_check(
      name, value, lambda x: (x > 0) & (x < np.inf), "a finite number > 0"
  )


def check_non_negative(name: str, value: Any) -> bool | jax.Array:
  """Checks that ``value`` is finite and >= 0 (see :func:`check_positive`)."""
  return _value_check(
      name, value, lambda x: (x >= 0) & (x < np.inf), "a finite number >= 0"
  )


def check_in_unit_interval(name: str, value: Any) -> bool | jax.Array:
  """Checks that ``value`` lies in ``[0, 1]`` (see :func:`check_positive`)."""
  return _value_check(
      name, value, lambda x: (x >= 0) & (x <= 1), "in [0, 1]"
  )


def nan_unless(valid: Any, value: Any) -> jax.Array:
  """``value`` where ``valid`` holds, ``nan`` elsewhere (broadcast).

  The loss-side half of the value checks: ``valid`` is what the checks
  return (``True`` for concrete values, a traced boolean otherwise), so a
  traced invalid temperature or weight turns every example of the loss into
  ``nan`` instead of a plausible number. A Python ``True`` returns ``value``
  unchanged.
  """
  value = jnp.asarray(value)
  if valid is True:
    return value
  return jnp.where(valid, value, jnp.full((), jnp.nan, value.dtype))


def all_valid(*checks: Any) -> bool | jax.Array:
  """The conjunction of check results (``True`` when all are concrete)."""
  traced = [c for c in checks if c is not True]
  if not traced:
    return True
  result = traced[0]
  for c in traced[1:]:
    result = result & c
  return result


def nan_where_nan(loss: Array, *arrays: Any, axis: int | None) -> Array:
  """``nan`` for every example whose inputs hold a ``nan``.

  Each of ``arrays`` has the per-example shape of ``loss`` plus, when
  ``axis`` is not ``None``, a class axis at ``axis`` (reduced with ``any``).
  A final guard: the losses compute through masks that give impossible
  classes exactly zero weight, and this keeps a ``nan`` input from ever
  being read as an impossible class (or as an infinite divergence).
  """
  flag = None
  for x in arrays:
    bad = jnp.isnan(x)
    if axis is not None:
      bad = jnp.any(bad, axis=axis)
    flag = bad if flag is None else flag | bad
  if flag is None:
    return loss
  return jnp.where(flag, jnp.full((), jnp.nan, loss.dtype), loss)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
  """Raises ``ValueError`` unless ``value`` is one of the strings ``choices``."""
  if not isinstance(value, str) or value not in choices:
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


def check_int(name: str, value: Any, *, minimum: int = 1) -> int:
  """Returns the Python-level ``value`` as an ``int`` >= ``minimum``.

  For sizes and counts given as Python ints (not arrays): a ``bool`` or a
  non-integer raises ``TypeError``, a smaller int ``ValueError``, each naming
  ``name``.
  """
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"`{name}` must be a Python int, got {value!r}.")
  if value < minimum:
    raise ValueError(f"`{name}` must be >= {minimum}, got {value!r}.")
  return int(value)


def check_boolean_mask(
    name: str, mask: Any, shape: tuple[int, ...]
) -> jax.Array:
  """Checks that ``mask`` is boolean and of exactly ``shape``; returns it."""
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    raise TypeError(f"`{name}` must be a boolean mask, got {describe(mask)}.")
  if tuple(mask.shape) != tuple(shape):
    raise ValueError(
        f"`{name}` must have shape {tuple(shape)}, got {tuple(mask.shape)}."
    )
  return mask


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


def broadcast_where(
    where: Any,
    shape: tuple[int, ...],
    *,
    name: str = "where",
    target: str = "per-example loss shape",
) -> jax.Array | None:
  """Checks a boolean mask and broadcasts it to ``shape`` (``None`` stays).

  ``name`` is the argument's name and ``target`` what ``shape`` is, for the
  error messages.
  """
  if where is None:
    return None
  where = jnp.asarray(where)
  if where.dtype != jnp.bool_:
    raise TypeError(
        f"`{name}` must be a boolean mask, got {describe(where)}."
    )
  if len(where.shape) > len(shape):
    raise ValueError(
        f"`{name}` of shape {tuple(where.shape)} has more dimensions than the"
        f" {target} {tuple(shape)}."
    )
  try:
    broadcast = np.broadcast_shapes(where.shape, shape)
  except ValueError:
    broadcast = None
  if broadcast != tuple(shape):
    raise ValueError(
        f"`{name}` of shape {tuple(where.shape)} does not broadcast to the"
        f" {target} {tuple(shape)}."
    )
  return jnp.broadcast_to(where, shape)


def example_where(where: Any, x: Any, axis: int) -> jax.Array | None:
  """:func:`broadcast_where` to the per-example shape of ``x``.

  The per-example shape is ``x``'s shape without its class axis ``axis``
  (non-negative).
  """
  shape = tuple(d for i, d in enumerate(x.shape) if i != axis)
  return broadcast_where(where, shape)


def zero_masked_examples(
    x: jax.Array, where: jax.Array | None, axis: int
) -> jax.Array:
  """``x`` with the examples that ``where`` masks out set to 0.

  ``where`` has ``x``'s per-example shape (class axis ``axis`` removed).
  Whatever a masked example held (``nan``, ``inf``) then reaches neither the
  value nor the gradient.
  """
  if where is None:
    return x
  return jnp.where(jnp.expand_dims(where, axis), x, jnp.zeros((), x.dtype))


def apply_where(loss: jax.Array, where: jax.Array | None) -> jax.Array:
  """Zeros the per-example ``loss`` where the mask is ``False``."""
  if where is None:
    return loss
  return jnp.where(where, loss, jnp.zeros((), loss.dtype))
