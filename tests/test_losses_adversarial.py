"""Tests of the adversarial (GAN) distillation losses against float64 NumPy."""

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


# Independent float64 references: -log sigmoid(x) = log(1 + exp(-x)),
# evaluated stably with logaddexp.
def np_neg_log_sigmoid(x):
  return np.logaddexp(0.0, -np.asarray(x, np.float64))


def np_discriminator(real, fake):
  # -log sigmoid(real) - log(1 - sigmoid(fake)); 1 - sigmoid(x) = sigmoid(-x).
  return np_neg_log_sigmoid(real) + np_neg_log_sigmoid(-np.asarray(fake))


def np_generator(fake):
  return np_neg_log_sigmoid(fake)


def logits_pair(rng, shape=(4, 3), dtype=np.float64):
  return tuple(
      (4.0 * rng.standard_normal(shape)).astype(dtype) for _ in range(2)
  )


def test_matches_float64_reference(x64, rng):
  real, fake = logits_pair(rng)
  d_loss = losses.discriminator_loss(real, fake)
  g_loss = losses.generator_loss(fake)
  assert d_loss.shape == (4, 3) and d_loss.dtype == jnp.float64
  assert g_loss.shape == (4, 3) and g_loss.dtype == jnp.float64
  helpers.assert_close(d_loss, np_discriminator(real, fake), rtol=1e-12)
  helpers.assert_close(g_loss, np_generator(fake), rtol=1e-12)
  # Direct formula check where sigmoid is well away from 0 and 1.
  small = np.linspace(-3, 3, 7)
  sig = 1 / (1 + np.exp(-small))
  helpers.assert_close(
      losses.discriminator_loss(small, small[::-1].copy()),
      -np.log(sig) - np.log(1 - sig[::-1]),
      rtol=1e-12,
  )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_low_precision(rng, dtype):
  real, fake = logits_pair(rng, dtype=np.float32)
  real, fake = jnp.asarray(real, dtype), jnp.asarray(fake, dtype)
  d_loss = losses.discriminator_loss(real, fake)
  g_loss = losses.generator_loss(fake)
  # 16-bit inputs are computed in float32: float32-accurate for the rounded
  # inputs.
  assert d_loss.dtype == g_loss.dtype == jnp.float32
  real64, fake64 = np.asarray(real, np.float64), np.asarray(fake, np.float64)
  helpers.assert_close(d_loss, np_discriminator(real64, fake64), rtol=1e-5)
  helpers.assert_close(g_loss, np_generator(fake64), rtol=1e-5)


def test_golden_values():
  zero = jnp.zeros(3)
  # At logit 0 every sigmoid is 1/2: each term is log 2.
  np.testing.assert_allclose(
      losses.discriminator_loss(zero, zero), 2 * np.log(2), rtol=1e-6
  )
  np.testing.assert_allclose(losses.generator_loss(zero), np.log(2), rtol=1e-6)
  # A confident discriminator: real +20, fake -20 gives 2 log(1 + e^-20),
  # computed without cancellation; the generator's loss at -100 is ~100
  # (non-saturating: it keeps a unit gradient).
  d_loss = losses.discriminator_loss(jnp.array(20.0), jnp.array(-20.0))
  np.testing.assert_allclose(float(d_loss), 2 * np.exp(-20.0), rtol=1e-5)
  value, grad = jax.value_and_grad(losses.generator_loss)(jnp.array(-100.0))
  np.testing.assert_allclose(float(value), 100.0, rtol=1e-6)
  np.testing.assert_allclose(float(grad), -1.0, rtol=1e-6)


def test_grads(x64, rng):
  real, fake = logits_pair(rng, shape=(3,))
  check_grads(losses.discriminator_loss, (real, fake), order=2, modes=["rev"])
  check_grads(losses.generator_loss, (fake,), order=2, modes=["rev"])


def test_gradient_values(x64, rng):
  # d/dx softplus(-x) = -sigmoid(-x); d/dx softplus(x) = sigmoid(x).
  real, fake = logits_pair(rng, shape=(5,))
  sigmoid = lambda x: 1 / (1 + np.exp(-x))
  grad_real, grad_fake = jax.grad(
      lambda r, f: jnp.sum(losses.discriminator_loss(r, f)), argnums=(0, 1)
  )(real, fake)
  helpers.assert_close(grad_real, -sigmoid(-real), rtol=1e-12)
  helpers.assert_close(grad_fake, sigmoid(fake), rtol=1e-12)


def test_jit_vmap_where(rng):
  real, fake = logits_pair(rng, dtype=np.float32)
  helpers.assert_jit_matches_eager(losses.discriminator_loss, real, fake)
  helpers.assert_jit_matches_eager(losses.generator_loss, fake)
  where = rng.random((4, 3)) > 0.4
  helpers.assert_where_matches_slicing(
      losses.discriminator_loss, (real, fake), where
  )
  helpers.assert_where_matches_slicing(losses.generator_loss, (fake,), where)
  vmapped = jax.vmap(losses.discriminator_loss)(real, fake)
  looped = jnp.stack(
      [losses.discriminator_loss(r, f) for r, f in zip(real, fake)]
  )
  helpers.assert_close(vmapped, looped, rtol=1e-6)


def test_where_broadcasts_and_blocks_nan():
  real = jnp.array([[1.0, jnp.nan], [2.0, -jnp.inf]])
  fake = jnp.array([[0.5, jnp.inf], [1.0, jnp.nan]])
  where = jnp.array([True, False])  # broadcast over the leading axis
  value, grads = jax.value_and_grad(
      lambda r, f: jnp.sum(losses.discriminator_loss(r, f, where=where)),
      argnums=(0, 1),
  )(real, fake)
  assert np.isfinite(value)
  for g in grads:
    np.testing.assert_array_equal(np.asarray(g)[:, 1], 0.0)
  g_loss = losses.generator_loss(fake, where=where)
  np.testing.assert_array_equal(np.asarray(g_loss)[:, 1], 0.0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_extremes_are_finite(dtype):
  real = jnp.array([1e4, -1e4, 0.0, 1e4], dtype)
  fake = jnp.array([-1e4, 1e4, 1e4, 0.0], dtype)
  helpers.assert_finite_value_and_grad(losses.discriminator_loss, real, fake)
  helpers.assert_finite_value_and_grad(
      losses.generator_loss, fake, argnums=0
  )
  # Exact large-|x| values (softplus(x) = x, softplus(-x) = 0 for x = 1e4,
  # bf16-rounded to 9984): no overflow, no cancellation.
  expected = np_discriminator(
      np.asarray(real, np.float64), np.asarray(fake, np.float64)
  )
  np.testing.assert_allclose(expected[[0, 3]], [0.0, np.log(2)], atol=1e-12)
  helpers.assert_close(
      losses.discriminator_loss(real, fake), expected, rtol=1e-6
  )


finite_logits = hnp.arrays(
    np.float64, hnp.array_shapes(min_dims=1, max_dims=2, max_side=5),
    elements=st.floats(-50, 50),
)


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(finite_logits)
def test_properties(logits):
  with jax.enable_x64(True):
    # Both losses are positive, and discriminator_loss(x, -x) =
    # 2 softplus(-x) = 2 generator_loss(x).
    d_loss = np.asarray(losses.discriminator_loss(logits, -logits))
    g_loss = np.asarray(losses.generator_loss(logits))
    assert np.all(d_loss > 0) and np.all(g_loss > 0)
    np.testing.assert_allclose(d_loss, 2 * g_loss, rtol=1e-12)
    # softplus(-x) - softplus(x) = -x.
    np.testing.assert_allclose(
        np.asarray(losses.generator_loss(-logits)) - g_loss, logits,
        rtol=1e-9, atol=1e-9,
    )


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda r, f: losses.discriminator_loss(r, f[:2]), ValueError,
         "same shape"),
        (lambda r, f: losses.discriminator_loss(r.astype(jnp.int32), f),
         TypeError, "real_logits"),
        (lambda r, f: losses.discriminator_loss(r, f.astype(jnp.int32)),
         TypeError, "fake_logits"),
        (lambda r, f: losses.generator_loss(f.astype(jnp.int32)), TypeError,
         "fake_logits"),
        (lambda r, f: losses.generator_loss(f, where=jnp.ones(3)), TypeError,
         "where"),
        (lambda r, f: losses.discriminator_loss(
            r, f, where=jnp.ones(4, bool)), ValueError, "where"),
    ],
)
def test_bad_input_raises_at_trace_time(call, error, match):
  logits = jnp.zeros((3,))
  with pytest.raises(error, match=match):
    jax.jit(call)(logits, logits)
