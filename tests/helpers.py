"""Checks shared by the loss tests: second routes to the same number."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest


def assert_close(actual: Any, expected: Any, *, rtol: float, atol: float = 0.0):
  """``np.testing.assert_allclose`` on every leaf of two pytrees."""
  jax.tree.map(
      lambda a, e: np.testing.assert_allclose(
          np.asarray(a, np.float64), np.asarray(e, np.float64), rtol=rtol,
          atol=atol,
      ),
      actual,
      expected,
  )


def assert_jit_matches_eager(fn: Callable[..., Any], *args: Any, **kwargs: Any):
  """``jax.jit(fn)`` gives the eager result (to float rounding)."""
  eager = fn(*args, **kwargs)
  jitted = jax.jit(lambda *a: fn(*a, **kwargs))(*args)
  assert_close(jitted, eager, rtol=1e-6, atol=1e-6)


def assert_where_matches_slicing(
    fn: Callable[..., jax.Array],
    arrays: tuple[jax.Array, ...],
    where: np.ndarray,
    **kwargs: Any,
):
  """``fn(*arrays, where=m)[m]`` equals ``fn(*[a[m] for a in arrays])``.

  ``where`` is a boolean mask over the leading (per-example) dimensions that
  every array shares. Masked-out entries must be exactly zero.
  """
  masked = fn(*arrays, where=jnp.asarray(where), **kwargs)
  sliced = fn(*(a[where] for a in arrays), **kwargs)
  assert_close(masked[where], sliced, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(masked)[~where], 0.0)


def assert_axis_matches_moveaxis(
    fn: Callable[..., jax.Array],
    arrays: tuple[jax.Array, ...],
    axis: int,
    **kwargs: Any,
):
  """``fn(*arrays, axis=axis)`` equals ``fn`` on arrays with ``axis`` moved last.

  ``arrays`` hold the class axis at position ``axis``.
  """
  along_axis = fn(*arrays, axis=axis, **kwargs)
  moved = fn(*(jnp.moveaxis(a, axis, -1) for a in arrays), axis=-1, **kwargs)
  assert_close(along_axis, moved, rtol=1e-6, atol=1e-7)


def assert_float32_matches_reference(
    fn: Callable[..., jax.Array],
    reference: Callable[..., Any],
    *arrays: Any,
    rtol: float = 1e-5,
    atol: float = 0.0,
    **kwargs: Any,
):
  """16-bit (or float32) inputs give a float32 ``fn`` close to ``reference``.

  ``reference`` is a float64 NumPy formula, evaluated on the inputs as they
  were rounded, so the check is float32 accuracy, not input rounding. Both
  get ``kwargs``.
  """
  actual = fn(*arrays, **kwargs)
  assert actual.dtype == jnp.float32, actual.dtype
  expected = reference(*(np.asarray(a, np.float64) for a in arrays), **kwargs)
  assert_close(actual, expected, rtol=rtol, atol=atol)


def assert_jit_where_axis(
    fn: Callable[..., jax.Array],
    student: np.ndarray,
    teacher: np.ndarray,
    where: np.ndarray,
    **kwargs: Any,
):
  """The three conventions of a logit-pair loss on ``[4, 3, C]`` inputs.

  jit equals eager, ``where`` equals slicing, and ``axis=1`` equals the
  class axis moved last.
  """
  assert_jit_matches_eager(fn, student, teacher, **kwargs)
  assert_where_matches_slicing(fn, (student, teacher), where, **kwargs)
  assert_axis_matches_moveaxis(
      fn, (np.moveaxis(student, -1, 1), np.moveaxis(teacher, -1, 1)), axis=1,
      **kwargs,
  )


# Bad (student, teacher) logit-pair arguments: ``(kwargs, student_shape,
# student_dtype, error, match)`` for a teacher of shape ``(2, 4)``.
LOGIT_PAIR_ERRORS = [
    ({}, (2, 3), jnp.float32, ValueError, "same shape"),
    ({}, (2, 4), jnp.int32, TypeError, "student_logits"),
    (dict(axis=2), (2, 4), jnp.float32, ValueError, "axis"),
    (dict(where=jnp.ones(2)), (2, 4), jnp.float32, TypeError, "where"),
    (dict(where=jnp.ones(5, bool)), (2, 4), jnp.float32, ValueError, "where"),
]


def assert_logit_pair_error(fn, kwargs, student_shape, student_dtype, error,
                            match):
  """``fn`` under ``jax.jit`` raises ``error`` (``match``) at trace time."""
  student = jnp.zeros(student_shape, student_dtype)
  teacher = jnp.zeros((2, 4))
  with pytest.raises(error, match=match):
    jax.jit(lambda s, t: fn(s, t, **kwargs))(student, teacher)


def assert_finite_value_and_grad(
    fn: Callable[..., jax.Array], *args: jax.Array, argnums=(0, 1)
):
  """The summed loss and its gradient w.r.t. ``argnums`` are all finite."""
  value, grads = jax.value_and_grad(
      lambda *a: jnp.sum(fn(*a)), argnums=argnums
  )(*args)
  assert np.all(np.isfinite(np.asarray(value, np.float64))), value
  for g in jax.tree.leaves(grads):
    assert np.all(np.isfinite(np.asarray(g, np.float64))), g
