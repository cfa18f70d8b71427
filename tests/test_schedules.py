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


def test_optax_schedules_drive_a_term_and_are_checked_when_built():
  import optax  # pylint: disable=g-import-not-at-top
  from jaxkd import objective  # pylint: disable=g-import-not-at-top
  anneal = optax.linear_schedule(8.0, 2.0, transition_steps=6)
  term = objective.LogitTerm(temperature=anneal)
  np.testing.assert_allclose(
      [float(objective.resolve(term.temperature, jnp.int32(s)))
       for s in (0, 3, 6, 100)], [8.0, 5.0, 2.0, 2.0])
  # DKD's warm-up ramp is a weight that starts at 0: allowed.
  objective.LogitTerm(weight=optax.linear_schedule(0.0, 1.0, 20))
  # A temperature schedule that reaches 0 is refused, naming the step.
  with pytest.raises(ValueError, match="at step 10 is 0"):
    objective.LogitTerm(temperature=optax.linear_schedule(4.0, 0.0, 10))


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
