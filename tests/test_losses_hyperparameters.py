"""Temperatures and weights: concrete bad values raise, traced ones give nan.

A value known at trace time (Python number, NumPy scalar, concrete jax
array, or a constant closed over by ``jax.jit``) that is invalid raises
``ValueError`` naming the argument. The same value passed as a traced
argument cannot be inspected; it must turn every example of the loss into
``nan`` (never a plausible number), and a valid traced value must give the
eager result.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import losses
from tests import helpers

B, C = 3, 4
_rng = np.random.default_rng(0)
S = _rng.standard_normal((B, C)).astype(np.float32)
T = _rng.standard_normal((B, C)).astype(np.float32)
Y = np.array([0, 2, 3], np.int32)
FEATURES = _rng.standard_normal((B, 4, 4, 2)).astype(np.float32)
KEY = jax.random.key(0)

# name -> (argument, valid value, invalid values, call(value) -> output).
CASES = {
    "kd_loss.temperature": (
        "temperature", 2.0, [0.0, -1.0, np.nan, np.inf],
        lambda x: losses.kd_loss(S, T, temperature=x)),
    "kl_divergence.temperature": (
        "temperature", 2.0, [0.0, -1.0],
        lambda x: losses.kl_divergence(S, T, temperature=x)),
    "soft_cross_entropy.temperature": (
        "temperature", 2.0, [0.0, -1.0],
        lambda x: losses.soft_cross_entropy(S, T, temperature=x)),
    "log_soft_targets.temperature": (
        "temperature", 2.0, [0.0, -1.0],
        lambda x: losses.log_soft_targets(T, temperature=x)),
    "distillation_loss.temperature": (
        "temperature", 2.0, [0.0, -3.0, np.nan],
        lambda x: losses.distillation_loss(
            S, T, Y, temperature=x, alpha=0.5)),
    "distillation_loss.alpha": (
        "alpha", 0.5, [-0.1, 1.5, np.nan],
        lambda x: losses.distillation_loss(S, T, Y, temperature=2.0, alpha=x)),
    "distillation_loss.label_smoothing": (
        "label_smoothing", 0.1, [-0.1, 1.5],
        lambda x: losses.distillation_loss(
            S, T, Y, temperature=2.0, alpha=0.5, label_smoothing=x)),
    "reverse_kl_divergence.temperature": (
        "temperature", 2.0, [0.0, -1.0],
        lambda x: losses.reverse_kl_divergence(S, T, temperature=x)),
    "jensen_shannon_divergence.beta": (
        "beta", 0.3, [-0.1, 1.1, np.nan],
        lambda x: losses.jensen_shannon_divergence(S, T, beta=x)),
    "jensen_shannon_divergence.temperature": (
        "temperature", 2.0, [0.0, -1.0],
        lambda x: losses.jensen_shannon_divergence(S, T, temperature=x)),
    "total_variation_distance.temperature": (
        "temperature", 2.0, [0.0, -1.0],
        lambda x: losses.total_variation_distance(S, T, temperature=x)),
    "dkd_loss.alpha": (
        "alpha", 1.0, [-1.0, np.nan, np.inf],
        lambda x: losses.dkd_loss(S, T, Y, alpha=x)),
    "dkd_loss.beta": (
        "beta", 8.0, [-1.0, np.nan],
        lambda x: losses.dkd_loss(S, T, Y, beta=x)),
    "dkd_loss.temperature": (
        "temperature", 4.0, [0.0, -4.0],
        lambda x: losses.dkd_loss(S, T, Y, temperature=x)),
    "multi_teacher_kd_loss.temperature": (
        "temperature", 2.0, [0.0, -2.0],
        lambda x: losses.multi_teacher_kd_loss(
            S, np.stack([T, S]), temperature=x)),
    "multi_teacher_kd_loss.weights": (
        "weights", np.array([1.0, 3.0], np.float32),
        [np.array([-1.0, 3.0], np.float32), np.array([0.0, 0.0], np.float32)],
        lambda x: losses.multi_teacher_kd_loss(S, np.stack([T, S]), weights=x)),
    "ensemble_log_soft_targets.temperature": (
        "temperature", 2.0, [0.0, -2.0],
        lambda x: losses.ensemble_log_soft_targets(
            np.stack([T, S]), temperature=x)),
    "teacher_confidence_weights.temperature": (
        "temperature", 2.0, [0.0, -2.0],
        lambda x: losses.teacher_confidence_weights(
            np.stack([T, S]), temperature=x)),
    "perturbed_kd_loss.temperature": (
        "temperature", 2.0, [0.0, -2.0],
        lambda x: losses.perturbed_kd_loss(S, T, KEY, temperature=x)),
    "perturbed_kd_loss.noise_scale": (
        "noise_scale", 0.1, [-0.1, np.nan],
        lambda x: losses.perturbed_kd_loss(S, T, KEY, noise_scale=x)),
    "perturb_inputs.noise_scale": (
        "noise_scale", 0.1, [-0.1],
        lambda x: losses.perturb_inputs(S, KEY, noise_scale=x)),
    "teacher_free_kd_loss.temperature": (
        "temperature", 20.0, [0.0, -1.0],
        lambda x: losses.teacher_free_kd_loss(S, Y, temperature=x)),
    "teacher_free_kd_loss.correct_probability": (
        "correct_probability", 0.9, [0.0, 1.5, np.nan],
        lambda x: losses.teacher_free_kd_loss(S, Y, correct_probability=x)),
    "virtual_teacher_targets.correct_probability": (
        "correct_probability", 0.9, [0.0, 1.5],
        lambda x: losses.virtual_teacher_targets(
            Y, num_classes=C, correct_probability=x)),
    "attention_transfer_loss.p": (
        "p", 2.0, [0.0, -1.0],
        lambda x: losses.attention_transfer_loss(FEATURES, FEATURES * 2, p=x)),
    "crd_loss.temperature": (
        "temperature", 0.07, [0.0, -1.0],
        lambda x: losses.crd_loss(
            S, T, losses.init_crd_queue(5, C, key=KEY), temperature=x)[0]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_concrete_invalid_values_raise_naming_the_argument(case):
  name, _, invalid, call = CASES[case]
  for bad in invalid:
    for concrete in (bad, np.asarray(bad, np.float32), jnp.asarray(bad)):
      with pytest.raises(ValueError, match=name):
        call(concrete)
    # A constant closed over by jit is concrete too.
    with pytest.raises(ValueError, match=name):
      jax.jit(lambda: call(bad))()


@pytest.mark.parametrize("case", sorted(CASES))
def test_traced_values_invalid_give_nan_valid_give_the_eager_result(case):
  _, good, invalid, call = CASES[case]
  traced = jax.jit(call)
  helpers.assert_close(traced(jnp.asarray(good)), call(good), rtol=1e-6)
  for bad in invalid:
    out = np.asarray(traced(jnp.asarray(bad, jnp.float32)))
    assert np.all(np.isnan(out)), (bad, out)


def test_traced_invalid_temperature_is_nan_even_in_masked_rows():
  where = jnp.array([True, False, True])
  out = jax.jit(
      lambda t: losses.kd_loss(S, T, temperature=t, where=where)
  )(jnp.float32(-1.0))
  assert np.all(np.isnan(np.asarray(out)))


def test_validation_helpers():
  from jaxkd.losses import validation as v  # pylint: disable=g-import-not-at-top

  assert v.check_positive("t", 2.0) is True
  assert v.nan_unless(True, jnp.ones(2)).tolist() == [1.0, 1.0]
  out = jax.jit(
      lambda t: v.nan_unless(v.check_positive("t", t), jnp.ones(2))
  )(jnp.float32(0.0))
  assert np.all(np.isnan(np.asarray(out)))
  with pytest.raises(TypeError, match="t"):
    v.check_positive("t", "2")


def test_public_validation_module():
  from jaxkd.losses import validation as v  # pylint: disable=g-import-not-at-top

  assert all(callable(getattr(v, name)) for name in v.__all__)
  assert v.check_int("n", np.int64(3), minimum=2) == 3
  for bad, error in ((2.0, TypeError), (True, TypeError), (1, ValueError)):
    with pytest.raises(error, match="`n`"):
      v.check_int("n", bad, minimum=2)
  with pytest.raises(ValueError, match=r"`mask` must have shape \(2,\)"):
    v.check_boolean_mask("mask", np.ones(3, bool), (2,))
  with pytest.raises(ValueError, match="`mask` of shape .* token shape"):
    v.broadcast_where(np.ones(2, bool), (3,), name="mask",
                      target="token shape")
  x = jnp.arange(6.0).reshape(2, 3)
  where = v.example_where(np.array([True, False]), x, axis=1)
  assert where.shape == (2,)
  np.testing.assert_array_equal(
      v.zero_masked_examples(x, where, 1), [[0.0, 1.0, 2.0], [0.0, 0.0, 0.0]]
  )
