"""Tests of the multi-teacher losses against float64 NumPy formulas."""

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

K, B, S, C = 3, 4, 2, 5  # teachers, batch, second per-example axis, classes


# Independent float64 references, written from the formulas. Teachers are
# [K, B, S, C]; weights are None, [K] or [K, B, S] (already broadcast).
def np_log_softmax(z, axis=-1):
  z = np.asarray(z, np.float64)
  shifted = z - np.max(z, axis=axis, keepdims=True)
  return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def np_weights(weights, teachers):
  """Normalised weights of shape [K, ..., 1] for teachers [K, ..., C]."""
  num_teachers = teachers.shape[0]
  if weights is None:
    weights = np.ones(num_teachers)
  weights = np.asarray(weights, np.float64)
  weights = weights.reshape(
      weights.shape + (1,) * (teachers.ndim - weights.ndim)
  )
  return weights / np.sum(weights, axis=0, keepdims=True)


def np_ensemble_log(
    teachers, temperature=1.0, weights=None, mode="probability"
):
  teachers = np.asarray(teachers, np.float64)
  w = np_weights(weights, teachers)
  if mode == "logit":
    return np_log_softmax(np.sum(w * teachers, axis=0) / temperature)
  probs = np.exp(np_log_softmax(teachers / temperature))
  return np.log(np.sum(w * probs, axis=0))


def np_kl(log_p, log_q):
  return np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)


def np_multi_kd(
    student, teachers, temperature=1.0, weights=None, reduction="ensemble",
    mode="probability",
):
  log_s = np_log_softmax(np.asarray(student, np.float64) / temperature)
  if reduction == "ensemble":
    log_e = np_ensemble_log(teachers, temperature, weights, mode)
    return temperature**2 * np_kl(log_e, log_s)
  log_t = np_log_softmax(np.asarray(teachers, np.float64) / temperature)
  w = np_weights(weights, np.asarray(teachers))[..., 0]
  return temperature**2 * np.sum(w * np_kl(log_t, log_s[None]), axis=0)


def np_confidence(teachers, temperature=1.0):
  log_p = np_log_softmax(np.asarray(teachers, np.float64) / temperature)
  entropy = -np.sum(np.exp(log_p) * log_p, axis=-1)
  e = np.exp(-entropy - np.max(-entropy, axis=0))
  return e / np.sum(e, axis=0)


def make_inputs(rng, dtype=np.float64, scale=3.0, shape=(B, S, C)):
  student = (scale * rng.standard_normal(shape)).astype(dtype)
  teachers = (scale * rng.standard_normal((K, *shape))).astype(dtype)
  return student, teachers


def make_weights(kind, rng, shape=(B, S)):
  if kind == "none":
    return None
  if kind == "per_teacher":
    return rng.uniform(0.2, 2.0, (K,))
  return rng.uniform(0.2, 2.0, (K, *shape))


WEIGHT_KINDS = ["none", "per_teacher", "per_example"]
LOSS_CONFIGS = [
    ("ensemble", "probability"),
    ("ensemble", "logit"),
    ("mean", "probability"),
]


# Shared jitted functions: compiling one program is much cheaper than running
# (higher-order) derivatives op by op, and every test below reuses it.
@jax.jit
def _all_losses(student, teachers, weights):
  return tuple(
      losses.multi_teacher_kd_loss(
          student, teachers, temperature=1.5, weights=weights,
          reduction=reduction, mode=mode,
      )
      for reduction, mode in LOSS_CONFIGS
  )


@jax.jit
def _every_function(student, teachers, weights):
  """Every public function's output, for gradient checks."""
  ensembles = tuple(
      losses.ensemble_soft_targets(
          teachers, temperature=1.5, weights=weights, mode=mode
      )
      for mode in ("probability", "logit")
  )
  confidence = losses.teacher_confidence_weights(teachers, temperature=1.5)
  return _all_losses(student, teachers, weights) + ensembles + (confidence,)


@jax.jit
def _grads_of_all_losses(student, teachers, weights):
  return jax.grad(
      lambda *a: sum(jnp.sum(x) for x in _all_losses(*a)), argnums=(0, 1, 2)
  )(student, teachers, weights)


# --- Float64 references -----------------------------------------------------


@pytest.mark.parametrize("mode", ["probability", "logit"])
@pytest.mark.parametrize("kind", WEIGHT_KINDS)
@pytest.mark.parametrize("temperature", [0.5, 3.0])
def test_ensemble_matches_float64_reference(x64, rng, mode, kind, temperature):
  _, teachers = make_inputs(rng)
  weights = make_weights(kind, rng)
  log_probs = losses.ensemble_log_soft_targets(
      teachers, temperature=temperature, weights=weights, mode=mode
  )
  expected = np_ensemble_log(teachers, temperature, weights, mode)
  assert log_probs.dtype == jnp.float64
  assert log_probs.shape == (B, S, C)
  helpers.assert_close(log_probs, expected, rtol=1e-12)
  probs = losses.ensemble_soft_targets(
      teachers, temperature=temperature, weights=weights, mode=mode
  )
  helpers.assert_close(probs, np.exp(expected), rtol=1e-12)
  helpers.assert_close(jnp.sum(probs, axis=-1), np.ones((B, S)), rtol=1e-12)


@pytest.mark.parametrize("reduction, mode", LOSS_CONFIGS)
@pytest.mark.parametrize("kind", WEIGHT_KINDS)
@pytest.mark.parametrize("temperature", [0.5, 4.0])
def test_loss_matches_float64_reference(
    x64, rng, reduction, mode, kind, temperature
):
  student, teachers = make_inputs(rng)
  weights = make_weights(kind, rng)
  loss = losses.multi_teacher_kd_loss(
      student, teachers, temperature=temperature, weights=weights,
      reduction=reduction, mode=mode,
  )
  assert loss.dtype == jnp.float64
  assert loss.shape == (B, S)
  expected = np_multi_kd(
      student, teachers, temperature, weights, reduction, mode
  )
  helpers.assert_close(loss, expected, rtol=1e-12)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_confidence_weights_match_float64_reference(x64, rng, temperature):
  _, teachers = make_inputs(rng)
  weights = losses.teacher_confidence_weights(
      teachers, temperature=temperature
  )
  assert weights.dtype == jnp.float64
  assert weights.shape == (K, B, S)
  helpers.assert_close(
      weights, np_confidence(teachers, temperature), rtol=1e-12
  )
  helpers.assert_close(jnp.sum(weights, axis=0), np.ones((B, S)), rtol=1e-12)


# --- float32 and bfloat16 ---------------------------------------------------

FUNCTIONS = {
    "ensemble_log_soft_targets": (
        lambda s, t, w: losses.ensemble_log_soft_targets(
            t, temperature=2.0, weights=w
        ),
        lambda s, t, w: np_ensemble_log(t, 2.0, w),
    ),
    "ensemble_soft_targets_logit": (
        lambda s, t, w: losses.ensemble_soft_targets(
            t, temperature=2.0, weights=w, mode="logit"
        ),
        lambda s, t, w: np.exp(np_ensemble_log(t, 2.0, w, "logit")),
    ),
    "confidence": (
        lambda s, t, w: losses.teacher_confidence_weights(t, temperature=2.0),
        lambda s, t, w: np_confidence(t, 2.0),
    ),
    "loss_ensemble": (
        lambda s, t, w: losses.multi_teacher_kd_loss(
            s, t, temperature=2.0, weights=w
        ),
        lambda s, t, w: np_multi_kd(s, t, 2.0, w),
    ),
    "loss_ensemble_logit": (
        lambda s, t, w: losses.multi_teacher_kd_loss(
            s, t, temperature=2.0, weights=w, mode="logit"
        ),
        lambda s, t, w: np_multi_kd(s, t, 2.0, w, mode="logit"),
    ),
    "loss_mean": (
        lambda s, t, w: losses.multi_teacher_kd_loss(
            s, t, temperature=2.0, weights=w, reduction="mean"
        ),
        lambda s, t, w: np_multi_kd(s, t, 2.0, w, "mean"),
    ),
}


# bfloat16 inputs are computed in float32 from the (exactly representable)
# rounded values, so they meet the float32 tolerance against the float64
# reference of the rounded inputs; float32 and bfloat16 share rtol 1e-5 and a
# small atol for losses that are close to zero.
@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_low_precision_matches_reference(rng, name, dtype):
  fn, reference = FUNCTIONS[name]
  student, teachers = make_inputs(rng, np.float32)
  weights = make_weights("per_example", rng).astype(np.float32)
  student, teachers = jnp.asarray(student, dtype), jnp.asarray(teachers, dtype)
  actual = fn(student, teachers, jnp.asarray(weights))
  assert actual.dtype == jnp.float32
  helpers.assert_close(
      actual,
      reference(
          np.asarray(student, np.float64), np.asarray(teachers, np.float64),
          weights,
      ),
      rtol=1e-5,
      atol=1e-6,
  )


# --- Golden values ----------------------------------------------------------

# Teachers with soft targets [0.5, 0.5] and [0.9, 0.1] (logits = log-probs).
GOLDEN_TEACHERS = np.log(np.array([[0.5, 0.5], [0.9, 0.1]]))


@pytest.mark.parametrize(
    "weights, mode, expected",
    [
        (None, "probability", [0.7, 0.3]),
        ([1.0, 3.0], "probability", [0.8, 0.2]),
        ([0.0, 1.0], "probability", [0.9, 0.1]),
        # Mean logit log(sqrt(0.5 * 0.9)), log(sqrt(0.5 * 0.1)): ratio 3 : 1.
        (None, "logit", [0.75, 0.25]),
    ],
)
def test_ensemble_golden(weights, mode, expected):
  probs = losses.ensemble_soft_targets(
      jnp.asarray(GOLDEN_TEACHERS, jnp.float32),
      weights=None if weights is None else jnp.asarray(weights),
      mode=mode,
  )
  np.testing.assert_allclose(np.asarray(probs), expected, rtol=1e-6)


def test_loss_golden():
  teachers = jnp.asarray(GOLDEN_TEACHERS, jnp.float32)
  student = jnp.log(jnp.array([0.7, 0.3]))
  ensemble = losses.multi_teacher_kd_loss(student, teachers)
  np.testing.assert_allclose(np.asarray(ensemble), 0.0, atol=1e-7)
  # 0.5 KL([.5, .5] || [.7, .3]) + 0.5 KL([.9, .1] || [.7, .3]), by hand.
  kl_1 = 0.5 * np.log(0.5 / 0.7) + 0.5 * np.log(0.5 / 0.3)
  kl_2 = 0.9 * np.log(0.9 / 0.7) + 0.1 * np.log(0.1 / 0.3)
  mean = losses.multi_teacher_kd_loss(student, teachers, reduction="mean")
  np.testing.assert_allclose(np.asarray(mean), 0.5 * (kl_1 + kl_2), rtol=1e-6)


def test_confidence_golden():
  # Entropies log 2 and ~0: weights proportional to 1/2 and 1.
  weights = losses.teacher_confidence_weights(
      jnp.array([[0.0, 0.0], [100.0, 0.0]])
  )
  np.testing.assert_allclose(np.asarray(weights), [1 / 3, 2 / 3], rtol=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("reduction, mode", LOSS_CONFIGS)
def test_single_teacher_is_hinton_kd(x64, rng, temperature, reduction, mode):
  student, teacher = rng.standard_normal((2, B, C)) * 2.0
  # T^2 KL(softmax(t / T) || softmax(s / T)), written out.
  log_t = teacher / temperature
  log_t = log_t - np.log(np.sum(np.exp(log_t), axis=-1, keepdims=True))
  log_s = student / temperature
  log_s = log_s - np.log(np.sum(np.exp(log_s), axis=-1, keepdims=True))
  expected = temperature**2 * np.sum(np.exp(log_t) * (log_t - log_s), -1)
  loss = losses.multi_teacher_kd_loss(
      student, teacher[None], temperature=temperature, reduction=reduction,
      mode=mode,
  )
  helpers.assert_close(loss, expected, rtol=1e-12)
  helpers.assert_close(
      losses.ensemble_log_soft_targets(
          teacher[None], temperature=temperature, mode=mode
      ),
      log_t,
      rtol=1e-12,
  )


# --- Gradient of the mean per-teacher KL vs. the KL to the ensemble ---------


@pytest.mark.parametrize("kind", WEIGHT_KINDS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_mean_and_ensemble_gradients_agree_values_differ_by_jensen_gap(
    x64, rng, kind, temperature
):
  student, teachers = make_inputs(rng)
  weights = make_weights(kind, rng)

  def total(reduction, s):
    return jnp.sum(
        losses.multi_teacher_kd_loss(
            s, teachers, temperature=temperature, weights=weights,
            reduction=reduction,
        )
    )

  grad_mean = jax.grad(functools.partial(total, "mean"))(student)
  grad_ensemble = jax.grad(functools.partial(total, "ensemble"))(student)
  helpers.assert_close(grad_mean, grad_ensemble, rtol=1e-12, atol=1e-15)
  # Both equal T (p_S - p_bar), written out in NumPy.
  p_s = np.exp(np_log_softmax(student / temperature))
  p_bar = np.exp(np_ensemble_log(teachers, temperature, weights))
  helpers.assert_close(
      grad_mean, temperature * (p_s - p_bar), rtol=1e-10, atol=1e-15
  )

  kwargs = dict(temperature=temperature, weights=weights)
  value_mean = losses.multi_teacher_kd_loss(
      student, teachers, reduction="mean", **kwargs
  )
  value_ensemble = losses.multi_teacher_kd_loss(
      student, teachers, reduction="ensemble", **kwargs
  )
  log_t = np_log_softmax(teachers / temperature)
  log_bar = np_ensemble_log(teachers, temperature, weights)
  w = np_weights(weights, teachers)[..., 0]
  jensen_gap = temperature**2 * np.sum(w * np_kl(log_t, log_bar[None]), 0)
  assert np.all(jensen_gap > 0)
  helpers.assert_close(
      value_mean - value_ensemble, jensen_gap, rtol=1e-10, atol=1e-14
  )


# --- Equivalences -----------------------------------------------------------


def test_vmap_over_teachers_matches_loop(rng):
  student, teachers = make_inputs(rng, np.float32)
  per_teacher = jax.vmap(
      lambda t: losses.kd_loss(student, t, temperature=2.0)
  )(teachers)
  loop = jnp.stack(
      [losses.kd_loss(student, t, temperature=2.0) for t in teachers]
  )
  helpers.assert_close(per_teacher, loop, rtol=1e-6, atol=1e-7)
  weights = make_weights("per_example", rng).astype(np.float32)
  normalized = weights / weights.sum(axis=0)
  mean = losses.multi_teacher_kd_loss(
      student, teachers, temperature=2.0, weights=jnp.asarray(weights),
      reduction="mean",
  )
  helpers.assert_close(
      mean, jnp.sum(normalized * per_teacher, axis=0), rtol=1e-5, atol=1e-6
  )


def test_vmap_over_batch_matches_loop(rng):
  student, teachers = make_inputs(rng, np.float32)
  weights = jnp.asarray(make_weights("per_example", rng), jnp.float32)
  batched = jax.jit(jax.vmap(_all_losses, in_axes=(0, 1, 1)))(
      student, teachers, weights
  )
  loop = [
      _all_losses(student[i], teachers[:, i], weights[:, i]) for i in range(B)
  ]
  loop = jax.tree.map(lambda *rows: jnp.stack(rows), *loop)
  helpers.assert_close(batched, loop, rtol=1e-6, atol=1e-7)
  helpers.assert_close(
      batched, _all_losses(student, teachers, weights), rtol=1e-6, atol=1e-7
  )


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_jit_matches_eager(rng, name):
  fn, _ = FUNCTIONS[name]
  student, teachers = make_inputs(rng, np.float32)
  weights = jnp.asarray(make_weights("per_example", rng), jnp.float32)
  helpers.assert_jit_matches_eager(
      fn, jnp.asarray(student), jnp.asarray(teachers), weights
  )


@pytest.mark.parametrize("reduction, mode", LOSS_CONFIGS)
def test_uniform_weights_equal_explicit_ones(rng, reduction, mode):
  student, teachers = make_inputs(rng, np.float32)
  kwargs = dict(temperature=2.0, reduction=reduction, mode=mode)
  default = losses.multi_teacher_kd_loss(student, teachers, **kwargs)
  for ones in (jnp.ones(K), jnp.ones((K, B, S)), jnp.ones((K, S)),
               jnp.ones(K, jnp.int32)):
    helpers.assert_close(
        losses.multi_teacher_kd_loss(student, teachers, weights=ones, **kwargs),
        default, rtol=1e-6, atol=1e-7,
    )
  helpers.assert_close(
      losses.ensemble_soft_targets(teachers, mode=mode),
      losses.ensemble_soft_targets(teachers, mode=mode, weights=jnp.ones(K)),
      rtol=1e-6,
  )


@pytest.mark.parametrize("kind", ["per_teacher", "per_example"])
@pytest.mark.parametrize("reduction, mode", LOSS_CONFIGS)
def test_weights_scale_invariance(rng, kind, reduction, mode):
  student, teachers = make_inputs(rng, np.float32)
  weights = jnp.asarray(make_weights(kind, rng), jnp.float32)
  kwargs = dict(reduction=reduction, mode=mode)
  helpers.assert_close(
      losses.multi_teacher_kd_loss(student, teachers, weights=3 * weights,
                                   **kwargs),
      losses.multi_teacher_kd_loss(student, teachers, weights=weights,
                                   **kwargs),
      rtol=1e-5, atol=1e-6,
  )


def test_per_example_weights_broadcast_from_the_right(rng):
  """[K, S] weights mean weights[k, s] for every batch row."""
  student, teachers = make_inputs(rng, np.float32)
  weights = rng.uniform(0.2, 2.0, (K, S)).astype(np.float32)
  full = np.broadcast_to(weights[:, None, :], (K, B, S))
  helpers.assert_close(
      losses.multi_teacher_kd_loss(student, teachers,
                                   weights=jnp.asarray(weights)),
      losses.multi_teacher_kd_loss(student, teachers,
                                   weights=jnp.asarray(full)),
      rtol=1e-6,
  )


def test_zero_weight_drops_teacher_exactly(rng):
  student, teachers = make_inputs(rng, np.float32)
  # The dropped teacher holds extreme and -inf logits; they must not matter.
  dropped = teachers.copy()
  dropped[0] = 1e4
  dropped[0, ..., 1] = -np.inf
  weights = jnp.array([0.0, 1.0, 2.0])
  with_zero = _all_losses(student, dropped, weights)
  without = _all_losses(student, teachers[1:], weights[1:])
  helpers.assert_close(with_zero, without, rtol=1e-6, atol=1e-7)
  grads = _grads_of_all_losses(student, dropped, weights)
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))
  # The dropped teacher gets no gradient.
  np.testing.assert_array_equal(np.asarray(grads[1])[0], 0.0)


def test_class_impossible_for_all_teachers(rng):
  student, teachers = make_inputs(rng, np.float32)
  teachers[..., 2] = -np.inf
  for mode in ("probability", "logit"):
    log_probs = losses.ensemble_log_soft_targets(teachers, mode=mode)
    assert np.all(np.asarray(log_probs)[..., 2] == -np.inf)
    np.testing.assert_allclose(
        np.exp(np.asarray(log_probs)).sum(-1), 1.0, rtol=1e-6
    )
  weights = jnp.ones(K)
  for value in _all_losses(student, teachers, weights):
    assert np.all(np.isfinite(np.asarray(value)))
  for g in _grads_of_all_losses(student, teachers, weights):
    assert np.all(np.isfinite(np.asarray(g)))
  # A class ruled out by one teacher only keeps the others' probability,
  # and the mean of per-teacher losses stays finite as well.
  teachers = make_inputs(rng, np.float32)[1]
  teachers[0, ..., 2] = -np.inf
  probs = losses.ensemble_soft_targets(teachers)
  assert np.all(np.asarray(probs)[..., 2] > 0)
  for g in _grads_of_all_losses(student, teachers, weights):
    assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("reduction, mode", LOSS_CONFIGS)
def test_where_matches_slicing(rng, reduction, mode):
  student, teachers = make_inputs(rng, np.float32)
  weights = make_weights("per_example", rng).astype(np.float32)
  mask = np.array([[True, False], [False, False], [True, True], [False, True]])

  # Teachers and weights are passed batch-major ([B, S, K, ...]) so that the
  # helper's `a[mask]` slices them like the student.
  def fn(s, t_bm, w_bm, **kwargs):
    return losses.multi_teacher_kd_loss(
        s, jnp.moveaxis(t_bm, -2, 0), weights=jnp.moveaxis(w_bm, -1, 0),
        reduction=reduction, mode=mode, **kwargs
    )

  arrays = (
      jnp.asarray(student),
      jnp.moveaxis(jnp.asarray(teachers), 0, -2),
      jnp.moveaxis(jnp.asarray(weights), 0, -1),
  )
  helpers.assert_where_matches_slicing(fn, arrays, mask)
  # A mask over the last per-example axis only broadcasts.
  broadcast = fn(*arrays, where=jnp.array([True, False]))
  np.testing.assert_array_equal(np.asarray(broadcast)[:, 1], 0.0)


def test_where_blocks_nan_in_masked_rows(rng):
  student, teachers = make_inputs(rng, np.float32)
  weights = make_weights("per_example", rng).astype(np.float32)
  mask = np.ones((B, S), bool)
  mask[1, 0] = False
  student[1, 0] = np.nan
  teachers[:, 1, 0] = np.inf
  weights[:, 1, 0] = np.nan
  weights[:, 1, 1] = [0.0, 0.0, 1.0]

  @jax.jit
  def values_and_grads(s, t, w, where):
    def total(s, t, w, reduction, mode):
      return jnp.sum(
          losses.multi_teacher_kd_loss(
              s, t, weights=w, reduction=reduction, mode=mode, where=where
          )
      )

    return [
        jax.value_and_grad(total, argnums=(0, 1, 2))(s, t, w, *config)
        for config in LOSS_CONFIGS
    ]

  for value, grads in values_and_grads(
      student, teachers, weights, jnp.asarray(mask)
  ):
    assert np.isfinite(value)
    for g in grads:
      assert np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_array_equal(np.asarray(grads[0])[1, 0], 0.0)
    np.testing.assert_array_equal(np.asarray(grads[1])[:, 1, 0], 0.0)


@pytest.mark.parametrize("reduction, mode", LOSS_CONFIGS)
def test_axis_matches_moveaxis(rng, reduction, mode):
  student, teachers = make_inputs(rng, np.float32, shape=(B, C, S))
  fn = functools.partial(
      losses.multi_teacher_kd_loss, reduction=reduction, mode=mode
  )
  helpers.assert_axis_matches_moveaxis(
      fn, (jnp.asarray(student), jnp.asarray(teachers)), axis=-2
  )
  # A non-negative axis counts the student's dimensions.
  helpers.assert_close(
      fn(student, teachers, axis=1), fn(student, teachers, axis=-2),
      rtol=1e-6,
  )


@pytest.mark.parametrize(
    "fn, keeps_class_axis",
    [
        (losses.ensemble_log_soft_targets, True),
        (functools.partial(losses.ensemble_soft_targets, mode="logit"), True),
        (losses.teacher_confidence_weights, False),
    ],
)
def test_teacher_only_functions_axis(rng, fn, keeps_class_axis):
  teachers = jnp.asarray(make_inputs(rng, np.float32, shape=(B, C, S))[1])
  moved = fn(jnp.moveaxis(teachers, 2, -1), axis=-1)
  # axis counts one teacher's dimensions: axis=1 is teachers' dimension 2.
  for axis in (1, -2):
    along = fn(teachers, axis=axis)
    if keeps_class_axis:  # the ensemble's class axis stays where it was
      along = jnp.moveaxis(along, 1, -1)
    helpers.assert_close(along, moved, rtol=1e-6, atol=1e-7)


# --- Gradients --------------------------------------------------------------


def test_check_grads(x64, rng):
  student, teachers = make_inputs(rng, shape=(2, C), scale=1.0)
  weights = rng.uniform(0.5, 2.0, (K, 2))
  check_grads(
      _every_function, (student, teachers, weights), order=2, modes=["rev"]
  )


# --- Extremes ---------------------------------------------------------------


@jax.jit
def _values_and_grads(student, teachers, weights, temperature):
  """Value and gradient of every public function, summed, per function."""

  def value_and_grad(fn, *args):
    return jax.value_and_grad(
        lambda *a: jnp.sum(fn(*a)), argnums=tuple(range(len(args)))
    )(*args)

  results = {}
  for reduction, mode in LOSS_CONFIGS:
    results[f"loss_{reduction}_{mode}"] = value_and_grad(
        lambda s, t, w: losses.multi_teacher_kd_loss(
            s, t, temperature=temperature, weights=w, reduction=reduction,
            mode=mode,
        ),
        student, teachers, weights,
    )
  for mode in ("probability", "logit"):
    # Summing probabilities gives a constant; weight them to get a gradient.
    results[f"ensemble_{mode}"] = value_and_grad(
        lambda t, w: jnp.arange(C, dtype=jnp.float32)[None] * jnp.log1p(
            losses.ensemble_soft_targets(
                t, temperature=temperature, weights=w, mode=mode
            )
        ),
        teachers, weights,
    )
  results["confidence"] = value_and_grad(
      lambda t: jnp.arange(K, dtype=jnp.float32)[:, None] * (
          losses.teacher_confidence_weights(t, temperature=temperature)
      ),
      teachers,
  )
  return results


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_extreme_logits_finite(rng, dtype):
  student, teachers = make_inputs(rng, np.float32, scale=1e4, shape=(B, C))
  student, teachers = jnp.asarray(student, dtype), jnp.asarray(teachers, dtype)
  weights = jnp.asarray(rng.uniform(0.2, 2.0, (K, B)), jnp.float32)
  for temperature in (1e-3, 1.0, 1e3):
    results = _values_and_grads(
        student, teachers, weights, jnp.float32(temperature)
    )
    for name, leaf in jax.tree.leaves_with_path(results):
      assert np.all(np.isfinite(np.asarray(leaf, np.float64))), (
          temperature, name,
      )


# --- Confidence weights -----------------------------------------------------


def test_confident_teacher_gets_more_weight():
  uniform = jnp.zeros((1, C))
  one_hot_like = jnp.array([[20.0, 0.0, 0.0, 0.0, 0.0]])
  weights = losses.teacher_confidence_weights(
      jnp.stack([uniform, one_hot_like])
  )
  assert weights.shape == (2, 1)
  assert float(weights[1, 0]) > float(weights[0, 0])
  # Entropies log C and ~0: the weights differ by the factor C.
  np.testing.assert_allclose(
      float(weights[1, 0] / weights[0, 0]), C, rtol=1e-4
  )
  equal = losses.teacher_confidence_weights(jnp.stack([one_hot_like] * 3))
  np.testing.assert_allclose(np.asarray(equal), 1 / 3, rtol=1e-6)


def test_confidence_weights_with_minus_inf_logits():
  teachers = jnp.array([[0.0, 0.0, -jnp.inf], [0.0, -jnp.inf, -jnp.inf]])
  weights = losses.teacher_confidence_weights(teachers)
  # Entropies log 2 and 0 (0 log 0 = 0).
  np.testing.assert_allclose(np.asarray(weights), [1 / 3, 2 / 3], rtol=1e-6)
  grads = jax.jit(
      jax.grad(lambda t: losses.teacher_confidence_weights(t)[0])
  )(teachers)
  assert np.all(np.isfinite(np.asarray(grads)))


def test_confidence_weights_feed_the_loss(rng):
  student, teachers = make_inputs(rng, np.float32)
  weights = losses.teacher_confidence_weights(teachers, temperature=2.0)
  loss = losses.multi_teacher_kd_loss(
      student, teachers, temperature=2.0, weights=weights
  )
  assert loss.shape == (B, S)
  assert np.all(np.isfinite(np.asarray(loss)))


# --- Errors -----------------------------------------------------------------


def test_errors_teacher_axis():
  student = jnp.zeros((B, C))
  with pytest.raises(ValueError, match=r"teacher_logits.*leading teacher axis"):
    losses.multi_teacher_kd_loss(student, jnp.zeros((B, C)))
  with pytest.raises(ValueError, match=r"teacher_logits.*leading teacher axis"):
    losses.multi_teacher_kd_loss(student, jnp.zeros((K, B, C + 1)))
  with pytest.raises(ValueError, match=r"teacher_logits.*leading teacher axis"):
    losses.multi_teacher_kd_loss(student, jnp.zeros((K, 1, B, C)))
  with pytest.raises(ValueError, match="teacher_logits.*at least one teacher"):
    losses.multi_teacher_kd_loss(student, jnp.zeros((0, B, C)))
  for fn in (losses.ensemble_soft_targets, losses.ensemble_log_soft_targets,
             losses.teacher_confidence_weights):
    with pytest.raises(ValueError, match=r"teacher_logits.*leading teacher"):
      fn(jnp.zeros((C,)))


def test_errors_dtypes_and_hyperparameters():
  student, teachers = jnp.zeros((B, C)), jnp.zeros((K, B, C))
  with pytest.raises(TypeError, match="student_logits"):
    losses.multi_teacher_kd_loss(jnp.zeros((B, C), jnp.int32), teachers)
  with pytest.raises(TypeError, match="teacher_logits"):
    losses.multi_teacher_kd_loss(student, jnp.zeros((K, B, C), jnp.int32))
  with pytest.raises(TypeError, match="teacher_logits"):
    losses.teacher_confidence_weights(jnp.zeros((K, C), jnp.int32))
  with pytest.raises(ValueError, match="temperature"):
    losses.multi_teacher_kd_loss(student, teachers, temperature=0.0)
  with pytest.raises(ValueError, match="temperature"):
    losses.ensemble_soft_targets(teachers, temperature=-1.0)
  with pytest.raises(ValueError, match="temperature"):
    losses.teacher_confidence_weights(teachers, temperature=0.0)
  with pytest.raises(ValueError, match="mode"):
    losses.multi_teacher_kd_loss(student, teachers, mode="geometric")
  with pytest.raises(ValueError, match="mode"):
    losses.ensemble_soft_targets(teachers, mode="logits")
  with pytest.raises(ValueError, match="mode"):
    losses.multi_teacher_kd_loss(
        student, teachers, reduction="mean", mode="logit"
    )
  with pytest.raises(ValueError, match="reduction"):
    losses.multi_teacher_kd_loss(student, teachers, reduction="sum")
  with pytest.raises(ValueError, match="axis"):
    losses.multi_teacher_kd_loss(student, teachers, axis=2)
  with pytest.raises(ValueError, match="axis"):
    losses.ensemble_soft_targets(teachers, axis=2)
  with pytest.raises(TypeError, match="where"):
    losses.multi_teacher_kd_loss(student, teachers, where=jnp.ones(B))
  with pytest.raises(ValueError, match="where"):
    losses.multi_teacher_kd_loss(
        student, teachers, where=jnp.ones(B + 1, bool)
    )


@pytest.mark.parametrize(
    "weights, error, match",
    [
        (jnp.array([1.0, -1.0, 1.0]), ValueError, "weights.*>= 0"),
        (jnp.zeros(K), ValueError, "weights.*positive sum"),
        (jnp.ones(K + 1), ValueError, r"weights.*shape \[K\]"),
        (jnp.ones(()), ValueError, r"weights.*shape \[K\]"),
        (jnp.ones((K, B + 1)), ValueError, r"weights.*shape \[K\]"),
        (jnp.ones((K, 1, B)), ValueError, r"weights.*shape \[K\]"),
        (jnp.ones((B, K)), ValueError, r"weights.*shape \[K\]"),
        (jnp.ones(K, bool), TypeError, "weights"),
    ],
)
def test_errors_weights(weights, error, match):
  student, teachers = jnp.zeros((B, C)), jnp.zeros((K, B, C))
  with pytest.raises(error, match=match):
    losses.multi_teacher_kd_loss(student, teachers, weights=weights)
  with pytest.raises(error, match=match):
    losses.ensemble_soft_targets(teachers, weights=weights)


def test_zero_weight_sum_in_masked_row_is_allowed():
  student, teachers = jnp.zeros((B, C)), jnp.ones((K, B, C))
  weights = jnp.ones((K, B)).at[:, 0].set(0.0)
  with pytest.raises(ValueError, match="weights"):
    losses.multi_teacher_kd_loss(student, teachers, weights=weights)
  where = jnp.arange(B) > 0
  loss = losses.multi_teacher_kd_loss(
      student, teachers, weights=weights, where=where
  )
  assert np.all(np.isfinite(np.asarray(loss)))


def test_traced_arguments_pass_unchecked(rng):
  student, teachers = make_inputs(rng, np.float32)

  @jax.jit
  def fn(temperature, weights):
    return losses.multi_teacher_kd_loss(
        student, teachers, temperature=temperature, weights=weights
    )

  expected = losses.multi_teacher_kd_loss(
      student, teachers, temperature=2.0, weights=jnp.arange(1.0, K + 1)
  )
  helpers.assert_close(
      fn(jnp.float32(2.0), jnp.arange(1.0, K + 1)), expected, rtol=1e-6
  )


# --- Properties -------------------------------------------------------------

_logit_rows = hnp.arrays(
    np.float64,
    (K, 2, C),
    elements=st.floats(-20.0, 20.0, allow_nan=False, width=64),
)
_weight_rows = hnp.arrays(
    np.float64, (K,), elements=st.floats(0.0, 5.0, width=64)
).filter(lambda w: w.sum() > 1e-3)


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(
    teachers=_logit_rows,
    student=hnp.arrays(np.float64, (2, C),
                       elements=st.floats(-20.0, 20.0, width=64)),
    weights=_weight_rows,
    temperature=st.floats(0.1, 10.0),
    shift=st.floats(-50.0, 50.0),
)
def test_properties(teachers, student, weights, temperature, shift):
  with jax.enable_x64(True):
    mean, ensemble, logit = _jitted_losses(
        student, teachers, weights, temperature
    )
    # Non-negative, and the mean exceeds the ensemble by the Jensen gap >= 0.
    assert np.all(np.asarray(ensemble) >= -1e-9)
    assert np.all(np.asarray(logit) >= -1e-9)
    assert np.all(np.asarray(mean) >= np.asarray(ensemble) - 1e-9)
    # Adding a constant to one teacher's rows and to the student changes
    # nothing (softmax shift invariance, per teacher in probability mode).
    shifted_teachers = teachers.copy()
    shifted_teachers[0] += shift
    shifted = _jitted_losses(
        student + shift, shifted_teachers, weights, temperature
    )
    for a, b in zip(shifted[:2], (mean, ensemble)):
      helpers.assert_close(a, b, rtol=1e-8, atol=1e-8)
    # Teachers equal to the student give zero loss in every reduction.
    same = _jitted_losses(
        student, np.broadcast_to(student, teachers.shape), weights,
        temperature,
    )
    for value in same:
      helpers.assert_close(value, np.zeros(2), rtol=0, atol=1e-9)


@jax.jit
def _jitted_losses(student, teachers, weights, temperature):
  kwargs = dict(temperature=temperature, weights=weights)
  return (
      losses.multi_teacher_kd_loss(student, teachers, reduction="mean",
                                   **kwargs),
      losses.multi_teacher_kd_loss(student, teachers, **kwargs),
      losses.multi_teacher_kd_loss(student, teachers, mode="logit", **kwargs),
  )
