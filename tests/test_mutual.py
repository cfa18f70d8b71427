"""Deep mutual learning: students teaching each other, on the one engine."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import objective
from jaxkd import train_step
from jaxkd.methods import mutual
from jaxkd.models import from_linen
from tests import tiny

# Three students of different architectures (one without any state).
STUDENTS = (
    from_linen(tiny.TinyCNN(width=4), name="cnn4"),
    from_linen(tiny.TinyCNN(width=6), name="cnn6"),
    from_linen(tiny.TinyMLP(width=32), name="mlp"),
)
TEMPERATURE, WEIGHT = 3.0, 0.7
OPTIMIZER = optax.adam(1e-2)
MD = mutual.mutual_distillation(STUDENTS, OPTIMIZER, temperature=TEMPERATURE,
                                weight=WEIGHT)
STEP = train_step.make_train_step(MD, donate=False)
BATCHES = tiny.digit_batches(32, 20, seed=5)


def test_students_train_on_real_digits_and_eval_matches_numpy():
  state = MD.init(jax.random.key(0), BATCHES[0])
  assert isinstance(state, train_step.DistillState)
  history = []
  for batch in BATCHES:
    state, metrics = STEP(state, batch)
    history.append(jax.tree.map(np.asarray, metrics))
  first = np.mean([m["loss"] for m in history[:4]])
  last = np.mean([m["loss"] for m in history[-4:]])
  assert last < first, (first, last)
  assert int(state.step) == len(BATCHES)

  images, labels = tiny.digits()
  batch = {"image": jnp.asarray(images[:40]), "label": jnp.asarray(labels[:40]),
           "mask": jnp.arange(40) < 30}
  sums = jaxkd.make_eval_step(MD)(state, batch)
  summary = jaxkd.summarize([sums])
  logits = np.stack([
      np.asarray(model.apply(p, s, batch["image"], train=False)[0],
                 np.float64)
      for model, p, s in zip(STUDENTS, state.student_params,
                             state.student_state)
  ])[:, :30]
  y = labels[:30]
  np.testing.assert_allclose(summary["mutual/accuracy"],
                             (logits.argmax(-1) == y).mean(-1))
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  # The group's prediction is the students' probability average.
  np.testing.assert_allclose(summary["accuracy"],
                             (probs.mean(0).argmax(-1) == y).mean())
  assert summary["accuracy"] > 0.5


@functools.lru_cache(maxsize=None)
def distillation_for(i: int) -> train_step.Distillation:
  """Student i with its peers' logits as a cached, fixed teacher."""
  return train_step.Distillation(
      student=STUDENTS[i],
      objective=[objective.LabelTerm(weight=1.0),
                 objective.LogitTerm(weight=WEIGHT, temperature=TEMPERATURE,
                                     teacher_reduction="mean")],
      optimizer=OPTIMIZER,
  )


def test_a_step_equals_separate_steps_with_peers_as_fixed_teachers():
  state = MD.init(jax.random.key(1), BATCHES[0])
  # Route 2: N separate distillations from the same initial students, each
  # given its peers' current train-mode logits as cached teacher logits.
  singles = []
  for i in range(len(STUDENTS)):
    spec = distillation_for(i)
    cached = {**BATCHES[0], "teacher_logits": jnp.zeros((2, 32, 10))}
    single = spec.init(jax.random.key(0), cached)
    params = {"student": state.student_params[i],
              "terms": {"labels": {}, "kd": {}}}
    singles.append(single.replace(
        params=params,
        model_state={"student": state.student_state[i],
                     "terms": {"labels": {}, "kd": {}}},
        opt_state=OPTIMIZER.init(params),
    ))
  for batch in BATCHES[:3]:
    peer_logits = [
        model.apply(s.student_params, s.student_state, batch["image"],
                    train=True, rng=None)[0]
        for model, s in zip(STUDENTS, singles)
    ]
    for i, spec in enumerate(map(distillation_for, range(len(STUDENTS)))):
      cached = {**batch, "teacher_logits": jnp.stack(
          [z for j, z in enumerate(peer_logits) if j != i])}
      singles[i], _ = train_step.make_train_step(spec, donate=False)(
          singles[i], cached)
    # Route 1: one mutual step.
    state, _ = STEP(state, batch)
  close = functools.partial(np.testing.assert_allclose, rtol=2e-5, atol=1e-6)
  for i, single in enumerate(singles):
    jax.tree.map(close, state.student_params[i], single.student_params)
    jax.tree.map(close, state.student_state[i], single.student_state)


def test_each_student_has_its_own_optimizer():
  spec = mutual.mutual_distillation(
      STUDENTS[1:], [optax.sgd(0.0), optax.adam(1e-2)])
  state = spec.init(jax.random.key(4), BATCHES[0])
  new, _ = train_step.make_train_step(spec, donate=False)(state, BATCHES[0])
  # A zero learning rate leaves the first student's parameters as they were.
  jax.tree.map(np.testing.assert_array_equal, new.student_params[0],
               state.student_params[0])
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)),
                         new.student_params[1], state.student_params[1])
  assert any(jax.tree.leaves(changed))


def test_errors():
  with pytest.raises(ValueError, match="at least two"):
    mutual.mutual_distillation(STUDENTS[:1], OPTIMIZER)
  with pytest.raises(ValueError, match="`optimizer`"):
    mutual.mutual_distillation(STUDENTS, [OPTIMIZER, OPTIMIZER])
  with pytest.raises(ValueError, match="`temperature`"):
    mutual.mutual_distillation(STUDENTS, OPTIMIZER, temperature=0.0)
  with pytest.raises(ValueError, match="`peer_weight`"):
    mutual.mutual_distillation(STUDENTS, OPTIMIZER, weight=-1.0)
  five = from_linen(tiny.TinyMLP(num_classes=5), name="five")
  with pytest.raises(ValueError, match="one number of classes"):
    mutual.mutual_distillation([STUDENTS[2], five], OPTIMIZER).init(
        jax.random.key(0), BATCHES[0])
  with pytest.raises(ValueError, match="peer_logits"):
    spec = train_step.Distillation(
        student=STUDENTS[0], objective=[mutual.MutualTerm()],
        optimizer=OPTIMIZER)
    spec.init(jax.random.key(0), BATCHES[0])
