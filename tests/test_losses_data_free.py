"""Tests of the data-free distillation losses against float64 NumPy."""

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


# Independent float64 references, written from the formulas.
def np_log_softmax(z, axis=-1):
  z = np.asarray(z, np.float64)
  shifted = z - np.max(z, axis=axis, keepdims=True)
  return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def np_bn_statistics(features, running_mean, running_var, axis=-1):
  x = np.moveaxis(np.asarray(features, np.float64), axis, -1)
  x = x.reshape(-1, x.shape[-1])
  mean = x.mean(axis=0)
  var = x.var(axis=0, ddof=0)  # biased, as torch's var(unbiased=False)
  return (np.linalg.norm(mean - np.asarray(running_mean, np.float64))
          + np.linalg.norm(var - np.asarray(running_var, np.float64)))


def np_one_hot(logits, axis=-1):
  log_probs = np_log_softmax(logits, axis)
  label = np.argmax(np.asarray(logits), axis=axis)
  return -np.take_along_axis(
      log_probs, np.expand_dims(label, axis), axis
  ).squeeze(axis)


def np_activation(features):
  return -np.mean(np.abs(np.asarray(features, np.float64)))


def np_information_entropy(logits, axis=-1):
  probs = np.exp(np_log_softmax(logits, axis))
  probs = np.moveaxis(probs, axis, -1).reshape(-1, probs.shape[axis])
  mean = probs.mean(axis=0)
  return np.sum(mean * np.log(mean))


def bn_inputs(rng, shape=(3, 2, 2, 4), dtype=np.float64):
  features = (2.0 * rng.standard_normal(shape) + 0.5).astype(dtype)
  channels = shape[-1]
  running_mean = rng.standard_normal(channels).astype(dtype)
  running_var = rng.uniform(0.5, 3.0, channels).astype(dtype)
  return features, running_mean, running_var


# batchnorm_statistics_loss


def test_bn_statistics_matches_float64_reference(x64, rng):
  features, mean, var = bn_inputs(rng)
  loss = losses.batchnorm_statistics_loss(features, mean, var)
  assert loss.shape == () and loss.dtype == jnp.float64
  helpers.assert_close(loss, np_bn_statistics(features, mean, var), rtol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_bn_statistics_low_precision(rng, dtype):
  features, mean, var = (
      jnp.asarray(a, dtype) for a in bn_inputs(rng, dtype=np.float32)
  )
  loss = losses.batchnorm_statistics_loss(features, mean, var)
  assert loss.dtype == jnp.float32
  expected = np_bn_statistics(
      *(np.asarray(a, np.float64) for a in (features, mean, var))
  )
  helpers.assert_close(loss, expected, rtol=1e-5)


def test_bn_statistics_golden_and_zero_at_match():
  features = jnp.array([[0.0, 1.0], [2.0, 3.0]])  # mean [1, 2], var [1, 1]
  stats = (jnp.array([1.0, 2.0]), jnp.array([1.0, 1.0]))
  value, grads = jax.value_and_grad(
      losses.batchnorm_statistics_loss, argnums=(0, 1, 2)
  )(features, *stats)
  assert float(value) == 0.0
  for g in grads:  # the norm's subgradient at 0 is taken as 0, not nan
    np.testing.assert_array_equal(g, 0.0)
  # Mean off by (3, 4): 5; variance off by (0, 0): 0.
  loss = losses.batchnorm_statistics_loss(
      features, jnp.array([-2.0, -2.0]), stats[1]
  )
  np.testing.assert_allclose(float(loss), 5.0, rtol=1e-6)


def test_bn_statistics_grads(x64, rng):
  features, mean, var = bn_inputs(rng, shape=(3, 2, 3))
  check_grads(
      jax.jit(losses.batchnorm_statistics_loss), (features, mean, var),
      order=2, modes=["rev"],
  )


def test_bn_statistics_jit_and_axis(rng):
  features, mean, var = bn_inputs(rng, dtype=np.float32)
  helpers.assert_jit_matches_eager(
      losses.batchnorm_statistics_loss, features, mean, var
  )
  nchw = np.moveaxis(features, -1, 1)
  helpers.assert_close(
      losses.batchnorm_statistics_loss(nchw, mean, var, axis=1),
      losses.batchnorm_statistics_loss(features, mean, var),
      rtol=1e-6,
  )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_bn_statistics_extremes_are_finite(dtype):
  features = jnp.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 5.0]], dtype)
  mean = jnp.zeros(3, dtype)
  var = jnp.array([1e8, 1e8, 6.25], dtype)
  helpers.assert_finite_value_and_grad(
      losses.batchnorm_statistics_loss, features, mean, var,
      argnums=(0, 1, 2),
  )


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(st.integers(0, 2**31 - 1))
def test_bn_statistics_properties(seed):
  with jax.enable_x64(True):
    rng = np.random.default_rng(seed)
    features, mean, var = bn_inputs(rng, shape=(5, 3))
    loss = float(losses.batchnorm_statistics_loss(features, mean, var))
    assert loss >= 0.0
    # Invariant to the order of the batch; zero at the batch's own stats.
    permuted = features[rng.permutation(5)]
    np.testing.assert_allclose(
        float(losses.batchnorm_statistics_loss(permuted, mean, var)), loss,
        rtol=1e-12,
    )
    own = losses.batchnorm_statistics_loss(
        features, features.mean(0), features.var(0)
    )
    np.testing.assert_allclose(float(own), 0.0, atol=1e-12)


# dafl_one_hot_loss


def test_one_hot_matches_float64_reference(x64, rng):
  logits = 3.0 * rng.standard_normal((4, 3, 6))
  loss = losses.dafl_one_hot_loss(logits)
  assert loss.shape == (4, 3) and loss.dtype == jnp.float64
  helpers.assert_close(loss, np_one_hot(logits), rtol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "fn, reference, shape",
    [
        (losses.dafl_one_hot_loss, np_one_hot, (4, 6)),
        (losses.dafl_information_entropy_loss, np_information_entropy, (6, 5)),
    ],
)
def test_logit_losses_low_precision(rng, dtype, fn, reference, shape):
  logits = jnp.asarray(3.0 * rng.standard_normal(shape), dtype)
  helpers.assert_float32_matches_reference(fn, reference, logits)


def test_one_hot_golden_ties_and_gradient(x64):
  # Uniform logits: log C; ties go to the first class.
  np.testing.assert_allclose(
      losses.dafl_one_hot_loss(np.zeros(4)), np.log(4), rtol=1e-12
  )
  # Gradient is softmax - one_hot(argmax).
  logits = np.array([1.0, 3.0, 0.0])
  grad = jax.grad(losses.dafl_one_hot_loss)(logits)
  probs = np.exp(np_log_softmax(logits))
  helpers.assert_close(grad, probs - np.eye(3)[1], rtol=1e-12)


def test_one_hot_grads(x64, rng):
  logits = 2.0 * rng.standard_normal((3, 4))
  check_grads(
      jax.jit(losses.dafl_one_hot_loss), (logits,), order=2, modes=["rev"]
  )


def test_one_hot_jit_where_axis(rng):
  logits = (3.0 * rng.standard_normal((4, 3, 6))).astype(np.float32)
  helpers.assert_jit_matches_eager(losses.dafl_one_hot_loss, logits)
  where = rng.random((4, 3)) > 0.4
  helpers.assert_where_matches_slicing(
      losses.dafl_one_hot_loss, (logits,), where
  )
  helpers.assert_axis_matches_moveaxis(
      losses.dafl_one_hot_loss, (np.moveaxis(logits, -1, 1),), axis=1
  )


def test_one_hot_where_blocks_nan():
  logits = jnp.array([[1.0, 2.0], [jnp.nan, jnp.inf]])
  where = jnp.array([True, False])
  value, grad = jax.value_and_grad(
      lambda z: jnp.sum(losses.dafl_one_hot_loss(z, where=where))
  )(logits)
  assert np.isfinite(value)
  np.testing.assert_array_equal(grad[1], 0.0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_one_hot_extremes_are_finite(dtype):
  logits = jnp.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 5.0]], dtype)
  helpers.assert_finite_value_and_grad(
      losses.dafl_one_hot_loss, logits, argnums=0
  )


# Compiled once per shape: the property tests call them on many inputs.
jitted_one_hot = jax.jit(losses.dafl_one_hot_loss)
jitted_information_entropy = jax.jit(losses.dafl_information_entropy_loss)

finite_logits = hnp.arrays(
    np.float64,
    # Few distinct shapes: each new shape compiles again.
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=2, max_side=4),
    elements=st.floats(-30, 30),
)


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(finite_logits)
def test_one_hot_properties(logits):
  # The argmax class is the most probable: 0 <= loss <= log C, and the loss
  # is the smallest cross-entropy over all labels.
  with jax.enable_x64(True):
    loss = np.asarray(jitted_one_hot(logits))
    assert np.all(loss >= 0) and np.all(loss <= np.log(logits.shape[1]) + 1e-12)
    np.testing.assert_allclose(
        loss, np.min(-np_log_softmax(logits), axis=-1), rtol=1e-12,
        atol=1e-12,
    )


# dafl_activation_loss


def test_activation_matches_float64_reference(x64, rng):
  features = rng.standard_normal((4, 3, 5))
  loss = losses.dafl_activation_loss(features)
  assert loss.shape == () and loss.dtype == jnp.float64
  helpers.assert_close(loss, np_activation(features), rtol=1e-12)
  # The paper's -1/n sum_i ||f_i||_1 is d times this value.
  flat = features.reshape(-1, 5)
  paper = -np.mean(np.sum(np.abs(flat), axis=-1))
  helpers.assert_close(5 * loss, paper, rtol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_activation_low_precision_and_extremes(rng, dtype):
  features = jnp.asarray(rng.standard_normal((4, 5)), dtype)
  loss = losses.dafl_activation_loss(features)
  assert loss.dtype == jnp.float32
  helpers.assert_close(
      loss, np_activation(np.asarray(features, np.float64)), rtol=1e-5
  )
  extreme = jnp.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 5.0]], dtype)
  helpers.assert_finite_value_and_grad(
      losses.dafl_activation_loss, extreme, argnums=0
  )


def test_activation_grads_and_jit(x64, rng):
  # Values away from 0, where |f| is smooth: gradient -sign(f) / size.
  features = rng.choice([-1.0, 1.0], (3, 4)) * rng.uniform(0.5, 2.0, (3, 4))
  check_grads(
      losses.dafl_activation_loss, (features,), order=2, modes=["rev"]
  )
  grad = jax.grad(losses.dafl_activation_loss)(features)
  helpers.assert_close(grad, -np.sign(features) / 12, rtol=1e-12)
  helpers.assert_jit_matches_eager(losses.dafl_activation_loss, features)


# dafl_information_entropy_loss


def test_information_entropy_matches_float64_reference(x64, rng):
  logits = 3.0 * rng.standard_normal((6, 5))
  loss = losses.dafl_information_entropy_loss(logits)
  assert loss.shape == () and loss.dtype == jnp.float64
  expected = np_information_entropy(logits)
  helpers.assert_close(loss, expected, rtol=1e-12)
  # The authors' code uses log10: its value is this one over ln 10.
  probs = np.exp(np_log_softmax(logits)).mean(0)
  helpers.assert_close(
      loss / np.log(10), np.sum(probs * np.log10(probs)), rtol=1e-12
  )
  # Extra batch axes are averaged over like the first one.
  stacked = logits.reshape(2, 3, 5)
  helpers.assert_close(
      losses.dafl_information_entropy_loss(stacked), expected, rtol=1e-12
  )


def test_information_entropy_golden(x64):
  # Uniform mean prediction: -log C, the minimum.
  np.testing.assert_allclose(
      losses.dafl_information_entropy_loss(np.zeros((3, 4))), -np.log(4),
      rtol=1e-12,
  )
  # Every example certain of the same class: entropy ~0.
  same = np.array([[50.0, 0.0, 0.0], [60.0, 0.0, 0.0]])
  np.testing.assert_allclose(
      losses.dafl_information_entropy_loss(same), 0.0, atol=1e-18
  )
  # A class impossible in every example (-inf logits) contributes 0.
  impossible = np.array([[0.0, 0.0, -np.inf], [0.0, 0.0, -np.inf]])
  value, grad = jax.value_and_grad(losses.dafl_information_entropy_loss)(
      impossible
  )
  np.testing.assert_allclose(float(value), -np.log(2), rtol=1e-12)
  assert np.all(np.isfinite(grad))


def test_information_entropy_grads_jit_axis(x64, rng):
  logits = 2.0 * rng.standard_normal((3, 4))
  check_grads(
      jax.jit(losses.dafl_information_entropy_loss), (logits,), order=2,
      modes=["rev"],
  )
  helpers.assert_jit_matches_eager(losses.dafl_information_entropy_loss, logits)
  helpers.assert_axis_matches_moveaxis(
      losses.dafl_information_entropy_loss, (logits.T,), axis=0
  )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_information_entropy_extremes_are_finite(dtype):
  logits = jnp.array([[1e4, -1e4, 0.0], [1e4, -1e4, 5.0]], dtype)
  helpers.assert_finite_value_and_grad(
      losses.dafl_information_entropy_loss, logits, argnums=0
  )


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(finite_logits)
def test_information_entropy_properties(logits):
  with jax.enable_x64(True):
    loss = float(jitted_information_entropy(logits))
    assert -np.log(logits.shape[1]) - 1e-12 <= loss <= 1e-12
    # Invariant to the order of the batch and to per-row logit shifts.
    rng = np.random.default_rng(logits.size)
    shifted = logits[::-1] + 20 * rng.standard_normal((logits.shape[0], 1))
    np.testing.assert_allclose(
        float(jitted_information_entropy(shifted)), loss,
        rtol=1e-9, atol=1e-12,
    )


# Errors.


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda x: losses.batchnorm_statistics_loss(
            x, jnp.zeros(3), jnp.ones(4)), ValueError, "running_mean"),
        (lambda x: losses.batchnorm_statistics_loss(
            x, jnp.zeros(4), jnp.ones((1, 4))), ValueError, "running_var"),
        (lambda x: losses.batchnorm_statistics_loss(
            x[0], jnp.zeros(4), jnp.ones(4)), ValueError, "features"),
        (lambda x: losses.batchnorm_statistics_loss(
            x.astype(jnp.int32), jnp.zeros(4), jnp.ones(4)), TypeError,
         "features"),
        (lambda x: losses.batchnorm_statistics_loss(
            x, jnp.zeros(4, jnp.int32), jnp.ones(4)), TypeError,
         "running_mean"),
        (lambda x: losses.batchnorm_statistics_loss(
            x, jnp.zeros(4), jnp.ones(4), axis=2), ValueError, "axis"),
        (lambda x: losses.dafl_one_hot_loss(x.astype(jnp.int32)), TypeError,
         "teacher_logits"),
        (lambda x: losses.dafl_one_hot_loss(x, where=jnp.ones(3, bool)),
         ValueError, "where"),
        (lambda x: losses.dafl_one_hot_loss(x, axis=-3), ValueError, "axis"),
        (lambda x: losses.dafl_activation_loss(x.astype(jnp.int32)),
         TypeError, "features"),
        (lambda x: losses.dafl_activation_loss(x[:0]), ValueError,
         "features"),
        (lambda x: losses.dafl_information_entropy_loss(x.astype(jnp.int32)),
         TypeError, "teacher_logits"),
        (lambda x: losses.dafl_information_entropy_loss(x[:0]), ValueError,
         "teacher_logits"),
    ],
)
def test_bad_input_raises_at_trace_time(call, error, match):
  x = jnp.zeros((2, 4))
  with pytest.raises(error, match=match):
    jax.jit(call)(x)
