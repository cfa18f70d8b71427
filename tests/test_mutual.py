"""Deep mutual learning: students teaching each other in one jitted step."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxkd import mutual
from jaxkd import objective
from jaxkd import train_step
from jaxkd.models._contract import from_linen
from tests import tiny

# Three students of different architectures (one without any state).
STUDENTS = (
    from_linen(tiny.TinyCNN(width=4), name="cnn4"),
    from_linen(tiny.TinyCNN(width=6), name="cnn6"),
    from_linen(tiny.TinyMLP(width=32), name="mlp"),
)
TEMPERATURE, WEIGHT = 3.0, 0.7
OPTIMIZER = optax.adam(1e-2)
MD = mutual.MutualDistillation(STUDENTS, OPTIMIZER, temperature=TEMPERATURE,
                               weight=WEIGHT)
STEP = mutual.make_mutual_step(MD, donate=False)
BATCHES = tiny.digit_batches(32, 20, seed=5)


def test_students_train_on_real_digits_and_eval_matches_numpy():
  state = MD.init(jax.random.key(0), BATCHES[0])
  history = []
  for batch in BATCHES:
    state, metrics = STEP(state, batch)
    history.append(jax.tree.map(np.asarray, metrics))
  for i in range(3):
    first = np.mean([m[f"loss/{i}"] for m in history[:4]])
    last = np.mean([m[f"loss/{i}"] for m in history[-4:]])
    assert last < first, (i, first, last)
    assert np.isfinite([m[f"kl/{i}"] for m in history]).all()
  assert int(state.step) == len(BATCHES)

  images, labels = tiny.digits()
  batch = {"image": jnp.asarray(images[:40]), "label": jnp.asarray(labels[:40]),
           "mask": jnp.arange(40) < 30}
  sums = mutual.make_mutual_eval_step(MD)(state, batch)
  summary = mutual.summarize([sums])
  logits = np.stack([
      np.asarray(model.apply(peer.params, peer.model_state, batch["image"],
                             train=False)[0], np.float64)
      for model, peer in zip(STUDENTS, state.students)
  ])[:, :30]
  y = labels[:30]
  np.testing.assert_allclose(summary["accuracy"],
                             (logits.argmax(-1) == y).mean(-1))
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  np.testing.assert_allclose(summary["ensemble_accuracy"],
                             (probs.mean(0).argmax(-1) == y).mean())
  assert summary["ensemble_accuracy"] > 0.5


@functools.lru_cache(maxsize=None)
def distillation_for(i: int) -> train_step.Distillation:
  """Student i with its peers' logits as a cached, fixed teacher."""
  return train_step.Distillation(
      student=STUDENTS[i],
      objective=[objective.LabelTerm(weight=1.0),
                 objective.LogitTerm(weight=WEIGHT, temperature=TEMPERATURE,
                                     teachers="mean")],
      optimizer=OPTIMIZER,
  )


def test_a_step_equals_separate_steps_with_peers_as_fixed_teachers():
  state = MD.init(jax.random.key(1), BATCHES[0])
  for batch in BATCHES[:2]:
    # Route 2: each student alone, its peers' current train-mode logits
    # given as cached teacher logits [N - 1, B, C].
    peer_logits = [
        model.apply(peer.params, peer.model_state, batch["image"],
                    train=True, rng=None)[0]
        for model, peer in zip(STUDENTS, state.students)
    ]
    expected = []
    for i, peer in enumerate(state.students):
      spec = distillation_for(i)
      cached = {**batch, "teacher_logits": jnp.stack(
          [z for j, z in enumerate(peer_logits) if j != i])}
      single = spec.init(jax.random.key(0), cached)
      params = {"student": peer.params, "terms": {"labels": {}, "kd": {}}}
      # The optimiser state carries over from the previous DML step.
      single = single.replace(
          params=params,
          model_state={"student": peer.model_state,
                       "terms": {"labels": {}, "kd": {}}},
          opt_state=_wrap_opt_state(peer.opt_state),
      )
      single, _ = train_step.make_train_step(spec, donate=False)(
          single, cached)
      expected.append(single)
    # Route 1: one mutual step.
    state, _ = STEP(state, batch)
    for peer, single in zip(state.students, expected):
      close = functools.partial(np.testing.assert_allclose, rtol=2e-5,
                                atol=1e-6)
      jax.tree.map(close, peer.params, single.params["student"])
      jax.tree.map(close, peer.model_state, single.model_state["student"])
      jax.tree.map(close, _wrap_opt_state(peer.opt_state), single.opt_state)


def _wrap_opt_state(opt_state):
  """Adam's state of ``params`` as Distillation holds it (with term slots)."""
  scale, empty = opt_state
  wrap = lambda tree: {"student": tree, "terms": {"labels": {}, "kd": {}}}
  return (scale._replace(mu=wrap(scale.mu), nu=wrap(scale.nu)), empty)


def test_gradient_of_the_sum_is_each_students_own_gradient():
  state = MD.init(jax.random.key(2), BATCHES[0])
  params = tuple(peer.params for peer in state.students)
  key = jax.random.key(3)

  @jax.jit
  def grads(params):
    total_grads = jax.grad(lambda p: MD._objective(p, state, BATCHES[0],
                                                   key)[0])(params)
    own = [
        jax.grad(lambda p, i=i: MD._objective(
            params[:i] + (p,) + params[i + 1:], state, BATCHES[0],
            key)[1][2][f"loss/{i}"])(params[i])
        for i in range(3)
    ]
    return total_grads, own

  total_grads, own = grads(params)
  for a, b in zip(total_grads, own):
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5,
                                   atol=1e-7), a, b)


def test_errors():
  with pytest.raises(ValueError, match="at least two"):
    mutual.MutualDistillation(STUDENTS[:1], OPTIMIZER)
  with pytest.raises(ValueError, match="`optimizer`"):
    mutual.MutualDistillation(STUDENTS, [OPTIMIZER, OPTIMIZER])
  with pytest.raises(ValueError, match="`temperature`"):
    mutual.MutualDistillation(STUDENTS, OPTIMIZER, temperature=0.0)
  with pytest.raises(ValueError, match="`weight`"):
    mutual.MutualDistillation(STUDENTS, OPTIMIZER, weight=-1.0)
  five = from_linen(tiny.TinyMLP(num_classes=5), name="five")
  with pytest.raises(ValueError, match="one number of classes"):
    mutual.MutualDistillation([STUDENTS[2], five], OPTIMIZER).init(
        jax.random.key(0), BATCHES[0])
