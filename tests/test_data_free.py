"""Data-free distillation: generator and student in one jitted step."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxkd.methods import data_free
from jaxkd import objective
from jaxkd import teachers
from jaxkd import train_step
from jaxkd.models import from_linen
from tests import tiny

TEACHER_MODULE = tiny.TinyCNN(width=8)
TEACHER = from_linen(TEACHER_MODULE, name="teacher")
STUDENT = from_linen(tiny.TinyCNN(width=4), name="student")
GENERATOR = data_free.Generator(image_shape=(8, 8, 1), width=32)


@functools.lru_cache(maxsize=None)
def trained_teacher():
  """A BatchNorm CNN trained for 100 steps on real digits."""
  spec = train_step.Distillation(
      student=TEACHER, objective=[objective.LabelTerm()],
      optimizer=optax.adam(1e-2),
  )
  step = train_step.make_train_step(spec)
  batches = tiny.digit_batches(64, 100, seed=7)
  state = spec.init(jax.random.key(0), batches[0])
  for batch in batches:
    state, metrics = step(state, batch)
  assert metrics["accuracy"] > 0.7
  return state.params["student"], state.model_state["student"]


def make_dfd(group, **kwargs):
  kwargs = {"noise_dim": 16, "batch_size": 32, "temperature": 4.0,
            "adversarial_weight": 0.2, **kwargs}
  return data_free.DataFreeDistillation(
      STUDENT, group, GENERATOR, optax.adam(1e-2), optax.adam(1e-2),
      **kwargs)


def mean_kl(teacher_logits, student_logits):
  log_t = jax.nn.log_softmax(teacher_logits)
  log_s = jax.nn.log_softmax(student_logits)
  return float(jnp.mean(jnp.sum(jnp.exp(log_t) * (log_t - log_s), -1)))


def test_data_free_step_trains_generator_and_student():
  params, model_state = trained_teacher()
  group, variables = teachers.TeacherGroup.create(
      TEACHER, [params], [model_state])
  dfd = make_dfd(group)
  state = dfd.init(jax.random.key(1), variables, (8, 8, 1))
  start = jax.tree.map(np.array, state)
  step = data_free.make_data_free_step(dfd)
  history = []
  for _ in range(30):
    state, metrics = step(state)
    history.append(jax.tree.map(np.asarray, metrics))

  def first_last(key, n=5):
    return (np.mean([m[key] for m in history[:n]]),
            np.mean([m[key] for m in history[-n:]]))

  first, last = first_last("generator_loss")
  assert last < first, (first, last)
  first, last = first_last("generator/bn_statistics")
  assert last < first, (first, last)
  first, last = first_last("loss/kd")
  assert last < first, (first, last)
  assert all(np.isfinite(m["generator/discrepancy"]) for m in history)
  # The BN loss runs over both of the teacher's BatchNorm layers.
  assert all(m["bn_layers"] == 2 for m in history)
  assert len(model_state["batch_stats"]) == 2
  # The teacher never changes.
  jax.tree.map(np.testing.assert_array_equal, state.teachers, start.teachers)
  # On fixed noise, the trained student is closer to the teacher than the
  # initial one on the final generator's images.
  images = dfd.generate(
      state, jax.random.normal(jax.random.key(9), (64, 16)), train=True)
  teacher_logits = TEACHER.apply(params, model_state, images, train=False)[0]
  before = STUDENT.apply(start.student_params, start.student_state, images,
                         train=False)[0]
  after = STUDENT.apply(state.student_params, state.student_state, images,
                        train=False)[0]
  assert mean_kl(teacher_logits, after) < mean_kl(teacher_logits, before)
  # The step takes no batch: the student cannot see real images.
  with pytest.raises(TypeError):
    step(state, tiny.digit_batches(32, 1)[0])


def test_batchnorm_loss_covers_every_layer_by_a_second_route():
  params, model_state = trained_teacher()
  images = jnp.asarray(tiny.digits()[0][:48])
  # Route 1: the interception used by the step, for K = 2 teachers (the
  # second with its statistics doubled), under every strategy.
  doubled = jax.tree.map(lambda s: 2.0 * s, model_state)
  results = []
  for strategy in ("vmap", "scan", "unroll"):
    group, variables = teachers.TeacherGroup.create(
        TEACHER, [params, params], [model_state, doubled], strategy=strategy)
    dfd = make_dfd(group)
    logits, feature, bn_loss, num_layers = jax.jit(
        dfd.teacher_forward)(variables, images)
    assert num_layers == 2
    assert logits.shape == (2, 48, 10) and feature.shape == (2, 48, 16)
    results.append(bn_loss)
  np.testing.assert_allclose(results[1], results[0], rtol=1e-5)
  np.testing.assert_allclose(results[2], results[0], rtol=1e-5)

  # Route 2: the BN inputs are the convolutions' outputs (captured as
  # intermediates), the statistics read from the state; float64 NumPy.
  def reference(stats):
    _, captured = TEACHER_MODULE.apply(
        {"params": params, **stats}, images, train=False,
        capture_intermediates=lambda mdl, _: isinstance(mdl, nn.Conv),
        mutable=["intermediates"])
    convs = captured["intermediates"]
    total = 0.0
    for index in range(2):
      x = np.asarray(convs[f"Conv_{index}"]["__call__"][0], np.float64)
      bn = stats["batch_stats"][f"BatchNorm_{index}"]
      mean = x.mean(axis=(0, 1, 2))
      var = ((x - mean) ** 2).mean(axis=(0, 1, 2))
      total += np.linalg.norm(mean - np.asarray(bn["mean"], np.float64))
      total += np.linalg.norm(var - np.asarray(bn["var"], np.float64))
    return total

  np.testing.assert_allclose(
      results[0], [reference(model_state), reference(doubled)], rtol=1e-5)


def test_errors():
  params, model_state = trained_teacher()
  group, variables = teachers.TeacherGroup.create(
      TEACHER, [params], [model_state])
  with pytest.raises(ValueError, match="`noise_dim`"):
    make_dfd(group, noise_dim=0)
  with pytest.raises(ValueError, match="`temperature`"):
    make_dfd(group, temperature=-1.0)
  with pytest.raises(ValueError, match="`entropy_weight`"):
    make_dfd(group, entropy_weight=-1.0)
  with pytest.raises(ValueError, match="shape"):
    make_dfd(group).init(jax.random.key(0), variables, (6, 6, 1))
  with pytest.raises(TypeError, match="TeacherVariables"):
    make_dfd(group).init(jax.random.key(0), params, (8, 8, 1))
  with pytest.raises(ValueError, match="activation_feature"):
    make_dfd(group, activation_feature="pooled").init(
        jax.random.key(0), variables, (8, 8, 1))
  # A teacher without BatchNorm: a clear error, unless the term is off.
  mlp = from_linen(tiny.TinyMLP(), name="mlp")
  mlp_params, _ = mlp.init(jax.random.key(0), jnp.zeros((2, 8, 8, 1)))
  mlp_group, mlp_variables = teachers.TeacherGroup.create(mlp, [mlp_params])
  with pytest.raises(ValueError, match="No BatchNorm layer"):
    make_dfd(mlp_group).init(jax.random.key(0), mlp_variables, (8, 8, 1))
  make_dfd(mlp_group, bn_weight=0.0).init(
      jax.random.key(0), mlp_variables, (8, 8, 1))
