"""Tests of the reverse KL, generalized JSD and total variation distance."""

import functools

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


# Independent float64 references, written from the formulas. Mixtures are
# formed in probability space here (the library works in log space), and
# 0 log 0 = 0 is applied with np.where.
def np_log_softmax(z, axis=-1):
  z = np.asarray(z, np.float64)
  shifted = z - np.max(z, axis=axis, keepdims=True)
  return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def np_probs(z, temperature=1.0):
  return np.exp(np_log_softmax(np.asarray(z, np.float64) / temperature))


def np_kl_probs(p, q):
  with np.errstate(divide="ignore", invalid="ignore"):
    terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
  return np.sum(terms, axis=-1)


def np_forward_kl(student, teacher, temperature=1.0):
  p_s, p_t = np_probs(student, temperature), np_probs(teacher, temperature)
  return np_kl_probs(p_t, p_s)


def np_reverse_kl(student, teacher, temperature=1.0):
  p_s, p_t = np_probs(student, temperature), np_probs(teacher, temperature)
  return np_kl_probs(p_s, p_t)


def np_jsd(student, teacher, temperature=1.0, beta=0.5):
  p_s = np_probs(student, temperature)
  p_t = np_probs(teacher, temperature)
  if beta in (0.0, 1.0):
    return np.zeros(p_s.shape[:-1])
  mixture = beta * p_t + (1 - beta) * p_s
  return beta * np_kl_probs(p_t, mixture) + (1 - beta) * np_kl_probs(
      p_s, mixture
  )


def np_tvd(student, teacher, temperature=1.0):
  p_s = np_probs(student, temperature)
  p_t = np_probs(teacher, temperature)
  return 0.5 * np.sum(np.abs(p_t - p_s), axis=-1)


def binary_entropy(beta):
  return -beta * np.log(beta) - (1 - beta) * np.log1p(-beta)


# name -> (function, reference); the JSD entries fix beta.
DIVERGENCES = {
    "reverse_kl": (losses.reverse_kl_divergence, np_reverse_kl),
    "jsd_0.5": (losses.jensen_shannon_divergence, np_jsd),
    "jsd_0.1": (
        functools.partial(losses.jensen_shannon_divergence, beta=0.1),
        functools.partial(np_jsd, beta=0.1),
    ),
    "jsd_0.9": (
        functools.partial(losses.jensen_shannon_divergence, beta=0.9),
        functools.partial(np_jsd, beta=0.9),
    ),
    "tvd": (losses.total_variation_distance, np_tvd),
}
NAMES = sorted(DIVERGENCES)


def logits_pair(rng, shape=(4, 3, 7), scale=3.0, dtype=np.float64):
  student = (scale * rng.standard_normal(shape)).astype(dtype)
  teacher = (scale * rng.standard_normal(shape)).astype(dtype)
  return student, teacher


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_matches_float64_reference(x64, rng, name, temperature):
  fn, reference = DIVERGENCES[name]
  student, teacher = logits_pair(rng)
  actual = fn(student, teacher, temperature=temperature)
  assert actual.dtype == jnp.float64
  assert actual.shape == (4, 3)
  helpers.assert_close(
      actual, reference(student, teacher, temperature=temperature), rtol=1e-12
  )


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_low_precision(rng, name, dtype):
  fn, reference = DIVERGENCES[name]
  student, teacher = logits_pair(rng, dtype=np.float32)
  student, teacher = jnp.asarray(student, dtype), jnp.asarray(teacher, dtype)
  # 16-bit inputs are computed and returned in float32, so the result is
  # float32-accurate for the rounded inputs: one tolerance serves both.
  helpers.assert_float32_matches_reference(
      fn, reference, student, teacher, rtol=1e-5, atol=1e-6, temperature=2.0
  )


def test_golden_values(x64):
  # p_S = [1/2, 1/2], p_T = [3/4, 1/4].
  student = np.array([0.0, 0.0])
  teacher = np.array([np.log(3.0), 0.0])
  # KL(p_S || p_T) = 1/2 log(2/3) + 1/2 log 2 = 1/2 log(4/3).
  helpers.assert_close(
      losses.reverse_kl_divergence(student, teacher), 0.5 * np.log(4 / 3),
      rtol=1e-12,
  )
  # 1/2 (|3/4 - 1/2| + |1/4 - 1/2|) = 1/4.
  helpers.assert_close(
      losses.total_variation_distance(student, teacher), 0.25, rtol=1e-12
  )
  # m = [5/8, 3/8]; JSD = 1/2 (3/4 log(6/5) + 1/4 log(2/3))
  #                     + 1/2 (1/2 log(4/5) + 1/2 log(4/3)).
  jsd = 0.5 * (0.75 * np.log(6 / 5) + 0.25 * np.log(2 / 3)) + 0.5 * (
      0.5 * np.log(4 / 5) + 0.5 * np.log(4 / 3)
  )
  helpers.assert_close(
      losses.jensen_shannon_divergence(student, teacher), jsd, rtol=1e-12
  )


@pytest.mark.parametrize("beta", [0.5, 0.25, 0.9])
def test_jsd_disjoint_supports_is_binary_entropy(x64, beta):
  # m = beta p_T + (1 - beta) p_S with disjoint supports: each KL is
  # -log(beta) or -log(1 - beta), so JSD_beta reaches its bound h(beta).
  student = np.array([0.0, 1.0, -np.inf, -np.inf])
  teacher = np.array([-np.inf, -np.inf, 2.0, 0.0])
  value, grads = jax.value_and_grad(
      lambda s, t: losses.jensen_shannon_divergence(s, t, beta=beta),
      argnums=(0, 1),
  )(student, teacher)
  helpers.assert_close(value, binary_entropy(beta), rtol=1e-12)
  for g in grads:
    np.testing.assert_allclose(np.asarray(g), 0.0, atol=1e-12)
  helpers.assert_close(
      losses.total_variation_distance(student, teacher), 1.0, rtol=1e-12
  )


@pytest.mark.parametrize("name", NAMES)
def test_grads(x64, rng, name):
  fn, _ = DIVERGENCES[name]
  student, teacher = logits_pair(rng, shape=(2, 4))
  check_grads(
      lambda s, t: fn(s, t, temperature=1.7), (student, teacher), order=2,
      modes=["rev"],
  )


def test_jsd_grads_with_traced_beta(x64, rng):
  student, teacher = logits_pair(rng, shape=(2, 4))
  check_grads(
      lambda s, t, b: losses.jensen_shannon_divergence(s, t, beta=b),
      (student, teacher, 0.3), order=2, modes=["rev"],
  )
  helpers.assert_close(
      jax.jit(
          lambda b: losses.jensen_shannon_divergence(student, teacher, beta=b)
      )(0.3),
      np_jsd(student, teacher, beta=0.3),
      rtol=1e-12,
  )


@pytest.mark.parametrize("name", NAMES)
def test_jit_where_axis(rng, name):
  fn, _ = DIVERGENCES[name]
  student, teacher = logits_pair(rng, dtype=np.float32)
  where = rng.random((4, 3)) > 0.4
  helpers.assert_jit_where_axis(fn, student, teacher, where, temperature=2.0)


@pytest.mark.parametrize("name", NAMES)
def test_vmap_over_teachers_matches_loop(rng, name):
  fn = functools.partial(DIVERGENCES[name][0], temperature=3.0)
  student, _ = logits_pair(rng, shape=(5, 6), dtype=np.float32)
  teachers = rng.standard_normal((3, 5, 6)).astype(np.float32)
  vmapped = jax.vmap(fn, in_axes=(None, 0))(student, teachers)
  looped = jnp.stack([fn(student, t) for t in teachers])
  helpers.assert_close(vmapped, looped, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_where_blocks_nan_rows(name):
  fn = DIVERGENCES[name][0]
  student = jnp.array([[1.0, 2.0], [jnp.nan, jnp.inf]])
  teacher = jnp.array([[0.0, 1.0], [jnp.inf, -jnp.inf]])
  where = jnp.array([True, False])
  value, grad = jax.value_and_grad(
      lambda s, t: jnp.sum(fn(s, t, where=where)), argnums=(0, 1)
  )(student, teacher)
  assert np.isfinite(value)
  for g in grad:
    assert np.all(np.isfinite(np.asarray(g[0])))
    np.testing.assert_array_equal(np.asarray(g[1]), [0.0, 0.0])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("temperature", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("name", NAMES)
def test_extremes_are_finite(dtype, temperature, name):
  fn = functools.partial(DIVERGENCES[name][0], temperature=temperature)
  student = jnp.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 5.0]], dtype)
  teacher = jnp.array([[-1e4, 1e4, 0.0], [-1e4, 1e4, -5.0]], dtype)
  helpers.assert_finite_value_and_grad(fn, student, teacher)


def test_reverse_kl_minus_inf_student_classes_contribute_zero(x64):
  student = np.array([0.0, -np.inf, 1.0])
  teacher = np.array([0.5, 2.0, -1.0])
  # Reference on the student's support, with the teacher renormalised over
  # all classes.
  log_s = np_log_softmax(student[[0, 2]])
  log_t = np_log_softmax(teacher)[[0, 2]]
  expected = np.sum(np.exp(log_s) * (log_s - log_t))
  value, grads = jax.value_and_grad(
      losses.reverse_kl_divergence, argnums=(0, 1)
  )(student, teacher)
  helpers.assert_close(value, expected, rtol=1e-12)
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))


def test_reverse_kl_is_forward_kl_with_arguments_swapped(x64, rng):
  student, teacher = logits_pair(rng, shape=(6, 5))
  helpers.assert_close(
      losses.reverse_kl_divergence(student, teacher, temperature=2.0),
      losses.kl_divergence(teacher, student, temperature=2.0),
      rtol=1e-12,
  )


@pytest.mark.parametrize(
    "student, teacher",
    [
        # One class impossible for both: logaddexp(-inf, -inf) must not leak
        # a nan gradient.
        ([0.0, -np.inf, 1.0, 2.0], [1.0, -np.inf, 0.0, -1.0]),
        # Impossible for one side only.
        ([0.0, -np.inf, 1.0, 2.0], [1.0, 3.0, -np.inf, -1.0]),
    ],
)
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_jsd_minus_inf_logits(x64, student, teacher, beta):
  student, teacher = np.array(student), np.array(teacher)
  value, grads = jax.value_and_grad(
      lambda s, t: losses.jensen_shannon_divergence(s, t, beta=beta),
      argnums=(0, 1),
  )(student, teacher)
  helpers.assert_close(value, np_jsd(student, teacher, beta=beta), rtol=1e-12)
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_endpoints_are_exactly_zero(beta):
  # At beta = 0 the teacher's term is 0 * KL(p_T || p_S) = 0 * inf here; the
  # endpoint must still be exactly 0 with zero gradients.
  student = jnp.array([[0.0, -jnp.inf, 3.0], [1.0, 2.0, 3.0]])
  teacher = jnp.array([[-jnp.inf, 0.0, 1.0], [3.0, 2.0, 1.0]])
  value, grads = jax.value_and_grad(
      lambda s, t: jnp.sum(
          losses.jensen_shannon_divergence(s, t, beta=beta) ** 2
      ),
      argnums=(0, 1),
  )(student, teacher)
  np.testing.assert_array_equal(
      np.asarray(losses.jensen_shannon_divergence(student, teacher, beta=beta)),
      [0.0, 0.0],
  )
  assert value == 0.0
  for g in grads:
    np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_jsd_limits_are_forward_and_reverse_kl(x64, rng):
  # JSD_beta / beta -> KL(p_T || p_S) as beta -> 0, and
  # JSD_beta / (1 - beta) -> KL(p_S || p_T) as beta -> 1; both with an
  # O(beta) (resp. O(1 - beta)) relative error.
  student, teacher = logits_pair(rng, shape=(5, 6), scale=2.0)
  small = 1e-6
  near_zero = losses.jensen_shannon_divergence(
      student, teacher, beta=small, temperature=1.5
  )
  helpers.assert_close(
      near_zero / small, np_forward_kl(student, teacher, 1.5), rtol=1e-4
  )
  near_one = losses.jensen_shannon_divergence(
      student, teacher, beta=1 - small, temperature=1.5
  )
  helpers.assert_close(
      near_one / small, np_reverse_kl(student, teacher, 1.5), rtol=1e-4
  )


def test_tvd_gradient_at_equal_distributions_is_zero(x64):
  logits = np.array([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])
  grads = jax.grad(
      lambda s, t: jnp.sum(losses.total_variation_distance(s, t)),
      argnums=(0, 1),
  )(logits, logits + 3.0)
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_allclose(np.asarray(g), 0.0, atol=1e-15)
  grad32 = jax.grad(
      lambda s: jnp.sum(losses.total_variation_distance(s, s))
  )(jnp.asarray(logits, jnp.float32))
  np.testing.assert_allclose(np.asarray(grad32), 0.0, atol=1e-7)


# Property tests.
# One fixed shape: every new shape would recompile every operation.
finite_logits = hnp.arrays(np.float64, (3, 5), elements=st.floats(-30, 30))


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(
    finite_logits, st.floats(0.1, 10.0), st.floats(0.0, 1.0),
    st.sampled_from(["reverse_kl", "jsd", "tvd"]),
)
def test_divergence_properties(logits, temperature, beta, name):
  with jax.enable_x64(True):
    fn = {
        "reverse_kl": losses.reverse_kl_divergence,
        "jsd": functools.partial(losses.jensen_shannon_divergence, beta=beta),
        "tvd": losses.total_variation_distance,
    }[name]
    # Seeded by the example itself, so a failure reproduces.
    rng = np.random.default_rng(int(np.abs(logits).sum() * 1e3))
    other = logits + rng.standard_normal(logits.shape)
    value = np.asarray(fn(other, logits, temperature=temperature))
    # Non-negative; JSD in rounding can dip a few ulps below 0.
    assert np.all(value >= -1e-12)
    same = np.asarray(fn(logits, logits, temperature=temperature))
    np.testing.assert_allclose(same, 0.0, atol=1e-12)
    shift = rng.standard_normal((logits.shape[0], 1)) * 50
    shifted = np.asarray(
        fn(other + shift, logits - shift, temperature=temperature)
    )
    np.testing.assert_allclose(shifted, value, rtol=1e-9, atol=1e-9)
    if name == "tvd":
      assert np.all(value <= 1 + 1e-12)
    if name == "jsd" and 0 < beta < 1:
      assert np.all(value <= binary_entropy(beta) + 1e-12)
      # Swapping the roles of student and teacher swaps beta and 1 - beta.
      swapped = np.asarray(
          losses.jensen_shannon_divergence(
              logits, other, beta=1 - beta, temperature=temperature
          )
      )
      np.testing.assert_allclose(swapped, value, rtol=1e-9, atol=1e-12)


finite_logit_pairs = hnp.arrays(
    np.float64, (2, 3, 5), elements=st.floats(-30, 30)
)


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(finite_logit_pairs)
def test_symmetric_jsd_is_at_most_log_2(pair):
  student, teacher = pair
  with jax.enable_x64(True):
    value = np.asarray(losses.jensen_shannon_divergence(student, teacher))
    assert np.all(value <= np.log(2.0) + 1e-12)
    assert np.all(value >= -1e-12)


# Values are checked when they are known at trace time (closed over, not
# traced); shapes and dtypes always are.
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "kwargs, student_shape, student_dtype, error, match",
    [
        (dict(temperature=0.0), (2, 4), jnp.float32, ValueError,
         "temperature"),
        (dict(temperature=-1.0), (2, 4), jnp.float32, ValueError,
         "temperature"),
    ] + helpers.LOGIT_PAIR_ERRORS,
)
def test_bad_input_raises_at_trace_time(
    name, kwargs, student_shape, student_dtype, error, match
):
  helpers.assert_logit_pair_error(
      DIVERGENCES[name][0], kwargs, student_shape, student_dtype, error, match
  )


@pytest.mark.parametrize("name", NAMES)
def test_integer_teacher_rejected(name):
  with pytest.raises(TypeError, match="teacher_logits"):
    DIVERGENCES[name][0](jnp.zeros((2, 4)), jnp.zeros((2, 4), jnp.int32))


@pytest.mark.parametrize("beta", [-0.1, 1.5, np.nan])
def test_jsd_beta_out_of_range(beta):
  with pytest.raises(ValueError, match="beta"):
    losses.jensen_shannon_divergence(
        jnp.zeros((2, 4)), jnp.zeros((2, 4)), beta=beta
    )
