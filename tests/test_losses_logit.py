"""Tests of the logit regression loss (Ba and Caruana, 2014)."""

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxkd import losses
from tests import helpers


def np_logit_regression(student, teacher, axis=-1):
  """Float64 reference: the mean over classes of the squared difference."""
  diff = np.asarray(student, np.float64) - np.asarray(teacher, np.float64)
  return np.sum(diff * diff, axis=axis) / diff.shape[axis]


def logits_pair(rng, shape=(4, 3, 7), scale=3.0, dtype=np.float64):
  student = (scale * rng.standard_normal(shape)).astype(dtype)
  teacher = (scale * rng.standard_normal(shape)).astype(dtype)
  return student, teacher


def test_matches_float64_reference(x64, rng):
  student, teacher = logits_pair(rng)
  actual = losses.logit_regression_loss(student, teacher)
  assert actual.dtype == jnp.float64
  assert actual.shape == (4, 3)
  expected = np_logit_regression(student, teacher)
  helpers.assert_close(actual, expected, rtol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_low_precision(rng, dtype):
  student, teacher = logits_pair(rng, dtype=np.float32)
  student, teacher = jnp.asarray(student, dtype), jnp.asarray(teacher, dtype)
  # 16-bit inputs are computed and returned in float32: float32 accuracy
  # against the reference of the rounded inputs.
  helpers.assert_float32_matches_reference(
      losses.logit_regression_loss, np_logit_regression, student, teacher
  )


def test_golden_values():
  student = jnp.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [2.0, -2.0, 1.0]])
  teacher = jnp.array([[1.0, 2.0, 6.0], [1.0, 1.0, 1.0], [2.0, -2.0, 1.0]])
  # (0 + 0 + 9) / 3 = 3; (1 + 1 + 1) / 3 = 1; equal logits give 0.
  np.testing.assert_array_equal(
      np.asarray(losses.logit_regression_loss(student, teacher)),
      [3.0, 1.0, 0.0],
  )


def test_mean_not_sum_over_classes(x64, rng):
  # Ba and Caruana's 1/2 sum_c (z_S - z_T)^2 is C / 2 times this loss.
  student, teacher = logits_pair(rng, shape=(3, 5))
  half_sum = 0.5 * np.sum((student - teacher) ** 2, axis=-1)
  helpers.assert_close(
      losses.logit_regression_loss(student, teacher) * 5 / 2, half_sum,
      rtol=1e-12,
  )


def test_not_shift_invariant():
  # Adding 2 to every student logit leaves the softmax unchanged but moves
  # every logit by 2 from the teacher's: the loss is 2^2 = 4, not 0.
  teacher = jnp.array([[0.5, -1.0, 3.0]])
  np.testing.assert_array_equal(
      np.asarray(losses.logit_regression_loss(teacher + 2.0, teacher)), [4.0]
  )


def test_grads(x64, rng):
  student, teacher = logits_pair(rng, shape=(2, 4))
  check_grads(
      losses.logit_regression_loss, (student, teacher), order=2, modes=["rev"]
  )
  # d/dz_S = 2 (z_S - z_T) / C.
  grad = jax.grad(lambda s: jnp.sum(losses.logit_regression_loss(s, teacher)))(
      student
  )
  helpers.assert_close(grad, 2 * (student - teacher) / 4, rtol=1e-12)


def test_jit_where_axis_vmap(rng):
  fn = losses.logit_regression_loss
  student, teacher = logits_pair(rng, dtype=np.float32)
  helpers.assert_jit_matches_eager(fn, student, teacher)
  where = rng.random((4, 3)) > 0.4
  helpers.assert_where_matches_slicing(fn, (student, teacher), where)
  helpers.assert_axis_matches_moveaxis(
      fn, (np.moveaxis(student, -1, 1), np.moveaxis(teacher, -1, 1)), axis=1
  )
  teachers = rng.standard_normal((3, 4, 3, 7)).astype(np.float32)
  vmapped = jax.vmap(fn, in_axes=(None, 0))(student, teachers)
  looped = jnp.stack([fn(student, t) for t in teachers])
  helpers.assert_close(vmapped, looped, rtol=1e-6)


def test_where_blocks_nan_rows():
  student = jnp.array([[1.0, 2.0], [jnp.nan, jnp.inf]])
  teacher = jnp.array([[0.0, 1.0], [jnp.inf, -jnp.inf]])
  where = jnp.array([True, False])
  value, grads = jax.value_and_grad(
      lambda s, t: jnp.sum(losses.logit_regression_loss(s, t, where=where)),
      argnums=(0, 1),
  )(student, teacher)
  assert value == 1.0
  for g in grads:
    np.testing.assert_array_equal(np.asarray(g[1]), [0.0, 0.0])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_extremes_are_finite(dtype):
  student = jnp.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 5.0]], dtype)
  teacher = jnp.array([[-1e4, 1e4, 0.0], [-1e4, 1e4, -5.0]], dtype)
  helpers.assert_finite_value_and_grad(
      losses.logit_regression_loss, student, teacher
  )
  # About (2e4)^2 * 2 / 3, well inside float32's range; compared with the
  # reference of the rounded inputs (bfloat16 stores 1e4 as 9984).
  helpers.assert_close(
      losses.logit_regression_loss(student, teacher),
      np_logit_regression(
          np.asarray(student, np.float64), np.asarray(teacher, np.float64)
      ),
      rtol=1e-6,
  )


# One fixed shape: every new shape would recompile every operation.
@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(
    hnp.arrays(np.float64, (2, 3, 5), elements=st.floats(-30, 30)),
    st.floats(-20, 20),
)
def test_properties(pair, shift):
  student, teacher = pair
  with jax.enable_x64(True):
    value = np.asarray(losses.logit_regression_loss(student, teacher))
    assert np.all(value >= 0)
    np.testing.assert_array_equal(
        np.asarray(losses.logit_regression_loss(teacher, teacher)), 0.0
    )
    # Symmetric in its two arguments.
    np.testing.assert_array_equal(
        np.asarray(losses.logit_regression_loss(teacher, student)), value
    )
    # A constant added to a row of equal logits costs exactly its square.
    np.testing.assert_allclose(
        np.asarray(losses.logit_regression_loss(teacher + shift, teacher)),
        shift**2, rtol=1e-12, atol=1e-12,
    )


@pytest.mark.parametrize(
    "kwargs, student_shape, student_dtype, error, match",
    helpers.LOGIT_PAIR_ERRORS,
)
def test_bad_input_raises_at_trace_time(
    kwargs, student_shape, student_dtype, error, match
):
  helpers.assert_logit_pair_error(
      losses.logit_regression_loss, kwargs, student_shape, student_dtype,
      error, match,
  )


def test_integer_teacher_and_temperature_rejected():
  with pytest.raises(TypeError, match="teacher_logits"):
    losses.logit_regression_loss(jnp.zeros((2, 4)), jnp.zeros((2, 4), int))
  with pytest.raises(TypeError, match="temperature"):
    losses.logit_regression_loss(
        jnp.zeros((2, 4)), jnp.zeros((2, 4)), temperature=2.0
    )
