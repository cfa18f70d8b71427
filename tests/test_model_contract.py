"""Tests of the model contract: ``from_linen`` and ``from_nnx``.

The same tiny CNN (3x3 conv, BatchNorm, ReLU, global mean, dropout, linear)
is written once in ``flax.nnx`` and once in ``flax.linen``; both wrapped models
must satisfy the contract, and, given the same weights, compute the same
logits and the same BatchNorm updates (a second route to the same numbers).
"""

from __future__ import annotations

import functools

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd.models import from_linen
from jaxkd.models import from_nnx
from jaxkd.models import Model
from tests import helpers

NUM_CLASSES = 5


class NnxNet(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.conv = nnx.Conv(3, 4, (3, 3), padding="SAME", rngs=rngs)
    self.bn = nnx.BatchNorm(4, momentum=0.9, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)
    self.head = nnx.Linear(4, NUM_CLASSES, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.bn(self.conv(x)))
    embedding = jnp.mean(h, axis=(1, 2))
    logits = self.head(self.dropout(embedding))
    return logits, {"stage1": h, "embedding": embedding}


class LinenNet(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool):
    h = nn.Conv(4, (3, 3), padding="SAME", name="conv")(x)
    h = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(h)
    h = nn.relu(h)
    embedding = jnp.mean(h, axis=(1, 2))
    y = nn.Dropout(0.5, deterministic=not train)(embedding)
    logits = nn.Dense(NUM_CLASSES, name="head")(y)
    return logits, {"stage1": h, "embedding": embedding}


def make_model(kind: str) -> Model:
  return from_nnx(NnxNet) if kind == "nnx" else from_linen(LinenNet())


def bn_stats(kind, state):
  """The BatchNorm running statistics as a plain dict of NumPy arrays."""
  stats = nnx.to_pure_dict(state)["bn"] if kind == "nnx" else (
      state["batch_stats"]["bn"]
  )
  return {k: np.asarray(v) for k, v in stats.items()}


@functools.cache
def setup(kind):
  model = make_model(kind)
  x = jnp.asarray(
      np.random.default_rng(0).standard_normal((3, 6, 6, 3), np.float32)
  )
  params, state = model.init(jax.random.key(0), x)
  return model, params, state, x


KINDS = ["linen", "nnx"]


@pytest.mark.parametrize("kind", KINDS)
def test_init_gives_params_and_state(kind):
  model, params, state, _ = setup(kind)
  assert isinstance(model, Model)
  leaves = jax.tree.leaves(params)
  assert leaves and all(p.dtype == jnp.float32 for p in leaves)
  stats = bn_stats(kind, state)
  np.testing.assert_array_equal(stats["mean"], np.zeros(4))
  np.testing.assert_array_equal(stats["var"], np.ones(4))


@pytest.mark.parametrize("kind", KINDS)
def test_train_updates_statistics_without_mutating_the_input(kind):
  model, params, state, x = setup(kind)
  before = bn_stats(kind, state)
  logits, features, new_state = model.apply(
      params, state, x, train=True, rng=jax.random.key(1)
  )
  assert logits.shape == (3, NUM_CLASSES)
  assert set(features) == {"stage1", "embedding"}
  after = bn_stats(kind, new_state)
  assert not np.allclose(after["mean"], before["mean"])
  assert not np.allclose(after["var"], before["var"])
  # The caller's state is untouched (nnx variables are copied, not shared).
  jax.tree.map(np.testing.assert_array_equal, bn_stats(kind, state), before)


@pytest.mark.parametrize("kind", KINDS)
def test_eval_keeps_state_and_is_deterministic(kind):
  model, params, state, x = setup(kind)
  a, _, new_state = model.apply(params, state, x, train=False,
                                rng=jax.random.key(1))
  b, _, _ = model.apply(params, state, x, train=False, rng=jax.random.key(2))
  c, _, _ = model.apply(params, state, x, train=False, rng=None)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a, c)
  jax.tree.map(
      np.testing.assert_array_equal, bn_stats(kind, new_state),
      bn_stats(kind, state),
  )


@pytest.mark.parametrize("kind", KINDS)
def test_dropout_follows_the_rng(kind):
  model, params, state, x = setup(kind)
  a, _, _ = model.apply(params, state, x, train=True, rng=jax.random.key(1))
  b, _, _ = model.apply(params, state, x, train=True, rng=jax.random.key(2))
  a2, _, _ = model.apply(params, state, x, train=True, rng=jax.random.key(1))
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(a, a2)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("train", [False, True])
def test_jit_matches_eager(kind, train):
  model, params, state, x = setup(kind)
  rng = jax.random.key(3)
  eager = model.apply(params, state, x, train=train, rng=rng)
  jitted = jax.jit(model.apply, static_argnames="train")(
      params, state, x, train=train, rng=rng
  )
  helpers.assert_close(jitted[0], eager[0], rtol=1e-6, atol=1e-6)
  helpers.assert_close(jitted[1], eager[1], rtol=1e-6, atol=1e-6)
  helpers.assert_close(
      bn_stats(kind, jitted[2]), bn_stats(kind, eager[2]), rtol=1e-6,
      atol=1e-6,
  )


@pytest.mark.parametrize("kind", KINDS)
def test_grad_wrt_params(kind):
  model, params, state, x = setup(kind)

  def loss(p):
    logits, _, new_state = model.apply(
        p, state, x, train=True, rng=jax.random.key(4)
    )
    return jnp.sum(logits**2), new_state

  grads, _ = jax.jit(jax.grad(loss, has_aux=True))(params)
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  leaves = jax.tree.leaves(grads)
  assert all(np.all(np.isfinite(g)) for g in leaves)
  assert all(np.any(np.asarray(g) != 0) for g in leaves)


def linen_variables_from_nnx(params, state):
  """The nnx weights and statistics in the linen model's variable layout."""
  return nnx.to_pure_dict(params), {
      "batch_stats": {"bn": nnx.to_pure_dict(state)["bn"]}
  }


def test_nnx_and_linen_agree_on_the_same_weights():
  nnx_model, params, state, x = setup("nnx")
  linen_model = make_model("linen")
  linen_params, linen_state = linen_variables_from_nnx(params, state)
  # Eval mode: identical networks, identical logits and features.
  a, fa, _ = nnx_model.apply(params, state, x, train=False)
  b, fb, _ = linen_model.apply(linen_params, linen_state, x, train=False)
  helpers.assert_close(a, b, rtol=1e-6, atol=1e-6)
  helpers.assert_close(fa, fb, rtol=1e-6, atol=1e-6)
  # Train mode: dropout streams differ between the frameworks, but the
  # BatchNorm update (before dropout) is the same.
  _, fa, sa = nnx_model.apply(params, state, x, train=True,
                              rng=jax.random.key(5))
  _, fb, sb = linen_model.apply(linen_params, linen_state, x, train=True,
                                rng=jax.random.key(5))
  helpers.assert_close(fa["stage1"], fb["stage1"], rtol=1e-6, atol=1e-6)
  helpers.assert_close(bn_stats("nnx", sa), bn_stats("linen", sb),
                       rtol=1e-6, atol=1e-6)


def test_linen_model_without_state():
  class Plain(nn.Module):

    @nn.compact
    def __call__(self, x, train):
      del train
      return nn.Dense(2)(x)

  model = from_linen(Plain(), name="plain")
  params, state = model.init(jax.random.key(0), jnp.ones((1, 3)))
  logits, features, new_state = model.apply(
      params, state, jnp.ones((1, 3)), train=True, rng=None
  )
  assert state == {} and new_state == {} and features == {}
  assert logits.shape == (1, 2)
  assert repr(model) == "Model('plain')"


def test_linen_module_without_a_train_argument():
  class Plain(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(x.reshape(x.shape[0], -1))

  model = from_linen(Plain())
  x = jnp.ones((2, 4, 4, 1))
  params, state = model.init(jax.random.key(0), x)
  assert state == {}
  for train in (False, True):
    logits, features, new_state = model.apply(params, state, x, train=train)
    assert logits.shape == (2, 3) and features == {} and new_state == {}
  with pytest.raises(TypeError, match="from_nnx"):
    from_linen(lambda x: x)


def test_registry_builds_imagenet_resnets_and_mlps_by_name():
  from jaxkd import models  # pylint: disable=g-import-not-at-top
  def count(name, shape, classes):
    params, _ = jax.eval_shape(models.create(name, num_classes=classes).init,
                               jax.random.key(0), jnp.zeros(shape))
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  # torchvision's counts with 1,000 classes.
  assert count("resnet18", (1, 224, 224, 3), 1000) == 11_689_512
  assert count("resnet34", (1, 224, 224, 3), 1000) == 21_797_672
  # 784-300-10 and 784-800-800-10, written out.
  assert count("mlp_300", (1, 28, 28, 1), 10) == 784 * 300 + 300 + 3010
  assert count("mlp_800_800", (1, 28, 28, 1), 10) == (
      784 * 800 + 800 + 800 * 800 + 800 + 8010)
  with pytest.raises(ValueError, match="mlp_<width>"):
    models.create("mlp_", num_classes=10)
