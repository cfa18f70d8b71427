"""Tests of the teacher-free (virtual teacher) losses against float64 NumPy."""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxkd import losses
from tests import helpers


# Independent float64 references, written from the formulas.
def np_targets(labels, num_classes, a):
  labels = np.asarray(labels)
  targets = np.full(labels.shape + (num_classes,), (1 - a) / (num_classes - 1))
  np.put_along_axis(targets, labels[..., None], a, axis=-1)
  return targets


def np_log_softmax(z, axis=-1):
  z = np.asarray(z, np.float64)
  shifted = z - np.max(z, axis=axis, keepdims=True)
  return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def np_tfkd(student, labels, a, temperature):
  q = np_targets(labels, student.shape[-1], a)
  # softmax(log q / T) = q^(1/T) / sum q^(1/T); q = 0 stays 0.
  powered = np.power(q, 1.0 / temperature)
  teacher = powered / powered.sum(-1, keepdims=True)
  log_student = np_log_softmax(np.asarray(student, np.float64) / temperature)
  log_teacher = np.log(np.where(teacher > 0, teacher, 1.0))
  terms = np.where(teacher > 0, teacher * (log_teacher - log_student), 0.0)
  return temperature**2 * terms.sum(-1)


def inputs(rng, shape=(4, 3), num_classes=6, dtype=np.float64):
  student = (3.0 * rng.standard_normal(shape + (num_classes,))).astype(dtype)
  labels = rng.integers(0, num_classes, shape)
  return student, labels


# virtual_teacher_targets / virtual_teacher_log_targets


@pytest.mark.parametrize("a", [0.25, 0.9, 0.999, 1.0])
def test_targets_match_reference(x64, rng, a):
  labels = rng.integers(0, 5, (3, 2))
  targets = losses.virtual_teacher_targets(labels, 5, correct_probability=a)
  log_targets = losses.virtual_teacher_log_targets(
      labels, 5, correct_probability=a
  )
  assert targets.shape == (3, 2, 5) and targets.dtype == jnp.float64
  assert log_targets.dtype == jnp.float64
  expected = np_targets(labels, 5, a)
  helpers.assert_close(targets, expected, rtol=1e-15)
  helpers.assert_close(targets.sum(-1), 1.0, rtol=1e-15)
  with np.errstate(divide="ignore"):
    helpers.assert_close(log_targets, np.log(expected), rtol=1e-14)


def test_targets_golden_and_dtype():
  targets = losses.virtual_teacher_targets(jnp.array([2, 0]), 3)
  assert targets.dtype == jnp.float32
  np.testing.assert_allclose(
      targets, [[0.05, 0.05, 0.9], [0.9, 0.05, 0.05]], rtol=1e-6
  )
  # a = 1/C is the uniform distribution; a = 1 the one-hot labels, with
  # exact -inf in log space.
  uniform = losses.virtual_teacher_targets(
      jnp.array(1), 4, correct_probability=0.25
  )
  np.testing.assert_allclose(uniform, np.full(4, 0.25), rtol=1e-7)
  log_one_hot = losses.virtual_teacher_log_targets(
      jnp.array(1), 3, correct_probability=1.0
  )
  np.testing.assert_array_equal(log_one_hot, [-np.inf, 0.0, -np.inf])
  bf16 = losses.virtual_teacher_log_targets(
      jnp.array([0]), 3, dtype=jnp.bfloat16
  )
  assert bf16.dtype == jnp.bfloat16


def test_log_targets_are_accurate_near_one(x64):
  a = 1 - 1e-12
  log_targets = losses.virtual_teacher_log_targets(
      np.array(0), 3, correct_probability=a
  )
  # log((1 - a) / 2) via log1p: no cancellation in 1 - a.
  helpers.assert_close(
      log_targets, [np.log1p(-1e-12), np.log(1e-12 / 2), np.log(1e-12 / 2)],
      rtol=1e-4,
  )


# teacher_free_kd_loss


@pytest.mark.parametrize("a", [0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 4.0, 20.0])
def test_loss_matches_float64_reference(x64, rng, a, temperature):
  student, labels = inputs(rng)
  loss = losses.teacher_free_kd_loss(
      student, labels, correct_probability=a, temperature=temperature
  )
  assert loss.shape == (4, 3) and loss.dtype == jnp.float64
  helpers.assert_close(
      loss, np_tfkd(student, labels, a, temperature), rtol=1e-12
  )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_loss_low_precision(rng, dtype):
  student, labels = inputs(rng, dtype=np.float32)
  student = jnp.asarray(student, dtype)
  loss = losses.teacher_free_kd_loss(student, labels, temperature=4.0)
  assert loss.dtype == jnp.float32
  expected = np_tfkd(np.asarray(student, np.float64), labels, 0.9, 4.0)
  helpers.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_loss_golden_values(x64, rng):
  student, labels = inputs(rng, shape=(5,))
  # a = 1/C: the virtual teacher is uniform at every temperature.
  loss = losses.teacher_free_kd_loss(
      student, labels, correct_probability=1 / 6, temperature=3.0
  )
  log_s = np_log_softmax(student / 3.0)
  helpers.assert_close(
      loss, 9.0 * np.sum((np.log(1 / 6) - log_s) / 6, axis=-1), rtol=1e-12
  )
  # a = 1, T = 1: the hard-label cross-entropy.
  loss = losses.teacher_free_kd_loss(
      student, labels, correct_probability=1.0, temperature=1.0
  )
  helpers.assert_close(
      loss, -np_log_softmax(student)[np.arange(5), labels], rtol=1e-12
  )
  # The virtual teacher's log-probabilities act as teacher logits.
  log_q = losses.virtual_teacher_log_targets(labels, 6)
  helpers.assert_close(
      losses.teacher_free_kd_loss(student, labels, temperature=7.0),
      losses.kd_loss(student, log_q, temperature=7.0),
      rtol=1e-12,
  )


def test_loss_grads(x64, rng):
  student, labels = inputs(rng, shape=(3,), num_classes=4)
  check_grads(
      jax.jit(lambda s: losses.teacher_free_kd_loss(
          s, labels, correct_probability=0.8, temperature=2.0
      )),
      (student,),
      order=2,
      modes=["rev"],
  )


def test_loss_jit_vmap_where_axis(rng):
  student, labels = inputs(rng, dtype=np.float32)
  fn = functools.partial(losses.teacher_free_kd_loss, temperature=4.0)
  helpers.assert_jit_matches_eager(fn, student, labels)
  where = rng.random((4, 3)) > 0.4
  masked = fn(student, labels, where=jnp.asarray(where))
  helpers.assert_close(
      masked[where], fn(student[where], labels[where]), rtol=1e-6
  )
  np.testing.assert_array_equal(np.asarray(masked)[~where], 0.0)
  along_1 = fn(np.moveaxis(student, -1, 1), labels, axis=1)
  helpers.assert_close(along_1, fn(student, labels), rtol=1e-6)
  vmapped = jax.vmap(fn)(student, labels)
  looped = jnp.stack([fn(s, l) for s, l in zip(student, labels)])
  helpers.assert_close(vmapped, looped, rtol=1e-6)


def test_where_allows_padding_labels_and_blocks_nan():
  student = jnp.array([[1.0, 2.0, 0.0], [jnp.nan, jnp.inf, 0.0]])
  labels = np.array([1, -1])  # -1: padding, masked out
  where = np.array([True, False])
  value, grad = jax.value_and_grad(
      lambda s: jnp.sum(losses.teacher_free_kd_loss(s, labels, where=where))
  )(student)
  assert np.isfinite(value)
  np.testing.assert_array_equal(grad[1], 0.0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("temperature", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("a", [0.9, 1.0])
def test_extremes_are_finite(dtype, temperature, a):
  student = jnp.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 5.0]], dtype)
  labels = jnp.array([1, 0])
  helpers.assert_finite_value_and_grad(
      lambda s: losses.teacher_free_kd_loss(
          s, labels, correct_probability=a, temperature=temperature
      ),
      student,
      argnums=0,
  )


jitted_loss = jax.jit(losses.teacher_free_kd_loss)


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(
    st.integers(0, 2**31 - 1), st.floats(0.2, 1.0), st.floats(0.1, 30.0)
)
def test_properties(seed, a, temperature):
  # Non-negative, and zero when the student's logits are the virtual
  # teacher's log-probabilities up to a per-row shift.
  with jax.enable_x64(True):
    rng = np.random.default_rng(seed)
    student, labels = inputs(rng, shape=(3,), num_classes=4)
    loss = np.asarray(jitted_loss(
        student, labels, correct_probability=a, temperature=temperature
    ))
    assert np.all(loss >= -1e-12)
    a = min(a, 1 - 1e-9)  # keep log q finite for the student logits
    log_q = np.log(np_targets(labels, 4, a))
    shifted = log_q + rng.standard_normal((3, 1))
    np.testing.assert_allclose(
        jitted_loss(shifted, labels, correct_probability=a,
                    temperature=temperature),
        0.0, atol=1e-9,
    )


OUT_OF_RANGE = np.array([0, 4])


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda s: losses.teacher_free_kd_loss(s, OUT_OF_RANGE), ValueError,
         "labels"),
        (lambda s: losses.teacher_free_kd_loss(s, np.array([0, -1])),
         ValueError, "labels"),
        (lambda s: losses.teacher_free_kd_loss(s, jnp.zeros(3, jnp.int32)),
         ValueError, "labels"),
        (lambda s: losses.teacher_free_kd_loss(s, jnp.zeros(2)), TypeError,
         "labels"),
        (lambda s: losses.teacher_free_kd_loss(
            s.astype(jnp.int32), jnp.zeros(2, jnp.int32)), TypeError,
         "student_logits"),
        (lambda s: losses.teacher_free_kd_loss(
            s[:, :1], jnp.zeros(2, jnp.int32)), ValueError, "student_logits"),
        (lambda s: losses.teacher_free_kd_loss(
            s, jnp.zeros(2, jnp.int32), temperature=0.0), ValueError,
         "temperature"),
        (lambda s: losses.teacher_free_kd_loss(
            s, jnp.zeros(2, jnp.int32), correct_probability=0.0), ValueError,
         "correct_probability"),
        (lambda s: losses.teacher_free_kd_loss(
            s, jnp.zeros(2, jnp.int32), correct_probability=1.5), ValueError,
         "correct_probability"),
        (lambda s: losses.teacher_free_kd_loss(
            s, jnp.zeros(2, jnp.int32), where=jnp.ones(3, bool)), ValueError,
         "where"),
        (lambda s: losses.virtual_teacher_targets(OUT_OF_RANGE, 4),
         ValueError, "labels"),
        (lambda s: losses.virtual_teacher_targets(jnp.zeros(2), 4),
         TypeError, "labels"),
        (lambda s: losses.virtual_teacher_targets(jnp.zeros(2, jnp.int32), 1),
         ValueError, "num_classes"),
        (lambda s: losses.virtual_teacher_targets(
            jnp.zeros(2, jnp.int32), 4.0), TypeError, "num_classes"),
        (lambda s: losses.virtual_teacher_log_targets(
            jnp.zeros(2, jnp.int32), True), TypeError, "num_classes"),
        (lambda s: losses.virtual_teacher_log_targets(
            jnp.zeros(2, jnp.int32), 4, correct_probability=-0.1),
         ValueError, "correct_probability"),
        (lambda s: losses.virtual_teacher_targets(
            jnp.zeros(2, jnp.int32), 4, dtype=jnp.int32), TypeError, "dtype"),
    ],
)
def test_bad_input_raises_at_trace_time(call, error, match):
  student = jnp.zeros((2, 4))
  with pytest.raises(error, match=match):
    jax.jit(call)(student)
