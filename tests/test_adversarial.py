"""Adversarial distillation: a discriminator trained in the same jitted step."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxkd.methods import adversarial
from jaxkd import objective
from jaxkd import teachers
from jaxkd import train_step
from jaxkd.models import from_linen
from tests import tiny

STUDENT = from_linen(tiny.TinyCNN(width=4), name="student")
TEACHER = from_linen(tiny.TinyCNN(width=8), name="teacher")
BATCHES = tiny.digit_batches(32, 16, seed=3)


@functools.lru_cache(maxsize=None)  # one group object: one compilation
def trained_teachers(k: int = 2):
  """K small BatchNorm CNNs trained briefly on real digits (labels only)."""
  params, states = tiny.trained_teachers(k, first_seed=200)
  return teachers.TeacherGroup.create(TEACHER, params, states)


def decreases(history, key, n=4):
  first = np.mean([m[key] for m in history[:n]])
  last = np.mean([m[key] for m in history[-n:]])
  return first, last


def test_discriminator_lives_in_term_state_not_in_student_params():
  group, variables = trained_teachers()
  term = adversarial.AdversarialTerm(temperature=4.0, weight=0.5,
                                     optimizer=optax.adam(1e-2))
  spec = train_step.Distillation(
      student=STUDENT, teachers=[group],
      objective=[objective.LabelTerm(), term], optimizer=optax.adam(1e-2),
  )
  start = spec.init(jax.random.key(0), BATCHES[0], [variables])
  before = jax.tree.map(np.array, start)
  state, history = tiny.run_steps(spec, BATCHES[:3], [variables])
  d_state = state.model_state["terms"]["adversarial"]
  assert set(d_state) == {"params", "opt_state"}
  changed = jax.tree.map(
      lambda a, b: not np.array_equal(a, b), d_state["params"],
      before.model_state["terms"]["adversarial"]["params"],
  )
  assert all(jax.tree.leaves(changed))
  # Nothing of D in the student's params or in the student's optimiser.
  assert state.params["terms"]["adversarial"] == {}
  expected = optax.adam(1e-2).init(
      {"student": state.params["student"],
       "terms": {"labels": {}, "adversarial": {}}})
  assert jax.tree.structure(state.opt_state) == jax.tree.structure(expected)
  student_size = sum(x.size for x in jax.tree.leaves(state.params))
  opt_size = sum(np.size(x) for x in jax.tree.leaves(state.opt_state))
  assert opt_size == 2 * student_size + 1  # adam's mu, nu and count.
  d_size = sum(x.size for x in jax.tree.leaves(d_state["params"]))
  d_opt_size = sum(np.size(x) for x in jax.tree.leaves(d_state["opt_state"]))
  assert d_opt_size == 2 * d_size + 1
  # The teachers are untouched; the metrics of the hook are reported.
  jax.tree.map(np.testing.assert_array_equal, state.teachers, before.teachers)
  assert {"adversarial/d_loss", "adversarial/d_accuracy",
          "loss/adversarial"} <= set(history[0])


def test_discriminator_learns_while_the_student_is_frozen():
  group, variables = trained_teachers()
  spec = train_step.Distillation(
      student=STUDENT, teachers=[group],
      objective=[adversarial.AdversarialTerm(
          temperature=1.0, weight=0.0, optimizer=optax.adam(1e-2),
          teacher=1)],
      optimizer=optax.sgd(0.0),
  )
  state, history = tiny.run_steps(spec, BATCHES, [variables])
  first, last = decreases(history, "adversarial/d_loss")
  assert last < first, (first, last)
  assert history[-1]["adversarial/d_accuracy"] > 0.75
  # The student did not move: its loss is D's generator loss, which rises.
  start = spec.init(jax.random.key(0), BATCHES[0], [variables])
  jax.tree.map(np.testing.assert_array_equal, state.params["student"],
               start.params["student"])
  first, last = decreases(history, "loss/adversarial")
  assert last > first


TRACES = []


class CountingDiscriminator(nn.Module):
  """Counts its traces (a Python side effect runs only while tracing)."""

  @nn.compact
  def __call__(self, x):
    TRACES.append(1)
    return nn.Dense(1)(nn.relu(nn.Dense(32)(x.reshape(x.shape[0], -1))))


def test_adversarial_plus_labels_trains_and_compiles_once():
  group, variables = trained_teachers()
  spec = train_step.Distillation(
      student=STUDENT, teachers=[group],
      objective=[objective.LabelTerm(),
                 adversarial.AdversarialTerm(
                     discriminator=CountingDiscriminator(), temperature=4.0,
                     weight=0.3)],
      optimizer=optax.adam(1e-2),
  )
  state = spec.init(jax.random.key(0), BATCHES[0], [variables])
  step = train_step.make_train_step(spec)
  TRACES.clear()
  history = []
  for batch in BATCHES:
    state, metrics = step(state, batch)
    history.append(jax.tree.map(np.asarray, metrics))
    if len(history) == 1:
      traced = len(TRACES)
  assert traced > 0 and len(TRACES) == traced
  assert all(m["nonfinite"] == 0 for m in history)
  first, last = decreases(history, "loss")
  assert last < first, (first, last)
  first, last = decreases(history, "loss/labels")
  assert last < first, (first, last)
  assert np.mean([m["accuracy"] for m in history[-4:]]) > np.mean(
      [m["accuracy"] for m in history[:4]])


def _outputs(student_logits, teacher_logits, student_features=None,
             teacher_features=None):
  return objective.StepOutputs(
      student_logits=student_logits, student_features=student_features or {},
      teacher_logits=teacher_logits, teacher_features=teacher_features or {},
      labels=None, step=jnp.zeros((), jnp.int32), hparams={}, train=True,
  )


@pytest.mark.parametrize("on,teacher", [("logits", "ensemble"),
                                        ("logits", 1),
                                        ("feature:h", "ensemble"),
                                        ("feature:h", 2)])
def test_hooks_match_the_losses_by_hand(on, teacher, rng):
  draw = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  student, teacher_logits = draw(6, 5), draw(3, 6, 5)
  student_h, teacher_h = draw(6, 4), draw(3, 6, 4)
  outputs = _outputs(student, teacher_logits, {"h": student_h},
                     {"h": teacher_h})
  term = adversarial.AdversarialTerm(
      on=on, temperature=2.0, teacher=teacher, optimizer=optax.sgd(0.5))
  params, state = term.init(jax.random.key(0), outputs)
  assert params == {}
  d = adversarial.Discriminator()
  apply = lambda p, x: d.apply({"params": p}, x)
  if on == "logits":
    fake_in = jax.nn.softmax(student / 2.0)
    stacked = jax.nn.softmax(teacher_logits / 2.0)
  else:
    fake_in, stacked = student_h, teacher_h
  real_in = jnp.mean(stacked, 0) if teacher == "ensemble" else stacked[teacher]

  def d_loss(p):
    return jnp.mean(jax.nn.softplus(-apply(p, real_in))
                    + jax.nn.softplus(apply(p, fake_in)))

  @jax.jit
  def hooks(state):
    value, same_state = term.loss(params, state, outputs)
    new_state, metrics = term.update(state, outputs, jax.random.key(1))
    # The student's gradient does not reach D's parameters (they are state).
    grad_d = jax.grad(lambda s: term.loss(params, s, outputs)[0])(state)
    expected = jax.tree.map(lambda p, g: p - 0.5 * g, state["params"],
                            jax.grad(d_loss)(state["params"]))
    accuracy = jnp.mean(jnp.concatenate(
        [apply(state["params"], real_in) > 0,
         apply(state["params"], fake_in) < 0]).astype(jnp.float32))
    generator = jnp.mean(jax.nn.softplus(-apply(state["params"], fake_in)))
    return (value, same_state, new_state, metrics, grad_d, expected,
            accuracy, generator, d_loss(state["params"]))

  (value, same_state, new_state, metrics, grad_d, expected, accuracy,
   generator, expected_d_loss) = hooks(state)
  np.testing.assert_allclose(value, generator, rtol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, same_state, state)
  np.testing.assert_allclose(metrics["d_loss"], expected_d_loss, rtol=1e-6)
  np.testing.assert_allclose(metrics["d_accuracy"], accuracy)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5,
                                 atol=1e-7), new_state["params"], expected)
  assert all(np.all(g == 0) for g in jax.tree.leaves(grad_d["params"]))


def test_errors():
  with pytest.raises(ValueError, match="`on`"):
    adversarial.AdversarialTerm(on="features")
  with pytest.raises(ValueError, match="`teacher`"):
    adversarial.AdversarialTerm(teacher="mean")
  with pytest.raises(ValueError, match="`temperature`"):
    adversarial.AdversarialTerm(temperature=0.0)
  outputs = _outputs(jnp.zeros((4, 5)), jnp.zeros((2, 4, 5)))
  with pytest.raises(ValueError, match="`teacher`.*2 teachers"):
    adversarial.AdversarialTerm(teacher=2).init(jax.random.key(0), outputs)
  with pytest.raises(ValueError, match="student feature 'embedding'"):
    adversarial.AdversarialTerm(on="feature:embedding").init(
        jax.random.key(0), outputs)
  wide = outputs.replace(
      student_features={"h": jnp.zeros((4, 3))},
      teacher_features={"h": jnp.zeros((2, 4, 6))})
  with pytest.raises(ValueError, match="one shape"):
    adversarial.AdversarialTerm(on="feature:h").init(jax.random.key(0), wide)

  class TwoLogits(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(2)(x)

  with pytest.raises(ValueError, match="one logit per example"):
    adversarial.AdversarialTerm(discriminator=TwoLogits()).init(
        jax.random.key(0), outputs)

  class WithStats(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(1)(nn.BatchNorm(use_running_average=False)(x))

  with pytest.raises(ValueError, match="only 'params'"):
    adversarial.AdversarialTerm(discriminator=WithStats()).init(
        jax.random.key(0), outputs)
