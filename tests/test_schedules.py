"""Tests of the schedules, the adaptive weight controller and the grid."""

import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import losses
from jaxkd import schedules
from tests import helpers

STEPS = np.arange(-3, 420)


# Independent float64 references, written from the formulas.
def np_exponential(step, init, rate, steps_per_decay, floor):
  step = np.maximum(np.asarray(step), 0)
  return np.maximum(init * rate ** (step // steps_per_decay), floor)


def np_linear(step, init, end, transition_steps, begin=0):
  frac = np.clip((np.asarray(step, np.float64) - begin) / transition_steps, 0, 1)
  return init + (end - init) * frac


def np_cosine(step, init, end, transition_steps, begin=0):
  frac = np.clip((np.asarray(step, np.float64) - begin) / transition_steps, 0, 1)
  return end + (init - end) * 0.5 * (1 + np.cos(np.pi * frac))


def evaluate(schedule, steps):
  """A schedule at each step, through one jitted call on an array of steps."""
  return np.asarray(jax.jit(schedule)(jnp.asarray(steps, jnp.int32)))


# ---------------------------------------------------------------- constant.


def test_constant():
  schedule = schedules.constant(2.5)
  assert float(schedule(0)) == 2.5
  assert float(jax.jit(schedule)(jnp.int32(123))) == 2.5
  values = schedule(jnp.arange(4))
  assert values.shape == (4,) and values.dtype == jnp.float32
  np.testing.assert_array_equal(values, 2.5)


# ------------------------------------------------ exponential decay + floor.


@pytest.mark.parametrize(
    "step, expected",
    [
        # T <- 4 * 0.95 ** (step // 5), never below 0.1, by hand.
        (0, 4.0),
        (4, 4.0),
        (5, 3.8),
        (9, 3.8),
        (10, 3.61),
        (15, 3.4295),
        (355, 4.0 * 0.95**71),  # 0.10502..., just above the floor.
        (360, 0.1),  # 4 * 0.95**72 = 0.09977 < 0.1.
        (10**6, 0.1),
        (-7, 4.0),  # Negative steps count as step 0.
    ],
)
def test_exponential_decay_golden(step, expected):
  schedule = schedules.exponential_decay_with_floor(4.0)
  value = schedule(step)
  assert value.dtype == jnp.float32 and value.shape == ()
  np.testing.assert_allclose(float(value), expected, rtol=2e-6)


@pytest.mark.parametrize(
    "init, rate, steps_per_decay, floor",
    [(4.0, 0.95, 5, 0.1), (1.0, 0.5, 1, 0.0), (3.0, 1.0, 7, 0.5)],
)
def test_exponential_decay_matches_reference(init, rate, steps_per_decay, floor):
  schedule = schedules.exponential_decay_with_floor(
      init, decay_rate=rate, steps_per_decay=steps_per_decay, floor=floor
  )
  values = evaluate(schedule, STEPS)
  helpers.assert_close(
      values, np_exponential(STEPS, init, rate, steps_per_decay, floor),
      rtol=1e-5, atol=1e-37,  # XLA:CPU flushes float32 subnormals to zero.
  )
  assert np.all(np.diff(values) <= 0)  # Non-increasing.
  assert np.all(values >= np.float32(floor))


def test_exponential_decay_float_steps_match_integer_steps():
  schedule = schedules.exponential_decay_with_floor(4.0)
  steps = np.arange(0, 40)
  np.testing.assert_array_equal(
      schedule(jnp.asarray(steps, jnp.float32)),
      schedule(jnp.asarray(steps, jnp.int32)),
  )
  # A fractional epoch stays on the staircase step below it.
  assert float(schedule(9.99)) == float(schedule(5))


def test_schedules_return_float32_under_x64(x64):
  for schedule in (
      schedules.constant(1.0),
      schedules.exponential_decay_with_floor(2.0),
      schedules.linear_anneal(2.0, 1.0, transition_steps=3),
      schedules.cosine_anneal(2.0, 1.0, transition_steps=3),
  ):
    for step in (jnp.int64(4), jnp.float64(4.0), 4):
      assert schedule(step).dtype == jnp.float32


# -------------------------------------------------- linear / cosine anneal.


@pytest.mark.parametrize(
    "make, expected",
    [
        (
            schedules.linear_anneal,
            # 8 -> 2 over steps 10..16: 1 per step.
            {0: 8.0, 10: 8.0, 11: 7.0, 13: 5.0, 16: 2.0, 17: 2.0, 10**6: 2.0},
        ),
        (
            schedules.cosine_anneal,
            # 2 + 6 * (1 + cos(pi * (t - 10) / 6)) / 2.
            {0: 8.0, 10: 8.0, 12: 6.5, 13: 5.0, 14: 3.5, 16: 2.0, 10**6: 2.0},
        ),
    ],
)
def test_anneal_golden(make, expected):
  schedule = make(8.0, 2.0, transition_steps=6, transition_begin=10)
  for step, value in expected.items():
    np.testing.assert_allclose(float(schedule(step)), value, rtol=1e-6)


@pytest.mark.parametrize(
    "make, reference",
    [
        (schedules.linear_anneal, np_linear),
        (schedules.cosine_anneal, np_cosine),
    ],
)
@pytest.mark.parametrize("init, end", [(10.0, 0.3), (0.1, 0.7), (1.0, 1.0)])
def test_anneal_matches_reference_monotone_and_clamped(make, reference, init, end):
  steps = np.arange(-5, 420)
  schedule = make(init, end, transition_steps=400, transition_begin=7)
  values = evaluate(schedule, steps)
  helpers.assert_close(
      values, reference(steps, init, end, 400, 7), rtol=2e-6, atol=1e-6
  )
  # Monotone in the direction of the ramp, exactly, step by step.
  direction = np.sign(end - init)
  assert np.all(direction * np.diff(values) >= 0)
  # Exact ends, and nothing outside [min, max].
  assert np.all(values[steps <= 7] == np.float32(init))
  assert np.all(values[steps >= 407] == np.float32(end))
  assert values.min() >= np.float32(min(init, end))
  assert values.max() <= np.float32(max(init, end))


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(
    init=st.floats(-100, 100), end=st.floats(-100, 100),
    transition_steps=st.integers(1, 50), begin=st.integers(0, 20),
)
def test_anneals_stay_between_the_end_values(init, end, transition_steps, begin):
  steps = jnp.arange(0, 80)
  low, high = np.float32(min(init, end)), np.float32(max(init, end))
  for make in (schedules.linear_anneal, schedules.cosine_anneal):
    values = np.asarray(
        make(init, end, transition_steps=transition_steps,
             transition_begin=begin)(steps)
    )
    assert np.all((values >= low) & (values <= high))
    assert values[-1] == np.float32(end) or begin + transition_steps > 79


def test_linear_warmup_is_the_dkd_ramp():
  # DKD: weight = min(epoch / 20, 1).
  schedule = schedules.linear_warmup(1.0, warmup_steps=20)
  epochs = np.arange(0, 60)
  helpers.assert_close(
      evaluate(schedule, epochs), np.minimum(epochs / 20, 1.0), rtol=1e-6
  )
  assert float(schedule(20)) == 1.0
  shifted = schedules.linear_warmup(8.0, warmup_steps=4, init_value=2.0)
  assert [float(shifted(s)) for s in (0, 1, 2, 4, 9)] == [2.0, 3.5, 5.0, 8.0, 8.0]


def test_schedules_jit_with_traced_step_matches_eager():
  for schedule in (
      schedules.constant(3.0),
      schedules.exponential_decay_with_floor(4.0),
      schedules.linear_anneal(4.0, 1.0, transition_steps=10),
      schedules.cosine_anneal(4.0, 1.0, transition_steps=10),
      schedules.linear_warmup(1.0, warmup_steps=10),
  ):
    jitted = jax.jit(schedule)
    for step in (0, 3, 7, 12):
      traced = jitted(jnp.int32(step))
      assert traced.shape == () and traced.dtype == jnp.float32
      assert float(traced) == float(schedule(step))
    # Inside a scan, as in a training loop carrying the step.
    _, scanned = jax.lax.scan(
        lambda step, _: (step + 1, schedule(step)), jnp.int32(0), length=15
    )
    np.testing.assert_array_equal(scanned, schedule(jnp.arange(15)))


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: schedules.constant(float("nan")), "value"),
        (lambda: schedules.constant("4"), "value"),
        (
            lambda: schedules.exponential_decay_with_floor(4.0, decay_rate=0.0),
            "decay_rate",
        ),
        (
            lambda: schedules.exponential_decay_with_floor(4.0, decay_rate=1.5),
            "decay_rate",
        ),
        (
            lambda: schedules.exponential_decay_with_floor(4.0, steps_per_decay=0),
            "steps_per_decay",
        ),
        (
            lambda: schedules.exponential_decay_with_floor(4.0, steps_per_decay=2.5),
            "steps_per_decay",
        ),
        (
            lambda: schedules.exponential_decay_with_floor(4.0, floor=-0.1),
            "floor",
        ),
        (
            lambda: schedules.exponential_decay_with_floor(0.05, floor=0.1),
            "init_value",
        ),
        (
            lambda: schedules.linear_anneal(1.0, 0.0, transition_steps=0),
            "transition_steps",
        ),
        (
            lambda: schedules.linear_anneal(
                1.0, 0.0, transition_steps=3, transition_begin=-1
            ),
            "transition_begin",
        ),
        (
            lambda: schedules.cosine_anneal(1.0, 0.0, transition_steps=-2),
            "transition_steps",
        ),
        (
            lambda: schedules.cosine_anneal(
                1.0, float("inf"), transition_steps=2
            ),
            "end_value",
        ),
        (lambda: schedules.linear_warmup(1.0, warmup_steps=0), "warmup_steps"),
        (lambda: schedules.linear_warmup(1.0, warmup_steps=True), "warmup_steps"),
    ],
)
def test_schedule_construction_errors(build, match):
  with pytest.raises((ValueError, TypeError), match=f"`{match}`"):
    build()


def test_schedule_rejects_traced_hyper_parameter_and_bool_step():
  with pytest.raises(TypeError, match="`init_value`"):
    jax.jit(lambda v: schedules.linear_anneal(v, 0.0, transition_steps=2)(0))(
        1.0
    )
  with pytest.raises(TypeError, match="`step`"):
    schedules.constant(1.0)(jnp.array(True))


# ------------------------------------------------- adaptive alpha controller.


def reference_controller(metrics, *, alpha, patience, step_size, min_alpha,
                         max_alpha, min_delta, drop_tolerance, direction):
  """The documented rule in plain Python floats."""
  best, count, alphas = -math.inf, 0, []
  for m in metrics:
    if m > best + min_delta:
      best, count = m, 0
    else:
      count += 1
      if m < best - drop_tolerance or count >= patience:
        sign = -1 if direction == "hard" else 1
        alpha = min(max(alpha + sign * step_size, min_alpha), max_alpha)
        count = 0
    alphas.append(alpha)
  return alphas


def run_controller(controller, metrics):
  """Alphas after each metric, through one jitted scan."""

  @jax.jit
  def scan(metrics):
    return jax.lax.scan(controller.update, controller.init(), metrics)

  state, alphas = scan(jnp.asarray(metrics, jnp.float32))
  return state, np.asarray(alphas)


def test_controller_improvements_keep_alpha():
  controller = schedules.AdaptiveAlpha(initial_alpha=0.7, patience=1)
  state, alphas = run_controller(controller, [0.1, 0.2, 0.3, 0.4])
  np.testing.assert_allclose(alphas, 0.7, rtol=1e-7)
  assert float(state.best_metric) == np.float32(0.4)
  assert int(state.stall_count) == 0


def test_controller_stall_waits_for_patience_then_resets():
  controller = schedules.AdaptiveAlpha(initial_alpha=0.5, patience=3)
  # Plateaus at 0.8: alpha moves on the 3rd stall, the counter restarts and
  # the 6th stall moves it again; an improvement then resets the counter.
  metrics = [0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.9, 0.9, 0.9]
  state, alphas = run_controller(controller, metrics)
  np.testing.assert_allclose(
      alphas, [0.5, 0.5, 0.5, 0.4, 0.4, 0.4, 0.3, 0.3, 0.3, 0.3], atol=1e-6
  )
  assert int(state.stall_count) == 2


def test_controller_drop_moves_at_once():
  controller = schedules.AdaptiveAlpha(initial_alpha=0.5, patience=10)
  _, alphas = run_controller(controller, [0.8, 0.7, 0.79, 0.81, 0.6])
  np.testing.assert_allclose(alphas, [0.5, 0.4, 0.3, 0.3, 0.2], atol=1e-6)


def test_controller_soft_direction_and_clipping():
  controller = schedules.AdaptiveAlpha(
      initial_alpha=0.5, patience=1, step_size=0.3, direction="soft",
      max_alpha=0.9,
  )
  _, alphas = run_controller(controller, [1.0, 0.0, 0.0, 0.0])
  np.testing.assert_allclose(alphas, [0.5, 0.8, 0.9, 0.9], atol=1e-6)
  controller = schedules.AdaptiveAlpha(
      initial_alpha=0.25, patience=1, step_size=0.2, min_alpha=0.1
  )
  _, alphas = run_controller(controller, [1.0, 0.0, 0.0])
  np.testing.assert_allclose(alphas, [0.25, 0.1, 0.1], atol=1e-6)


def test_controller_min_delta_and_drop_tolerance():
  # Gains of 0.01 do not beat min_delta=0.05: they are stalls.
  controller = schedules.AdaptiveAlpha(patience=2, min_delta=0.05)
  state, alphas = run_controller(controller, [0.5, 0.51, 0.52, 0.6])
  np.testing.assert_allclose(alphas, [0.5, 0.5, 0.4, 0.4], atol=1e-6)
  assert float(state.best_metric) == np.float32(0.6)
  # With drop_tolerance=inf only patience moves alpha.
  controller = schedules.AdaptiveAlpha(patience=2, drop_tolerance=float("inf"))
  _, alphas = run_controller(controller, [0.9, 0.1, 0.1, 0.1])
  np.testing.assert_allclose(alphas, [0.5, 0.5, 0.4, 0.4], atol=1e-6)


def test_controller_nan_metric_is_a_stall():
  controller = schedules.AdaptiveAlpha(patience=2)
  state, alphas = run_controller(controller, [0.5, np.nan, np.nan, 0.6])
  np.testing.assert_allclose(alphas, [0.5, 0.5, 0.4, 0.4], atol=1e-6)
  assert float(state.best_metric) == np.float32(0.6)


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(
    metrics=st.lists(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]),
                     min_size=12, max_size=12),
    patience=st.integers(1, 4),
    direction=st.sampled_from(["hard", "soft"]),
    min_delta=st.sampled_from([0.0, 0.3]),
    drop_tolerance=st.sampled_from([0.0, 0.3, math.inf]),
)
def test_controller_matches_python_rule(
    metrics, patience, direction, min_delta, drop_tolerance
):
  hyper = dict(
      patience=patience, step_size=0.125, min_alpha=0.125, max_alpha=0.875,
      min_delta=min_delta, drop_tolerance=drop_tolerance, direction=direction,
  )
  controller = schedules.AdaptiveAlpha(initial_alpha=0.5, **hyper)
  _, alphas = run_controller(controller, metrics)
  # Metrics, steps and bounds are binary fractions, so both routes are exact.
  expected = reference_controller(metrics, alpha=0.5, **hyper)
  np.testing.assert_array_equal(alphas, np.asarray(expected, np.float32))


def test_controller_eager_matches_jit_and_is_a_pytree(x64):
  controller = schedules.AdaptiveAlpha(patience=1)
  state = controller.init()
  assert len(jax.tree.leaves(state)) == 3
  assert state.alpha.dtype == jnp.float32
  assert state.stall_count.dtype == jnp.int32
  jitted = jax.jit(controller.update)
  eager_state = jit_state = state
  for metric in (np.float64(0.3), 0.2, jnp.float32(0.4), 1):
    eager_state, eager_alpha = controller.update(eager_state, metric)
    jit_state, jit_alpha = jitted(jit_state, metric)
    assert float(eager_alpha) == float(jit_alpha)
    assert eager_alpha.dtype == jnp.float32
  helpers.assert_close(eager_state, jit_state, rtol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(patience=0), "patience"),
        (dict(patience=1.5), "patience"),
        (dict(step_size=0.0), "step_size"),
        (dict(min_alpha=-0.1), "min_alpha"),
        (dict(min_alpha=0.6, max_alpha=0.4, initial_alpha=0.5), "max_alpha"),
        (dict(max_alpha=1.5), "max_alpha"),
        (dict(initial_alpha=0.9, max_alpha=0.8), "initial_alpha"),
        (dict(min_delta=-1e-3), "min_delta"),
        (dict(drop_tolerance=-1.0), "drop_tolerance"),
        (dict(drop_tolerance=float("nan")), "drop_tolerance"),
        (dict(direction="teacher"), "direction"),
    ],
)
def test_controller_construction_errors(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=f"`{match}`"):
    schedules.AdaptiveAlpha(**kwargs)


def test_controller_update_errors():
  controller = schedules.AdaptiveAlpha()
  with pytest.raises(ValueError, match="`validation_metric`"):
    controller.update(controller.init(), jnp.zeros(2))
  with pytest.raises(TypeError, match="`validation_metric`"):
    controller.update(controller.init(), jnp.array(True))
  with pytest.raises(TypeError):  # Keyword-only hyper-parameters.
    schedules.AdaptiveAlpha(0.5)  # pylint: disable=too-many-function-args


# ------------------------------------------------------ temperature grid.


def local_kl(student, teacher, *, temperature, axis=-1):
  """KL(softmax(teacher / T) || softmax(student / T)), written here."""
  log_t = jax.nn.log_softmax(teacher / temperature, axis=axis)
  log_s = jax.nn.log_softmax(student / temperature, axis=axis)
  return jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=axis)


def test_temperature_grid_matches_loop(rng):
  student = jnp.asarray(rng.standard_normal((4, 5)), jnp.float32)
  teacher = jnp.asarray(rng.standard_normal((4, 5)), jnp.float32)
  temperatures = jnp.array([0.5, 1.0, 2.0, 4.0, 16.0])
  grid = schedules.temperature_grid_loss(
      local_kl, student, teacher, temperatures
  )
  assert grid.shape == (5, 4)
  loop = jnp.stack(
      [local_kl(student, teacher, temperature=t) for t in temperatures]
  )
  helpers.assert_close(grid, loop, rtol=1e-6, atol=1e-8)


def test_temperature_grid_passes_kwargs_to_kd_loss(rng):
  student = jnp.asarray(rng.standard_normal((5, 3, 2)), jnp.float32)
  teacher = jnp.asarray(rng.standard_normal((5, 3, 2)), jnp.float32)
  where = jnp.array([[True], [False], [True], [True], [False]])
  temperatures = [1.0, 3.0]
  grid = jax.jit(
      lambda s, t: schedules.temperature_grid_loss(
          losses.kd_loss, s, t, jnp.asarray(temperatures), axis=1, where=where
      )
  )(student, teacher)
  assert grid.shape == (2, 5, 2)
  for i, temperature in enumerate(temperatures):
    expected = losses.kd_loss(
        student, teacher, temperature=temperature, axis=1, where=where
    )
    helpers.assert_close(grid[i], expected, rtol=1e-6, atol=1e-8)


def test_temperature_grid_is_one_vmapped_call():
  calls = []

  def loss_fn(student, teacher, *, temperature):
    calls.append(temperature)
    return local_kl(student, teacher, temperature=temperature)

  logits = jnp.zeros((2, 3))
  schedules.temperature_grid_loss(
      loss_fn, logits, logits, jnp.arange(1, 9)  # Integers are cast.
  )
  assert len(calls) == 1
  assert isinstance(calls[0], jax.core.Tracer)
  assert calls[0].dtype == jnp.float32


@pytest.mark.parametrize(
    "temperatures, error",
    [
        (jnp.ones((2, 2)), ValueError),
        (jnp.zeros((0,)), ValueError),
        (jnp.array([1.0, 0.0]), ValueError),
        (jnp.array([1.0, -2.0]), ValueError),
        (jnp.array([True, False]), TypeError),
    ],
)
def test_temperature_grid_errors(temperatures, error):
  logits = jnp.zeros((2, 3))
  with pytest.raises(error, match="`temperatures`"):
    schedules.temperature_grid_loss(local_kl, logits, logits, temperatures)
