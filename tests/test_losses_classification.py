"""cross_entropy: integer and soft labels, smoothing, -inf classes, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import losses


def reference(logits, targets):
  """Float64 NumPy: -sum q log softmax(z), zero targets contributing 0."""
  z = np.asarray(logits, np.float64)
  m = z.max(-1, keepdims=True)
  log_p = z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))
  with np.errstate(invalid="ignore"):
    terms = np.where(targets == 0, 0.0, targets * log_p)
  return -terms.sum(-1)


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 1.0])
def test_matches_float64_reference(x64, rng, smoothing):
  logits = rng.standard_normal((3, 4, 7)) * 5
  labels = rng.integers(0, 7, (3, 4))
  one_hot = np.eye(7)[labels]
  targets = (1 - smoothing) * one_hot + smoothing / 7
  got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels),
                             label_smoothing=smoothing)
  np.testing.assert_allclose(got, reference(logits, targets), rtol=1e-12)
  # Soft labels: the same number by the second route.
  soft = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(one_hot),
                              label_smoothing=smoothing)
  np.testing.assert_allclose(soft, got, rtol=1e-12)


def test_minus_inf_classes_with_zero_target_are_exact_and_finite():
  logits = jnp.array([[2.0, -jnp.inf, 0.0]])
  value, grad = jax.value_and_grad(
      lambda z: losses.cross_entropy(z, jnp.array([0])).sum())(logits)
  np.testing.assert_allclose(value, np.log1p(np.exp(-2.0)), rtol=1e-6)
  assert np.isfinite(grad).all()
  # A positive target on an impossible class is an infinite loss.
  assert np.isposinf(losses.cross_entropy(logits, jnp.array([1]))[0])


def test_labels_out_of_range_raise_or_become_nan():
  logits = jnp.zeros((3, 10))
  for bad in (10, -1, 1000):
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 10\)"):
      losses.cross_entropy(logits, jnp.array([0, bad, 2]))
  traced = jax.jit(losses.cross_entropy)(logits, jnp.array([0, 10, -1]))
  assert np.isfinite(traced[0]) and np.isnan(traced[1:]).all()


def test_wrong_label_shapes_name_labels():
  with pytest.raises(ValueError, match="`labels` must be integer"):
    losses.cross_entropy(jnp.zeros((4, 10)), jnp.zeros((4, 1), jnp.int32))
  with pytest.raises(ValueError, match="`labels`"):
    losses.cross_entropy(jnp.zeros((4, 10)), jnp.zeros((4, 9)))


def test_nan_propagates_and_where_masks(rng):
  logits = jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)
  logits = logits.at[1, 2].set(jnp.nan)
  out = np.asarray(losses.cross_entropy(logits, jnp.array([0, 1, 2])))
  assert np.isnan(out[1]) and np.isfinite(out[[0, 2]]).all()
  masked = losses.cross_entropy(logits, jnp.array([0, 1, 2]),
                                where=jnp.array([True, False, True]))
  assert masked[1] == 0 and masked[0] == out[0]


def test_bfloat16_is_computed_in_float32(rng):
  logits = rng.standard_normal((4, 6)).astype(np.float32)
  got = losses.cross_entropy(jnp.asarray(logits, jnp.bfloat16),
                             jnp.array([0, 1, 2, 3]))
  assert got.dtype == jnp.float32
  want = reference(np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float64),
                   np.eye(6)[[0, 1, 2, 3]])
  np.testing.assert_allclose(got, want, rtol=1e-5)
