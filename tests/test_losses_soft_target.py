"""Tests of the soft-target losses against float64 NumPy formulas."""

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


# Independent float64 references, written from the formulas.
def np_log_softmax(z, axis=-1):
  z = np.asarray(z, np.float64)
  shifted = z - np.max(z, axis=axis, keepdims=True)
  return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def np_kl(student, teacher, temperature=1.0, axis=-1):
  log_t = np_log_softmax(np.asarray(teacher, np.float64) / temperature, axis)
  log_s = np_log_softmax(np.asarray(student, np.float64) / temperature, axis)
  return np.sum(np.exp(log_t) * (log_t - log_s), axis=axis)


def np_soft_ce(student, teacher, temperature=1.0):
  log_t = np_log_softmax(np.asarray(teacher, np.float64) / temperature)
  log_s = np_log_softmax(np.asarray(student, np.float64) / temperature)
  return -np.sum(np.exp(log_t) * log_s, axis=-1)


def np_distillation(student, teacher, labels, temperature, alpha, smoothing):
  num_classes = student.shape[-1]
  one_hot = np.eye(num_classes)[labels]
  targets = (1 - smoothing) * one_hot + smoothing / num_classes
  hard = -np.sum(targets * np_log_softmax(student), axis=-1)
  soft = temperature**2 * np_kl(student, teacher, temperature)
  return (1 - alpha) * hard + alpha * soft


PAIR_LOSSES = {
    "kl_divergence": (losses.kl_divergence, np_kl),
    "kd_loss": (
        losses.kd_loss,
        lambda s, t, temperature=1.0: temperature**2 * np_kl(s, t, temperature),
    ),
    "soft_cross_entropy": (losses.soft_cross_entropy, np_soft_ce),
}


def logits_pair(rng, shape=(4, 3, 7), scale=3.0, dtype=np.float64):
  student = (scale * rng.standard_normal(shape)).astype(dtype)
  teacher = (scale * rng.standard_normal(shape)).astype(dtype)
  return student, teacher


# Golden values: soft targets of [9, 5, 2] computed by hand,
# exp(z / T) / sum exp(z / T), rounded to 4 digits.
@pytest.mark.parametrize(
    "temperature, expected",
    [
        (0.5, [0.9997, 0.0003, 0.0000]),
        (1.0, [0.9811, 0.0180, 0.0009]),
        (10.0, [0.4615, 0.3093, 0.2292]),
    ],
)
def test_soft_targets_golden(temperature, expected):
  probs = losses.soft_targets(jnp.array([9.0, 5.0, 2.0]), temperature=temperature)
  np.testing.assert_allclose(np.asarray(probs), expected, atol=5e-5)


def test_soft_targets_matches_float64_reference(x64, rng):
  logits = rng.standard_normal((5, 6))
  for temperature in (0.3, 1.0, 7.0):
    log_probs = losses.log_soft_targets(logits, temperature=temperature)
    helpers.assert_close(
        log_probs, np_log_softmax(logits / temperature), rtol=1e-12
    )
    helpers.assert_close(
        losses.soft_targets(logits, temperature=temperature),
        np.exp(np_log_softmax(logits / temperature)),
        rtol=1e-12,
    )


def test_soft_targets_limits():
  logits = jnp.array([1.0, 3.0, 2.0])
  cold = losses.soft_targets(logits, temperature=1e-3)
  np.testing.assert_array_equal(np.asarray(cold), [0.0, 1.0, 0.0])
  hot = losses.soft_targets(logits, temperature=1e6)
  np.testing.assert_allclose(np.asarray(hot), np.full(3, 1 / 3), rtol=1e-5)


def test_log_soft_targets_keeps_minus_inf():
  log_probs = losses.log_soft_targets(jnp.array([0.0, -jnp.inf, 0.0]))
  np.testing.assert_allclose(
      np.asarray(log_probs), [np.log(0.5), -np.inf, np.log(0.5)]
  )


@pytest.mark.parametrize("name", sorted(PAIR_LOSSES))
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_pair_loss_matches_float64_reference(x64, rng, name, temperature):
  fn, reference = PAIR_LOSSES[name]
  student, teacher = logits_pair(rng)
  actual = fn(student, teacher, temperature=temperature)
  assert actual.dtype == jnp.float64
  assert actual.shape == (4, 3)
  helpers.assert_close(
      actual, reference(student, teacher, temperature=temperature), rtol=1e-12
  )


@pytest.mark.parametrize("name", sorted(PAIR_LOSSES))
@pytest.mark.parametrize(
    "dtype, rtol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-5)]
)
def test_pair_loss_low_precision(rng, name, dtype, rtol):
  fn, reference = PAIR_LOSSES[name]
  student, teacher = logits_pair(rng, dtype=np.float32)
  student, teacher = jnp.asarray(student, dtype), jnp.asarray(teacher, dtype)
  # 16-bit inputs are computed and returned in float32, so the result is
  # float32-accurate for the rounded inputs.
  helpers.assert_float32_matches_reference(
      fn, reference, student, teacher, rtol=rtol, atol=1e-6, temperature=2.0
  )


@pytest.mark.parametrize("name", sorted(PAIR_LOSSES))
def test_pair_loss_grads(x64, rng, name):
  fn, _ = PAIR_LOSSES[name]
  student, teacher = logits_pair(rng, shape=(2, 4))
  check_grads(
      lambda s, t: fn(s, t, temperature=1.7), (student, teacher), order=2,
      modes=["rev"],
  )


@pytest.mark.parametrize("name", sorted(PAIR_LOSSES))
def test_pair_loss_jit_where_axis(rng, name):
  fn, _ = PAIR_LOSSES[name]
  student, teacher = logits_pair(rng, dtype=np.float32)
  where = rng.random((4, 3)) > 0.4
  helpers.assert_jit_where_axis(fn, student, teacher, where, temperature=2.0)


def test_where_blocks_nan_rows():
  student = jnp.array([[1.0, 2.0], [jnp.nan, jnp.inf]])
  teacher = jnp.array([[0.0, 1.0], [jnp.inf, -jnp.inf]])
  where = jnp.array([True, False])
  value, grad = jax.value_and_grad(
      lambda s: jnp.sum(losses.kd_loss(s, teacher, where=where))
  )(student)
  assert np.isfinite(value)
  np.testing.assert_array_equal(np.asarray(grad[1]), [0.0, 0.0])


def test_vmap_over_teachers_matches_loop(rng):
  student, _ = logits_pair(rng, shape=(5, 6), dtype=np.float32)
  teachers = rng.standard_normal((3, 5, 6)).astype(np.float32)
  kd = functools.partial(losses.kd_loss, temperature=3.0)
  vmapped = jax.vmap(kd, in_axes=(None, 0))(student, teachers)
  looped = jnp.stack([kd(student, t) for t in teachers])
  helpers.assert_close(vmapped, looped, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("temperature", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("name", sorted(PAIR_LOSSES) + ["distillation_loss"])
def test_extremes_are_finite(dtype, temperature, name):
  student = jnp.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 5.0]], dtype)
  teacher = jnp.array([[-1e4, 1e4, 0.0], [-1e4, 1e4, -5.0]], dtype)
  if name == "distillation_loss":
    fn = functools.partial(
        losses.distillation_loss, labels=jnp.array([0, 2]),
        temperature=temperature, alpha=0.5,
    )
  else:
    fn = functools.partial(PAIR_LOSSES[name][0], temperature=temperature)
  helpers.assert_finite_value_and_grad(lambda s, t: fn(s, t), student, teacher)


def test_kd_gradient_scale_is_temperature_free(x64):
  # d/dz_S of T^2 KL is T (p_S - p_T); for large T, p ~ (1 + z / T) / C, so
  # the gradient tends to (z_S - z_T) / C - mean: independent of T.
  student = np.array([0.3, -0.2, 0.5])
  teacher = np.array([1.0, 0.0, -1.0])
  grads = [
      jax.grad(lambda s: losses.kd_loss(s, teacher, temperature=t))(student)
      for t in (1e3, 1e4)
  ]
  diff = student - teacher
  limit = (diff - diff.mean()) / 3
  helpers.assert_close(grads[1], limit, rtol=1e-4)
  helpers.assert_close(grads[0], grads[1], rtol=1e-3)


def test_kl_minus_inf_teacher_classes_contribute_zero(x64):
  teacher = np.array([0.0, -np.inf, 1.0])
  student = np.array([0.5, 2.0, -1.0])
  # Reference on the supported classes only, with the student renormalised
  # over all classes.
  log_t = np_log_softmax(teacher[[0, 2]])
  log_s = np_log_softmax(student)[[0, 2]]
  expected = np.sum(np.exp(log_t) * (log_t - log_s))
  value, grad = jax.value_and_grad(
      lambda t, s: losses.kl_divergence(s, t), argnums=(0, 1)
  )(teacher, student)
  helpers.assert_close(value, expected, rtol=1e-12)
  for g in grad:
    assert np.all(np.isfinite(g))


def test_soft_cross_entropy_minus_kl_is_teacher_entropy(x64, rng):
  student, teacher = logits_pair(rng, shape=(6, 5))
  log_t = np_log_softmax(teacher / 2.0)
  entropy = -np.sum(np.exp(log_t) * log_t, axis=-1)
  difference = losses.soft_cross_entropy(
      student, teacher, temperature=2.0
  ) - losses.kl_divergence(student, teacher, temperature=2.0)
  helpers.assert_close(difference, entropy, rtol=1e-12)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("alpha", [0.0, 0.9, 1.0])
def test_distillation_loss_matches_reference(x64, rng, smoothing, alpha):
  student, teacher = logits_pair(rng, shape=(6, 5))
  labels = rng.integers(0, 5, size=6)
  actual = losses.distillation_loss(
      student, teacher, labels, temperature=4.0, alpha=alpha,
      label_smoothing=smoothing,
  )
  expected = np_distillation(student, teacher, labels, 4.0, alpha, smoothing)
  helpers.assert_close(actual, expected, rtol=1e-12)


def test_distillation_loss_integer_and_one_hot_labels_agree(rng):
  student, teacher = logits_pair(rng, shape=(6, 5), dtype=np.float32)
  labels = rng.integers(0, 5, size=6)
  one_hot = np.eye(5, dtype=np.float32)[labels]
  kwargs = dict(temperature=4.0, alpha=0.3, label_smoothing=0.1)
  helpers.assert_close(
      losses.distillation_loss(student, teacher, labels, **kwargs),
      losses.distillation_loss(student, teacher, one_hot, **kwargs),
      rtol=1e-6,
  )


def test_distillation_loss_where_axis_grads(x64, rng):
  student, teacher = logits_pair(rng, shape=(4, 5))
  labels = rng.integers(0, 5, size=4)
  where = np.array([True, False, True, True])
  masked = losses.distillation_loss(
      student, teacher, labels, temperature=2.0, alpha=0.5, where=where
  )
  sliced = losses.distillation_loss(
      student[where], teacher[where], labels[where], temperature=2.0,
      alpha=0.5,
  )
  helpers.assert_close(masked[where], sliced, rtol=1e-12)
  assert masked[1] == 0.0
  along_0 = losses.distillation_loss(
      student.T, teacher.T, labels, temperature=2.0, alpha=0.5, axis=0
  )
  helpers.assert_close(
      along_0,
      losses.distillation_loss(
          student, teacher, labels, temperature=2.0, alpha=0.5
      ),
      rtol=1e-12,
  )
  check_grads(
      lambda s: losses.distillation_loss(
          s, teacher, labels, temperature=2.0, alpha=0.5, label_smoothing=0.1
      ),
      (student,),
      order=2,
      modes=["rev"],
  )


# Property tests.
finite_logits = hnp.arrays(
    np.float64,
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=2, max_side=6),
    elements=st.floats(-30, 30),
)


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(finite_logits, st.floats(0.1, 10.0))
def test_kl_properties(logits, temperature):
  with jax.enable_x64(True):
    rng = np.random.default_rng(logits.size)
    other = logits + rng.standard_normal(logits.shape)
    kl = np.asarray(losses.kl_divergence(other, logits, temperature=temperature))
    assert np.all(kl >= -1e-12)
    same = np.asarray(
        losses.kl_divergence(logits, logits, temperature=temperature)
    )
    np.testing.assert_allclose(same, 0.0, atol=1e-12)
    shift = rng.standard_normal((logits.shape[0], 1)) * 50
    shifted = np.asarray(
        losses.kl_divergence(other + shift, logits - shift,
                             temperature=temperature)
    )
    np.testing.assert_allclose(shifted, kl, rtol=1e-9, atol=1e-9)


# Values are checked when they are known at trace time (closed over, not
# traced); shapes and dtypes always are.
OUT_OF_RANGE_LABELS = np.array([0, 4])


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda s, t: losses.kd_loss(s, t, temperature=0.0), ValueError,
         "temperature"),
        (lambda s, t: losses.kd_loss(s, t, temperature=-1.0), ValueError,
         "temperature"),
        (lambda s, t: losses.kd_loss(s, t[:, :3]), ValueError,
         "same shape"),
        (lambda s, t: losses.kd_loss(s.astype(jnp.int32), t), TypeError,
         "student_logits"),
        (lambda s, t: losses.kd_loss(s, t.astype(jnp.int32)), TypeError,
         "teacher_logits"),
        (lambda s, t: losses.kd_loss(s, t, axis=2), ValueError, "axis"),
        (lambda s, t: losses.kd_loss(s, t, where=jnp.ones(2)), TypeError,
         "where"),
        (lambda s, t: losses.kd_loss(s, t, where=jnp.ones(5, bool)),
         ValueError, "where"),
        (lambda s, t: losses.distillation_loss(
            s, t, jnp.zeros(2, jnp.int32), temperature=1.0, alpha=1.5),
         ValueError, "alpha"),
        (lambda s, t: losses.distillation_loss(
            s, t, jnp.zeros(3, jnp.int32), temperature=1.0, alpha=0.5),
         ValueError, "labels"),
        (lambda s, t: losses.distillation_loss(
            s, t, OUT_OF_RANGE_LABELS, temperature=1.0, alpha=0.5),
         ValueError, "labels"),
        (lambda s, t: losses.distillation_loss(
            s, t, jnp.zeros((2, 3)), temperature=1.0, alpha=0.5),
         ValueError, "labels"),
        (lambda s, t: losses.soft_targets(jnp.arange(3)), TypeError,
         "logits"),
    ],
)
def test_bad_input_raises_at_trace_time(call, error, match):
  student = jnp.zeros((2, 4))
  teacher = jnp.zeros((2, 4))
  with pytest.raises(error, match=match):
    jax.jit(call)(student, teacher)


def test_traced_temperature_is_accepted(rng):
  student, teacher = logits_pair(rng, shape=(3, 4), dtype=np.float32)
  traced = jax.jit(
      lambda t: losses.kd_loss(student, teacher, temperature=t)
  )(jnp.float32(2.0))
  helpers.assert_close(
      traced, losses.kd_loss(student, teacher, temperature=2.0), rtol=1e-6
  )
