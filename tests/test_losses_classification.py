"""Tests of losses.cross_entropy against float64 NumPy formulas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from jaxkd import losses
from tests import helpers


def np_log_softmax(z, axis=-1):
  z = np.asarray(z, np.float64)
  top = np.max(z, axis=axis, keepdims=True)
  with np.errstate(invalid="ignore"):
    shifted = z - top
  return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def np_cross_entropy(logits, targets, smoothing=0.0):
  """-sum y log q, y smoothed, class axis last; 0 log 0 = 0."""
  num_classes = logits.shape[-1]
  y = (1 - smoothing) * np.asarray(targets, np.float64) + smoothing / num_classes
  log_q = np_log_softmax(logits)
  with np.errstate(invalid="ignore"):
    return -np.sum(np.where(y > 0, y * log_q, 0.0), axis=-1)


def one_hot(labels, num_classes):
  return np.eye(num_classes)[labels]


_ce = jax.jit(losses.cross_entropy, static_argnames=("axis",))


@pytest.mark.parametrize("shape", [(6,), (5, 7), (2, 3, 4)])
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 1.0])
def test_integer_labels_match_float64(x64, rng, shape, smoothing):
  logits = 3 * rng.standard_normal(shape)
  labels = rng.integers(0, shape[-1], shape[:-1])
  actual = losses.cross_entropy(logits, labels, label_smoothing=smoothing)
  assert actual.shape == shape[:-1] and actual.dtype == jnp.float64
  helpers.assert_close(
      actual,
      np_cross_entropy(logits, one_hot(labels, shape[-1]), smoothing),
      rtol=1e-12,
  )


def test_soft_labels_match_float64_and_one_hot_equals_indices(x64, rng):
  logits = 3 * rng.standard_normal((6, 5))
  soft = rng.dirichlet(np.ones(5), size=6)
  helpers.assert_close(
      losses.cross_entropy(logits, soft, label_smoothing=0.2),
      np_cross_entropy(logits, soft, 0.2), rtol=1e-12,
  )
  labels = rng.integers(0, 5, 6)
  helpers.assert_close(
      losses.cross_entropy(logits, one_hot(labels, 5), label_smoothing=0.1),
      losses.cross_entropy(logits, labels, label_smoothing=0.1),
      rtol=1e-14,
  )


def test_minus_inf_guard():
  logits = jnp.array([[2.0, 0.0, -jnp.inf], [0.0, -jnp.inf, 1.0]])
  labels = jnp.array([0, 2])
  value, grad = jax.value_and_grad(
      lambda z: jnp.sum(losses.cross_entropy(z, labels))
  )(logits)
  expected = np_cross_entropy(np.asarray(logits), one_hot([0, 2], 3))
  helpers.assert_close(
      losses.cross_entropy(logits, labels), expected, rtol=1e-6
  )
  assert np.isfinite(value)
  g = np.asarray(grad)
  assert np.all(np.isfinite(g))
  assert g[0, 2] == 0.0 and g[1, 1] == 0.0
  # A positive target on an impossible class is the true value, inf; so is
  # label smoothing, which puts eps / C on every class.
  assert losses.cross_entropy(logits, jnp.array([2, 0]))[0] == np.inf
  smoothed = losses.cross_entropy(logits, labels, label_smoothing=0.1)
  assert np.all(np.asarray(smoothed) == np.inf)
  # Soft labels that are zero on the padding stay finite.
  soft = jnp.array([[0.5, 0.5, 0.0], [0.3, 0.0, 0.7]])
  assert np.all(np.isfinite(np.asarray(losses.cross_entropy(logits, soft))))


def test_extreme_logits_finite_value_and_grad():
  for dtype in (jnp.float32, jnp.bfloat16):
    logits = jnp.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 5.0]], dtype)
    helpers.assert_finite_value_and_grad(
        lambda z: losses.cross_entropy(z, jnp.array([0, 1])), logits,
        argnums=0,
    )
  out = losses.cross_entropy(jnp.zeros((2, 3), jnp.bfloat16), jnp.array([0, 1]))
  assert out.dtype == jnp.float32
  helpers.assert_close(out, np.full(2, np.log(3)), rtol=1e-6)


def test_jit_where_axis_and_grads(rng):
  logits = rng.standard_normal((4, 3, 5)).astype(np.float32)
  labels = rng.integers(0, 5, (4, 3)).astype(np.int32)
  fn = lambda z, y, **kw: losses.cross_entropy(z, y, label_smoothing=0.1, **kw)
  helpers.assert_jit_matches_eager(fn, logits, labels)
  where = rng.random((4, 3)) > 0.4
  helpers.assert_where_matches_slicing(fn, (logits, labels), where)
  along_1 = fn(np.moveaxis(logits, -1, 1), labels, axis=1)
  helpers.assert_close(along_1, fn(logits, labels), rtol=1e-6)
  with jax.enable_x64(True):
    check_grads(
        lambda z: losses.cross_entropy(z, labels, label_smoothing=0.1),
        (logits.astype(np.float64),), order=2, modes=["rev"],
    )


def test_labels_out_of_range():
  logits = jnp.zeros((4, 5))
  for bad in (5, 10, -1, 1000):
    labels = np.array([0, bad, 1, 2], np.int32)
    with pytest.raises(ValueError, match="labels"):
      losses.cross_entropy(logits, labels)
    with pytest.raises(ValueError, match="labels"):
      jax.jit(lambda z: losses.cross_entropy(z, labels))(logits)
  traced = np.asarray(_ce(logits, np.array([0, 10, -1, 2], np.int32)))
  assert np.isnan(traced[1]) and np.isnan(traced[2])
  helpers.assert_close(traced[[0, 3]], np.full(2, np.log(5)), rtol=1e-6)
  # Labels of masked rows are ignored, concrete or traced.
  where = np.array([True, False, True, True])
  padded = np.array([0, -1, 1, 2], np.int32)
  for out in (losses.cross_entropy(logits, padded, where=where),
              _ce(logits, padded, where=where)):
    np.testing.assert_allclose(np.asarray(out), [np.log(5), 0, np.log(5),
                                                 np.log(5)], rtol=1e-6)


def test_bad_shapes_and_dtypes():
  logits = jnp.zeros((4, 5))
  with pytest.raises(ValueError, match="labels"):
    losses.cross_entropy(logits, jnp.zeros((4, 1), jnp.int32))
  with pytest.raises(ValueError, match="labels"):
    losses.cross_entropy(logits, jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match="labels"):
    losses.cross_entropy(logits, jnp.zeros((4, 4)))
  with pytest.raises(ValueError, match="labels"):
    losses.cross_entropy(logits, -jnp.ones((4, 5)))
  with pytest.raises(TypeError, match="labels"):
    losses.cross_entropy(logits, jnp.zeros((4,), bool))
  with pytest.raises(TypeError, match="logits"):
    losses.cross_entropy(jnp.zeros((4, 5), jnp.int32), jnp.zeros(4, jnp.int32))
  with pytest.raises(ValueError, match="label_smoothing"):
    losses.cross_entropy(logits, jnp.zeros(4, jnp.int32), label_smoothing=2.0)
  out = jax.jit(
      lambda e: losses.cross_entropy(logits, jnp.zeros(4, jnp.int32),
                                     label_smoothing=e)
  )(jnp.float32(-0.5))
  assert np.all(np.isnan(np.asarray(out)))


def test_nan_propagates():
  logits = np.zeros((3, 4), np.float32)
  logits[1, 2] = np.nan
  out = np.asarray(losses.cross_entropy(logits, np.array([0, 0, 0])))
  assert np.isnan(out[1]) and np.all(np.isfinite(out[[0, 2]]))
  soft = np.full((3, 4), 0.25, np.float32)
  soft[2, 3] = np.nan
  out = np.asarray(losses.cross_entropy(np.zeros((3, 4), np.float32), soft))
  assert np.isnan(out[2]) and np.all(np.isfinite(out[:2]))


def test_distillation_loss_hard_term_is_cross_entropy(rng):
  student = rng.standard_normal((6, 5)).astype(np.float32)
  teacher = rng.standard_normal((6, 5)).astype(np.float32)
  labels = rng.integers(0, 5, 6)
  hard_only = losses.distillation_loss(
      student, teacher, labels, temperature=3.0, alpha=0.0,
      label_smoothing=0.1,
  )
  helpers.assert_close(
      hard_only,
      losses.cross_entropy(student, labels, label_smoothing=0.1),
      rtol=1e-6,
  )
