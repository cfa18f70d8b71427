"""float32 accuracy of the logit divergences at extreme temperatures.

Every loss is compared per example with an independent NumPy reference
written from the textbook formulas (``sum p (log p - log q)`` of
``log_softmax`` values, mixtures by ``logaddexp``), over temperatures from
1e-3 to 1e4 and logit scales up to 1e4. The reference runs in NumPy's
extended precision (``np.longdouble``, 80-bit on x86: eps 1.1e-19): in float64
the textbook route itself loses three digits for nearly equal distributions
at T = 1e4 (divergences ~1e-13 from log-probabilities ~2), which is exactly
the case under test. The module is skipped where ``longdouble`` is only
float64. The criterion is

  |loss - ref| <= 1e-3 |ref| + bound + factor * 1e-30,

where ``bound`` is the reference's own rounding error (in the loss's units),
64 eps sum_c p_c (1 + |log p_c| + |log q_c| + |a_c| + |b_c|) with a, b the
shifted scaled logits (the reference subtracts numbers of that size), and
``factor`` is T^2 for the T^2-scaled losses and 1 otherwise; 1e-30 stands for
float32's underflow (a divergence below it is 0 in float32). The textbook
float32 route fails this by orders of magnitude at T >= 100.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import losses
from tests import helpers

TEMPERATURES = (1e-3, 1e-1, 1.0, 32.0, 100.0, 1e3, 1e4)
SCALES = (1.0, 100.0, 1e4)
REF = np.longdouble
EPS = np.finfo(REF).eps
BATCH, CLASSES = 48, 8

if EPS > 1e-18:
  pytest.skip(
      "needs an extended-precision np.longdouble for the reference",
      allow_module_level=True,
  )


# ---------------------------------------------------------------------------
# Extended-precision references: (value, rounding bound) per example, class
# axis last.


def np_scaled(z, temperature):
  a = np.asarray(z, REF) / REF(temperature)
  with np.errstate(invalid="ignore"):
    return a - np.max(a, axis=-1, keepdims=True)


def np_log_softmax(z, temperature):
  a = np_scaled(z, temperature)
  with np.errstate(divide="ignore"):
    return a - np.log(np.sum(np.exp(a), axis=-1, keepdims=True))


def np_kl_and_bound(log_p, log_q, size_p=0.0, size_q=0.0):
  """KL(p || q) from log-probabilities, 0 log 0 = 0, and its rounding bound."""
  p = np.exp(log_p)
  with np.errstate(invalid="ignore"):
    terms = np.where(p > 0, p * (log_p - log_q), 0.0)
    size = np.where(
        p > 0, p * (1 + np.abs(log_p) + np.abs(log_q) + size_p + size_q), 0.0
    )
  return terms.sum(-1), 64 * EPS * size.sum(-1)


def ref_kl(student, teacher, temperature):
  """KL(p_T || p_S) with p = softmax(z / T)."""
  a, b = np_scaled(teacher, temperature), np_scaled(student, temperature)
  return np_kl_and_bound(
      np_log_softmax(teacher, temperature),
      np_log_softmax(student, temperature),
      np.abs(a), np.abs(b),
  )


def ref_reverse_kl(student, teacher, temperature):
  return ref_kl(teacher, student, temperature)


def ref_jsd(student, teacher, temperature, beta=0.5):
  log_t = np_log_softmax(teacher, temperature)
  log_s = np_log_softmax(student, temperature)
  # The mixture's log by logaddexp: beta p_T underflows for p_T near the
  # smallest subnormal, which a log of the sum would turn into log 0.
  with np.errstate(divide="ignore"):
    log_m = np.logaddexp(
        np.log(REF(beta)) + log_t, np.log1p(-REF(beta)) + log_s
    )
  kl_t, bound_t = np_kl_and_bound(log_t, log_m)
  kl_s, bound_s = np_kl_and_bound(log_s, log_m)
  return beta * kl_t + (1 - beta) * kl_s, bound_t + bound_s


def ref_tvd(student, teacher, temperature):
  log_t = np_log_softmax(teacher, temperature)
  log_s = np_log_softmax(student, temperature)
  p_t, p_s = np.exp(log_t), np.exp(log_s)
  with np.errstate(invalid="ignore"):
    size = np.where(p_t > 0, p_t * (1 + np.abs(log_t)), 0) + np.where(
        p_s > 0, p_s * (1 + np.abs(log_s)), 0
    )
  return 0.5 * np.abs(p_t - p_s).sum(-1), 64 * EPS * size.sum(-1)


def ref_dkd(student, teacher, labels, temperature, alpha=1.0, beta=8.0):
  """T^2 (alpha TCKD + beta NCKD); the binary mass 1 - p_t is summed."""
  log_t = np_log_softmax(teacher, temperature)
  log_s = np_log_softmax(student, temperature)
  target = np.eye(teacher.shape[-1], dtype=bool)[labels]

  def log_sum(log_p, where):
    # In log space: below T = 1e-3 the non-target mass underflows even in
    # extended precision.
    masked = np.where(where, log_p, -np.inf)
    top = masked.max(-1)
    with np.errstate(invalid="ignore"):
      shifted = masked - top[..., None]
    return top + np.log(np.exp(shifted).sum(-1))

  def binary(log_p):
    return np.stack([log_sum(log_p, target), log_sum(log_p, ~target)], -1)

  def non_target(log_p):
    masked = np.where(target, -np.inf, log_p)
    top = masked.max(-1, keepdims=True)
    return masked - top - np.log(np.exp(masked - top).sum(-1, keepdims=True))

  tckd, bound_t = np_kl_and_bound(binary(log_t), binary(log_s))
  nckd, bound_n = np_kl_and_bound(
      non_target(log_t), non_target(log_s),
      np.abs(np_scaled(teacher, temperature)),
      np.abs(np_scaled(student, temperature)),
  )
  t2 = REF(temperature) ** 2
  return t2 * (alpha * tckd + beta * nckd), t2 * (alpha * bound_t + beta * bound_n)


def ref_multi_teacher(student, teachers, temperature, reduction):
  log_s = np_log_softmax(student, temperature)
  log_ts = np.stack([np_log_softmax(t, temperature) for t in teachers])
  if reduction == "ensemble":
    with np.errstate(divide="ignore"):
      log_bar = np.log(np.exp(log_ts).mean(0))
    kl, bound = np_kl_and_bound(log_bar, log_s)
  else:
    pieces = [np_kl_and_bound(log_t, log_s) for log_t in log_ts]
    kl = np.mean([k for k, _ in pieces], axis=0)
    bound = np.mean([b for _, b in pieces], axis=0)
  return REF(temperature) ** 2 * kl, REF(temperature) ** 2 * bound


# ---------------------------------------------------------------------------
# Inputs: unrelated pairs plus near pairs (the cancellation-prone case).


def make_pair(scale, seed=0):
  rng = np.random.default_rng(seed)
  half = BATCH // 2
  teacher = scale * rng.standard_normal((BATCH, CLASSES))
  student = scale * rng.standard_normal((BATCH, CLASSES))
  student[:half] = teacher[:half] * (
      1 + 1e-2 * rng.standard_normal((half, CLASSES))
  )
  return student.astype(np.float32), teacher.astype(np.float32)


def assert_accurate(actual, reference, factor):
  value, bound = (np.asarray(x, REF) for x in reference)
  actual = np.asarray(actual).astype(REF)
  assert actual.shape == value.shape
  tolerance = 1e-3 * np.abs(value) + bound + factor * 1e-30
  assert np.all(np.isfinite(value)), value
  error = np.abs(actual - value)
  worst = int(np.argmax(error - tolerance))
  assert np.all(error <= tolerance), (
      f"example {worst}: {actual[worst]!r} vs float64 {value[worst]!r}"
      f" (tolerance {tolerance[worst]:.3g})"
  )


# Temperature is traced: one compilation per loss for the whole sweep.
PAIR_CASES = {
    "kd_loss": (
        jax.jit(lambda s, t, T: losses.kd_loss(s, t, temperature=T)),
        lambda s, t, T: tuple(REF(T) ** 2 * x for x in ref_kl(s, t, T)),
        lambda T: T**2,
    ),
    "kl_divergence": (
        jax.jit(lambda s, t, T: losses.kl_divergence(s, t, temperature=T)),
        ref_kl,
        lambda T: 1.0,
    ),
    "reverse_kl_divergence": (
        jax.jit(
            lambda s, t, T: losses.reverse_kl_divergence(s, t, temperature=T)
        ),
        ref_reverse_kl,
        lambda T: 1.0,
    ),
    "jensen_shannon_divergence": (
        jax.jit(
            lambda s, t, T: losses.jensen_shannon_divergence(
                s, t, temperature=T
            )
        ),
        ref_jsd,
        lambda T: 1.0,
    ),
    "jensen_shannon_divergence_beta_0.1": (
        jax.jit(
            lambda s, t, T: losses.jensen_shannon_divergence(
                s, t, beta=0.1, temperature=T
            )
        ),
        functools.partial(ref_jsd, beta=0.1),
        lambda T: 1.0,
    ),
    "total_variation_distance": (
        jax.jit(
            lambda s, t, T: losses.total_variation_distance(
                s, t, temperature=T
            )
        ),
        ref_tvd,
        lambda T: 1.0,
    ),
}


@pytest.mark.parametrize("name", sorted(PAIR_CASES))
def test_pair_divergences_float32_match_float64(name):
  fn, reference, factor = PAIR_CASES[name]
  for scale in SCALES:
    student, teacher = make_pair(scale)
    for temperature in TEMPERATURES:
      actual = fn(student, teacher, jnp.float32(temperature))
      assert actual.dtype == jnp.float32
      assert_accurate(
          actual, reference(student, teacher, temperature),
          factor(temperature),
      )


_dkd = jax.jit(
    lambda s, t, y, T: losses.dkd_loss(s, t, y, temperature=T)
)


def test_dkd_float32_matches_float64():
  labels = np.random.default_rng(1).integers(0, CLASSES, BATCH)
  for scale in SCALES:
    student, teacher = make_pair(scale)
    for temperature in TEMPERATURES:
      actual = _dkd(student, teacher, labels, jnp.float32(temperature))
      assert_accurate(
          actual, ref_dkd(student, teacher, labels, temperature),
          temperature**2,
      )


_multi = jax.jit(
    lambda s, t, T, reduction: losses.multi_teacher_kd_loss(
        s, t, temperature=T, reduction=reduction
    ),
    static_argnames=("reduction",),
)


@pytest.mark.parametrize("reduction", ["ensemble", "mean"])
def test_multi_teacher_float32_matches_float64(reduction):
  rng = np.random.default_rng(2)
  for scale in SCALES:
    student, teacher = make_pair(scale)
    # Three teachers near the first, so the ensemble is near the student in
    # the first half of the batch.
    teachers = np.stack(
        [teacher]
        + [
            teacher * (1 + 1e-2 * rng.standard_normal(teacher.shape))
            for _ in range(2)
        ]
    ).astype(np.float32)
    for temperature in TEMPERATURES:
      actual = _multi(student, teachers, jnp.float32(temperature), reduction)
      assert_accurate(
          actual,
          ref_multi_teacher(student, teachers, temperature, reduction),
          temperature**2,
      )


def test_kd_at_temperature_1e4_is_the_float64_value():
  # The case that used to give a mean of -6 (float64: 0.816).
  rng = np.random.default_rng(0)
  student = rng.standard_normal((256, 10)).astype(np.float32)
  teacher = rng.standard_normal((256, 10)).astype(np.float32)
  value, _ = ref_kl(student, teacher, 1e4)
  actual = PAIR_CASES["kd_loss"][0](student, teacher, jnp.float32(1e4))
  helpers.assert_close(actual, (1e8 * value).astype(np.float64), rtol=1e-4)
  assert np.all(np.asarray(actual) > 0)


def test_kd_gradient_at_high_temperature_matches_float64():
  # d/dz_S T^2 KL = T (p_S - p_T): the float32 gradient of the accurate
  # loss keeps the precision of the logit difference too.
  student, teacher = make_pair(1.0)
  grad_fn = jax.jit(jax.grad(
      lambda s, T: jnp.sum(losses.kd_loss(s, teacher, temperature=T))
  ))
  for temperature in (1e2, 1e4):
    grad = grad_fn(student, jnp.float32(temperature))
    p_s = np.exp(np_log_softmax(student, temperature))
    p_t = np.exp(np_log_softmax(teacher, temperature))
    expected = (temperature * (p_s - p_t)).astype(np.float64)
    scale = np.abs(expected).max(-1, keepdims=True)
    error = np.abs(np.asarray(grad, np.float64) - expected)
    assert np.all(error <= 1e-3 * scale + 1e-30), np.max(error / scale)


# ---------------------------------------------------------------------------
# -inf logits at extreme temperatures.


def padded_pair(scale):
  student, teacher = make_pair(scale, seed=3)
  teacher[:, -2:] = -np.inf  # padded classes, teacher rules them out
  student[::2, -1] = -np.inf  # and the student rules out some of them too
  return student, teacher


@pytest.mark.parametrize(
    "name",
    ["kd_loss", "kl_divergence", "jensen_shannon_divergence",
     "total_variation_distance"],
)
def test_teacher_minus_inf_classes_are_exact(name):
  fn, reference, factor = PAIR_CASES[name]
  for scale in SCALES:
    student, teacher = padded_pair(scale)
    for temperature in TEMPERATURES:
      actual = fn(student, teacher, jnp.float32(temperature))
      assert np.all(np.isfinite(np.asarray(actual)))
      assert_accurate(
          actual, reference(student, teacher, temperature),
          factor(temperature),
      )


def test_reverse_kl_student_minus_inf_classes_are_exact():
  fn, reference, factor = PAIR_CASES["reverse_kl_divergence"]
  for scale in SCALES:
    teacher, student = padded_pair(scale)  # the student is the padded side
    for temperature in TEMPERATURES:
      assert_accurate(
          fn(student, teacher, jnp.float32(temperature)),
          reference(student, teacher, temperature), factor(temperature),
      )


def test_dkd_with_padded_classes_is_exact():
  student, teacher = make_pair(1.0, seed=4)
  student[:, -1] = teacher[:, -1] = -np.inf
  labels = np.random.default_rng(4).integers(0, CLASSES - 1, BATCH)
  for temperature in TEMPERATURES:
    actual = _dkd(student, teacher, labels, jnp.float32(temperature))
    assert_accurate(
        actual, ref_dkd(student, teacher, labels, temperature),
        temperature**2,
    )


def test_student_minus_inf_under_teacher_mass_is_infinite():
  teacher = jnp.array([[0.0, 1.0, 2.0]])
  student = jnp.array([[0.0, -jnp.inf, 2.0]])
  for temperature in (1e-3, 1.0, 1e4):
    assert losses.kd_loss(student, teacher, temperature=temperature) == np.inf
    assert losses.reverse_kl_divergence(
        teacher, student, temperature=temperature
    ) == np.inf
  ensemble = losses.multi_teacher_kd_loss(
      student[0], jnp.stack([teacher[0], teacher[0] + 1])
  )
  assert ensemble == np.inf


def _teachers(t):
  # Two teachers; the second also rules out class 0.
  return jnp.stack([t, t + 1.0]).at[1, :, 0].set(-jnp.inf)


_LABELS = np.zeros(BATCH, np.int32)
_GRAD_CASES = {
    "kd": lambda s, t, T: losses.kd_loss(s, t, temperature=T),
    "jsd": lambda s, t, T: losses.jensen_shannon_divergence(
        s, t, temperature=T),
    "tvd": lambda s, t, T: losses.total_variation_distance(
        s, t, temperature=T),
    "dkd": lambda s, t, T: losses.dkd_loss(s, t, _LABELS, temperature=T),
    "ensemble": lambda s, t, T: losses.multi_teacher_kd_loss(
        s, _teachers(t), temperature=T),
    "mean": lambda s, t, T: losses.multi_teacher_kd_loss(
        s, _teachers(t), temperature=T, reduction="mean"),
}


@pytest.mark.parametrize("name", sorted(_GRAD_CASES))
def test_gradients_finite_where_the_teacher_is_minus_inf(name):
  fn = _GRAD_CASES[name]
  value_and_grad = jax.jit(jax.value_and_grad(
      lambda s, t, T: jnp.sum(fn(s, t, T)), argnums=(0, 1)
  ))
  # The student's own -inf entries sit where the teacher is -inf too.
  student, teacher = padded_pair(100.0)
  for temperature in (1e-3, 1.0, 1e4):
    value, grads = value_and_grad(student, teacher, jnp.float32(temperature))
    assert np.isfinite(value), temperature
    for g in grads:
      assert np.all(np.isfinite(np.asarray(g))), temperature
    # A class the teacher rules out gets no teacher gradient.
    np.testing.assert_array_equal(np.asarray(grads[1])[:, -2:], 0.0)
