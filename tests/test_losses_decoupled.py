"""Tests for jaxkd.losses.dkd_loss (decoupled knowledge distillation)."""

from __future__ import annotations

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from jaxkd import losses
from tests import helpers


# Numerical tests call the loss through one jit (compiled once per shape and
# dtype; hyper-parameters are traced) to keep the file fast. Eager behaviour
# (errors, concrete label checks) is tested on `losses.dkd_loss` itself.
_dkd = jax.jit(losses.dkd_loss, static_argnames=("axis",))


# ---------------------------------------------------------------------------
# Independent float64 NumPy reference, written from probabilities (fine at
# moderate logits, where 1 - p_t does not cancel).


def _softmax(x):
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _kl(p, q):
  return np.sum(p * np.log(p / q), axis=-1)


def ref_parts(student, teacher, labels, temperature):
  """(TCKD, NCKD, p_target of the teacher), class axis last, float64."""
  student = np.asarray(student, np.float64)
  teacher = np.asarray(teacher, np.float64)
  labels = np.asarray(labels)
  shape = student.shape[:-1]
  num_classes = student.shape[-1]
  s = student.reshape(-1, num_classes)
  t = teacher.reshape(-1, num_classes)
  y = labels.reshape(-1)
  tckd, nckd, pt_target = [], [], []
  for i in range(s.shape[0]):
    ps = _softmax(s[i] / temperature)
    pt = _softmax(t[i] / temperature)
    bs = np.array([ps[y[i]], 1.0 - ps[y[i]]])
    bt = np.array([pt[y[i]], 1.0 - pt[y[i]]])
    tckd.append(_kl(bt, bs))
    others = np.arange(num_classes) != y[i]
    nckd.append(_kl(pt[others] / bt[1], ps[others] / bs[1]))
    pt_target.append(pt[y[i]])
  return (
      np.array(tckd).reshape(shape),
      np.array(nckd).reshape(shape),
      np.array(pt_target).reshape(shape),
  )


def ref_dkd(student, teacher, labels, *, alpha, beta, temperature):
  tckd, nckd, _ = ref_parts(student, teacher, labels, temperature)
  return temperature**2 * (alpha * tckd + beta * nckd)


def _data(rng, shape, scale=2.0, dtype=np.float32):
  student = (scale * rng.standard_normal(shape)).astype(dtype)
  teacher = (scale * rng.standard_normal(shape)).astype(dtype)
  labels = rng.integers(0, shape[-1], size=shape[:-1]).astype(np.int32)
  return student, teacher, labels


# ---------------------------------------------------------------------------
# Agreement with the reference.


@pytest.mark.parametrize("shape", [(6,), (5, 7), (2, 3, 4)])
@pytest.mark.parametrize(
    "alpha,beta,temperature", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0), (2.0, 0.0, 0.5)]
)
def test_matches_float64_reference(x64, rng, shape, alpha, beta, temperature):
  student, teacher, labels = _data(rng, shape, dtype=np.float64)
  loss = _dkd(
      jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(labels),
      alpha=alpha, beta=beta, temperature=temperature,
  )
  assert loss.dtype == jnp.float64
  assert loss.shape == shape[:-1]
  expected = ref_dkd(
      student, teacher, labels, alpha=alpha, beta=beta,
      temperature=temperature,
  )
  helpers.assert_close(loss, expected, rtol=1e-12, atol=1e-14)


def test_float32_matches_reference(rng):
  student, teacher, labels = _data(rng, (8, 10))
  loss = _dkd(student, teacher, labels)
  assert loss.dtype == jnp.float32
  expected = ref_dkd(
      student, teacher, labels, alpha=1.0, beta=8.0, temperature=4.0
  )
  helpers.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_bfloat16_computed_in_float32(rng):
  # bfloat16 inputs are computed in float32, so against the float64 reference
  # of the bf16-rounded inputs only float32 rounding remains (1e-5 relative;
  # 1e-4 leaves room for the T^2 * beta amplification).
  student, teacher, labels = _data(rng, (8, 10))
  student = jnp.asarray(student, jnp.bfloat16)
  teacher = jnp.asarray(teacher, jnp.bfloat16)
  loss = _dkd(student, teacher, labels)
  assert loss.dtype == jnp.float32
  expected = ref_dkd(
      np.asarray(student, np.float64), np.asarray(teacher, np.float64), labels,
      alpha=1.0, beta=8.0, temperature=4.0,
  )
  helpers.assert_close(loss, expected, rtol=1e-4, atol=1e-5)


def test_golden_values(x64):
  # Two classes: NCKD is over a single class and vanishes; TCKD is the KL of
  # b_T = [3/4, 1/4] from b_S = [1/2, 1/2].
  student = jnp.array([0.0, 0.0])
  teacher = jnp.array([np.log(3.0), 0.0])
  expected = 0.75 * np.log(1.5) + 0.25 * np.log(0.5)
  loss = _dkd(
      student, teacher, jnp.array(0), alpha=1.0, beta=5.0, temperature=1.0
  )
  helpers.assert_close(loss, expected, rtol=1e-14)
  # Non-target term alone: teacher [3/4, 1/4] vs student [1/2, 1/2] over the
  # classes 1 and 2, whatever the target logit.
  student = jnp.array([5.0, 0.0, 0.0])
  teacher = jnp.array([-2.0, np.log(3.0), 0.0])
  loss = _dkd(
      student, teacher, jnp.array(0), alpha=0.0, beta=1.0, temperature=1.0
  )
  helpers.assert_close(loss, expected, rtol=1e-14)
  # Temperature scaling: T^2 times the value at logits / T.
  loss_t = _dkd(
      2.0 * student, 2.0 * teacher, jnp.array(0), alpha=0.0, beta=1.0,
      temperature=2.0,
  )
  helpers.assert_close(loss_t, 4.0 * expected, rtol=1e-14)


def test_zero_when_equal(rng):
  student, _, labels = _data(rng, (4, 6))
  loss = _dkd(student, student, labels)
  np.testing.assert_array_equal(np.asarray(loss), 0.0)


# ---------------------------------------------------------------------------
# Second routes to the same number.


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_decomposition(x64, rng, temperature):
  # Zhao et al., Eq. (4): KD = TCKD + (1 - p^T_target) NCKD, per example.
  student, teacher, labels = _data(rng, (6, 5), dtype=np.float64)
  args = (jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(labels))
  tckd = _dkd(*args, alpha=1.0, beta=0.0, temperature=temperature)
  nckd = _dkd(*args, alpha=0.0, beta=1.0, temperature=temperature)
  p_target = np.take_along_axis(
      _softmax(teacher / temperature), labels[:, None], axis=-1
  )[:, 0]
  kd = losses.kd_loss(args[0], args[1], temperature=temperature)
  helpers.assert_close(tckd + (1.0 - p_target) * nckd, kd, rtol=1e-12)
  both = _dkd(*args, alpha=1.0, beta=1.0, temperature=temperature)
  helpers.assert_close(both, tckd + nckd, rtol=1e-13)


def test_integer_and_one_hot_labels_agree(rng):
  student, teacher, labels = _data(rng, (5, 6))
  by_index = _dkd(student, teacher, labels)
  one_hot = jax.nn.one_hot(labels, 6)
  helpers.assert_close(
      _dkd(student, teacher, one_hot), by_index, rtol=1e-7
  )
  helpers.assert_close(
      _dkd(student, teacher, one_hot.astype(jnp.bool_)), by_index,
      rtol=1e-7,
  )
  smoothed = 0.9 * one_hot + 0.1 / 6  # label smoothing keeps the argmax
  helpers.assert_close(
      _dkd(student, teacher, smoothed), by_index, rtol=1e-7
  )
  # One-hot labels follow `axis` like the logits.
  moved = _dkd(
      student.T, teacher.T, jnp.asarray(one_hot).T, axis=0
  )
  helpers.assert_close(moved, by_index, rtol=1e-6)


def test_jit_matches_eager(rng):
  student, teacher, labels = _data(rng, (4, 5))
  helpers.assert_jit_matches_eager(
      losses.dkd_loss, student, teacher, labels, alpha=0.5, beta=3.0
  )


def test_vmap_matches_loop(rng):
  student, teacher, labels = _data(rng, (3, 4, 5))
  batched = jax.vmap(lambda s, t, y: _dkd(s, t, y))(
      student, teacher, labels
  )
  looped = [
      _dkd(student[i], teacher[i], labels[i]) for i in range(3)
  ]
  helpers.assert_close(batched, np.stack(looped), rtol=1e-6)


def test_where_matches_slicing(rng):
  student, teacher, labels = _data(rng, (3, 4, 5))
  where = rng.random((3, 4)) > 0.4
  helpers.assert_where_matches_slicing(
      _dkd, (student, teacher, labels), where
  )


def test_masked_rows_do_not_leak(rng):
  student, teacher, labels = _data(rng, (4, 5))
  where = np.array([True, False, True, False])
  student[1] = np.nan
  teacher[3] = np.inf
  labels[1] = -1  # padding label, ignored under the mask
  labels[3] = 99

  def total(s, t):
    return jnp.sum(_dkd(s, t, labels, where=where))

  value, (g_s, g_t) = jax.value_and_grad(total, argnums=(0, 1))(
      student, teacher
  )
  assert np.isfinite(value)
  for g in (g_s, g_t):
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(np.asarray(g)[~where], 0.0)
  loss = losses.dkd_loss(student, teacher, labels, where=where)
  np.testing.assert_array_equal(np.asarray(loss)[~where], 0.0)


@pytest.mark.parametrize("axis", [0, 1])
def test_axis_matches_moveaxis(rng, axis):
  shape = [4, 3]
  shape.insert(axis, 5)
  student = rng.standard_normal(shape).astype(np.float32)
  teacher = rng.standard_normal(shape).astype(np.float32)
  labels = jnp.asarray(rng.integers(0, 5, size=(4, 3)), jnp.int32)
  helpers.assert_axis_matches_moveaxis(
      lambda s, t, axis: _dkd(s, t, labels, axis=axis),
      (student, teacher),
      axis,
  )


def test_check_grads_second_order(x64, rng):
  student, teacher, labels = _data(rng, (3, 4), dtype=np.float64)
  labels = jnp.asarray(labels)
  check_grads(
      lambda s, t: _dkd(s, t, labels, alpha=1.5, beta=2.0),
      (jnp.asarray(student), jnp.asarray(teacher)),
      order=2,
      modes=["rev"],
  )


# ---------------------------------------------------------------------------
# Extremes: mdistiller's log(softmax) and "-1000 * mask" fail here.

_EXTREME_PAIRS = [
    ([1e4, 0.0, 0.0], [1e4, 0.0, 0.0]),  # both confident, right
    ([0.0, 1e4, 0.0], [1e4, 0.0, 0.0]),  # student confident, wrong
    ([1e4, 0.0, 0.0], [0.0, 0.0, 1e4]),  # teacher confident elsewhere
    ([-1e4, 1e4, 0.0], [1e3, -1e3, 0.0]),
    ([1e4, -1e4, 1e4], [-1e4, 1e4, -1e4]),
    ([0.0, 0.0, 0.0], [1e4, 1e4, -1e4]),
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("temperature", [1e-3, 1.0, 4.0, 1e3])
def test_extremes_finite_value_and_grad(dtype, temperature):
  student = jnp.asarray([p[0] for p in _EXTREME_PAIRS], dtype)
  teacher = jnp.asarray([p[1] for p in _EXTREME_PAIRS], dtype)
  labels = jnp.zeros((len(_EXTREME_PAIRS),), jnp.int32)
  helpers.assert_finite_value_and_grad(
      lambda s, t: _dkd(s, t, labels, temperature=temperature),
      student,
      teacher,
  )


def test_both_confident_is_exactly_zero():
  logits = jnp.array([[1e4, 0.0, 0.0], [3e3, -3e3, 0.0]])
  labels = jnp.array([0, 0])
  value, grad = jax.value_and_grad(
      lambda s: jnp.sum(_dkd(s, logits, labels))
  )(logits)
  np.testing.assert_array_equal(np.asarray(value), 0.0)
  np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_extreme_float32_matches_float64(x64):
  # The margin form keeps float32 accurate at large gaps: compare it with the
  # same function in float64 (no cancellation of log-normalisers).
  student = np.array([p[0] for p in _EXTREME_PAIRS[:4]])
  teacher = np.array([p[1] for p in _EXTREME_PAIRS[:4]])
  student[:, 1:] += np.array([0.5, -0.25])
  labels = jnp.zeros((4,), jnp.int32)
  wide = _dkd(jnp.asarray(student), jnp.asarray(teacher), labels)
  narrow = _dkd(
      jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32),
      labels,
  )
  helpers.assert_close(narrow, wide, rtol=1e-5, atol=1e-6)


def test_traced_out_of_range_labels_give_nan(rng):
  student, teacher, _ = _data(rng, (2, 4))
  labels = jnp.array([1, 7], jnp.int32)
  loss = jax.jit(_dkd)(student, teacher, labels)
  assert np.isfinite(loss[0]) and np.isnan(loss[1])
  grad = jax.grad(
      lambda s, y: jnp.nansum(_dkd(s, teacher, y))
  )(student, labels)
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(np.asarray(grad[1]), 0.0)


# ---------------------------------------------------------------------------
# Errors.


@pytest.fixture
def args(rng):
  return _data(rng, (3, 4))


def test_error_negative_weights(args):
  with pytest.raises(ValueError, match="alpha"):
    losses.dkd_loss(*args, alpha=-1.0)
  with pytest.raises(ValueError, match="beta"):
    losses.dkd_loss(*args, beta=-0.5)


def test_error_temperature(args):
  with pytest.raises(ValueError, match="temperature"):
    losses.dkd_loss(*args, temperature=0.0)


def test_error_label_dtype(args):
  student, teacher, labels = args
  with pytest.raises(TypeError, match="labels"):
    losses.dkd_loss(student, teacher, labels.astype(np.float32))


def test_error_label_shape(args):
  student, teacher, labels = args
  with pytest.raises(ValueError, match="labels"):
    losses.dkd_loss(student, teacher, labels[:2])
  with pytest.raises(ValueError, match="labels"):
    losses.dkd_loss(student, teacher, labels[:, None])


def test_error_label_range(args):
  student, teacher, labels = args
  labels = labels.copy()
  labels[0] = 4
  with pytest.raises(ValueError, match="labels"):
    losses.dkd_loss(student, teacher, labels)
  labels[0] = -1
  with pytest.raises(ValueError, match="labels"):
    losses.dkd_loss(student, teacher, labels)
  # Out-of-range labels under the mask are padding, not errors.
  where = np.array([False, True, True])
  loss = losses.dkd_loss(student, teacher, labels, where=where)
  assert loss[0] == 0.0


def test_error_logits(args):
  student, teacher, labels = args
  with pytest.raises(TypeError, match="student_logits"):
    losses.dkd_loss(student.astype(np.int32), teacher, labels)
  with pytest.raises(ValueError, match="teacher_logits"):
    losses.dkd_loss(student, teacher[:, :3], labels)
  with pytest.raises(ValueError, match="2 classes"):
    losses.dkd_loss(student[:, :1], teacher[:, :1], labels * 0)
  with pytest.raises(ValueError, match="axis"):
    losses.dkd_loss(student, teacher, labels, axis=2)


# ---------------------------------------------------------------------------
# Properties.

_jitted_parts = jax.jit(
    lambda s, t, y: (
        losses.dkd_loss(s, t, y, alpha=1.0, beta=0.0),
        losses.dkd_loss(s, t, y, alpha=0.0, beta=1.0),
    )
)


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([0.1, 3.0, 30.0]),
    shift=st.floats(-50.0, 50.0),
)
def test_properties(seed, scale, shift):
  rng = np.random.default_rng(seed)
  student, teacher, labels = _data(rng, (4, 5), scale=scale)
  tckd, nckd = _jitted_parts(student, teacher, labels)
  # Each part is a KL divergence: non-negative (up to float32 rounding).
  assert np.all(np.asarray(tckd) >= -1e-5)
  assert np.all(np.asarray(nckd) >= -1e-5)
  # Invariant to adding a constant to a row of either model's logits.
  row_shift = (shift * rng.standard_normal((4, 1))).astype(np.float32)
  shifted = _jitted_parts(student + row_shift, teacher - row_shift, labels)
  helpers.assert_close(shifted, (tckd, nckd), rtol=1e-3, atol=2e-3)
  # Zero at equality.
  zero = _jitted_parts(teacher, teacher, labels)
  helpers.assert_close(zero, (np.zeros(4), np.zeros(4)), rtol=0, atol=1e-6)
