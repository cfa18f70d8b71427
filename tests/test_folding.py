"""BatchNorm folding of frozen teachers (jaxkd/folding.py)."""

from __future__ import annotations

import functools

import flax.linen as nn
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import folding
from jaxkd import models
from jaxkd import teachers
from tests import helpers

IMAGE = (2, 8, 8, 3)


def randomize_batchnorm(params, state, seed=0):
  """Non-trivial BatchNorm scale, bias and running statistics."""
  rng = np.random.default_rng(seed)

  def visit(tree, stats):
    for name, value in tree.items():
      if isinstance(value, dict):
        visit(value, stats.get(name, {}) if stats else {})
    if stats and "mean" in stats:
      n = stats["mean"].shape[0]
      stats["mean"] = jnp.asarray(rng.normal(0, 0.5, n), jnp.float32)
      stats["var"] = jnp.asarray(rng.uniform(0.3, 2.0, n), jnp.float32)
      if "scale" in tree:
        tree["scale"] = jnp.asarray(rng.uniform(0.5, 1.5, n), jnp.float32)
      if "bias" in tree:
        tree["bias"] = jnp.asarray(rng.normal(0, 0.2, n), jnp.float32)

  params = jax.tree.map(lambda x: x, params)
  state = jax.tree.map(lambda x: x, state)
  visit(params, state.get("batch_stats", {}))
  return params, state


@functools.lru_cache(maxsize=None)
def bundled(name: str, dtype=jnp.float32):
  model = models.create(name, num_classes=10, dtype=dtype)
  x = jax.random.normal(jax.random.key(1), IMAGE)
  params, state = model.init(jax.random.key(0), x)
  params, state = randomize_batchnorm(params, state)
  return model, params, state, x


def run(model, params, state, x):
  return jax.jit(
      lambda p, s, x: model.apply(p, s, x, train=False)[:2]
  )(params, state, x)


def assert_outputs_close(got, want, rtol):
  """Logits and every feature, relative to each array's largest value."""
  (got_logits, got_features), (want_logits, want_features) = got, want
  assert sorted(got_features) == sorted(want_features)
  pairs = [(got_logits, want_logits)] + [
      (got_features[k], want_features[k]) for k in want_features
  ]
  for a, b in pairs:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    scale = np.max(np.abs(b))
    assert scale > 0
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("name", ["resnet8", "resnet8x4"])
def test_folded_resnet_equals_the_original(name):
  model, params, state, x = bundled(name)
  folded, folded_params = folding.fold_batchnorm(
      model, params, state, sample_input=x
  )
  assert_outputs_close(
      run(folded, folded_params, {}, x), run(model, params, state, x), 1e-5
  )


def test_every_resnet_batchnorm_is_folded():
  model, params, state, x = bundled("resnet8")
  _, folded_params = folding.fold_batchnorm(model, params, state,
                                            sample_input=x)
  assert sorted(folded_params) == ["params"]  # No statistics left.
  p = folded_params["params"]
  assert "bn1" not in p and "conv1" in p
  assert sorted(p["conv1"]) == ["bias", "kernel"]
  assert sorted(p["layer2_0"]) == ["conv1", "conv2", "downsample_conv"]
  assert p["layer2_0"]["downsample_conv"]["bias"].shape == (32,)
  # The caller's trees are untouched.
  assert "bias" not in params["conv1"] and "bn1" in params


def test_folding_arithmetic_on_one_layer():
  model, params, state, x = bundled("resnet8")
  _, folded_params = folding.fold_batchnorm(model, params, state,
                                            sample_input=x)
  kernel = np.asarray(params["conv1"]["kernel"], np.float64)
  bn = params["bn1"]
  stats = state["batch_stats"]["bn1"]
  scale = np.asarray(bn["scale"], np.float64) / np.sqrt(
      np.asarray(stats["var"], np.float64) + 1e-5
  )
  want_kernel = kernel * scale
  want_bias = np.asarray(bn["bias"], np.float64) - np.asarray(
      stats["mean"], np.float64) * scale
  helpers.assert_close(folded_params["params"]["conv1"]["kernel"],
                       want_kernel, rtol=1e-6, atol=1e-7)
  helpers.assert_close(folded_params["params"]["conv1"]["bias"],
                       want_bias, rtol=1e-6, atol=1e-7)


def test_pre_activation_batchnorms_are_kept():
  # WRN blocks are BN-ReLU-conv: BatchNorms that read a residual sum stay,
  # with their statistics; the rest fold.
  model, params, state, x = bundled("wrn_16_1")
  folded, folded_params = folding.fold_batchnorm(model, params, state,
                                                 sample_input=x)
  kept = len(jax.tree.leaves(folded_params.get("batch_stats", {}))) // 2
  total = len(jax.tree.leaves(state["batch_stats"])) // 2
  assert 0 < kept < total
  assert_outputs_close(
      run(folded, folded_params, {}, x), run(model, params, state, x), 1e-5
  )


def test_bfloat16_teacher_folds_within_bfloat16_precision():
  model, params, state, x = bundled("resnet8", jnp.bfloat16)
  folded, folded_params = folding.fold_batchnorm(model, params, state,
                                                 sample_input=x)
  got = run(folded, folded_params, {}, x)
  assert got[0].dtype == jnp.float32  # Logits stay float32.
  assert got[1]["stage1"].dtype == jnp.bfloat16
  assert_outputs_close(got, run(model, params, state, x), 5e-2)


@pytest.mark.parametrize("strategy", ["vmap", "scan", "unroll"])
def test_folded_teacher_group_equals_the_original(strategy):
  model, params, state, x = bundled("resnet8")
  params2, state2 = randomize_batchnorm(params, state, seed=1)
  folded = [
      folding.fold_batchnorm(model, p, s, sample_input=x)
      for p, s in ((params, state), (params2, state2))
  ]
  group, variables = teachers.TeacherGroup.create(
      folded[0][0], [fp for _, fp in folded], None, strategy=strategy
  )
  ref_group, ref_variables = teachers.TeacherGroup.create(
      model, [params, params2], [state, state2], strategy="unroll"
  )
  apply = jax.jit(teachers.apply_teachers, static_argnums=0)
  got = apply(group, variables, x)
  want = apply(ref_group, ref_variables, x)
  assert got.logits.shape == (2, 2, 10)
  assert_outputs_close((got.logits, got.features),
                       (want.logits, want.features), 1e-5)


def test_folded_model_init_gives_folded_variables():
  model, params, state, x = bundled("resnet8")
  folded, folded_params = folding.fold_batchnorm(model, params, state,
                                                 sample_input=x)
  new_params, new_state = jax.eval_shape(folded.init, jax.random.key(3), x)
  assert new_state == {}
  assert jax.tree.structure(new_params) == jax.tree.structure(folded_params)


def test_a_model_wrapping_no_linen_module_is_rejected():
  bare = models.Model(init=None, apply=lambda *a, **k: None, name="bare")
  with pytest.raises(TypeError, match="`model` must be a flax.linen Module"):
    folding.fold_batchnorm(bare, {}, {})
  with pytest.raises(TypeError, match="got int"):
    folding.fold_batchnorm(3, {}, {})


def test_folded_model_is_inference_only():
  model, params, state, x = bundled("resnet8")
  folded, folded_params = folding.fold_batchnorm(model, params, state,
                                                 sample_input=x)
  with pytest.raises(ValueError, match="inference only"):
    folded.apply(folded_params, {}, x, train=True)
  with pytest.raises(ValueError, match="pass `state={}`"):
    folded.apply(folded_params, state, x, train=False)


def test_wrong_sample_input_is_reported():
  model, params, state, _ = bundled("resnet8")
  with pytest.raises(ValueError, match="pass `sample_input=`"):
    folding.fold_batchnorm(model, params, state,
                           sample_input=jnp.zeros((2, 8, 8)))


def test_check_catches_a_wrong_fold(monkeypatch):
  model, params, state, x = bundled("resnet8")
  real = folding._fold_variables  # pylint: disable=protected-access

  def broken(variables, pairs):
    out = real(variables, pairs)
    out["params"]["conv1"]["bias"] = out["params"]["conv1"]["bias"] + 1.0
    return out

  monkeypatch.setattr(folding, "_fold_variables", broken)
  with pytest.raises(ValueError, match="changed its"):
    folding.fold_batchnorm(model, params, state, sample_input=x)


# ---------------------------------------------------------------------------
# Small modules: what pairs and what does not.
# ---------------------------------------------------------------------------


class ConvBN(nn.Module):
  """conv(+bias)-BN; optionally the conv output is also returned."""

  use_bias: bool = False
  expose_conv: bool = False
  dense: bool = False

  @nn.compact
  def __call__(self, x, train):
    if self.dense:
      h = nn.Dense(4, use_bias=self.use_bias)(x.reshape(x.shape[0], -1))
    else:
      h = nn.Conv(4, (3, 3), use_bias=self.use_bias)(x)
    y = nn.BatchNorm(use_running_average=not train, epsilon=1e-3)(h)
    features = {"conv": h} if self.expose_conv else {}
    return jnp.sum(nn.relu(y), axis=tuple(range(1, y.ndim))), features


def small(module, seed=0):
  x = jax.random.normal(jax.random.key(seed), (2, 4, 4, 2))
  variables = module.init(jax.random.key(seed + 1), x, train=False)
  params, state = randomize_batchnorm(
      variables["params"], {"batch_stats": variables["batch_stats"]}, seed
  )
  return params, state, x


def test_conv_output_read_elsewhere_is_not_folded():
  module = ConvBN(expose_conv=True)
  params, state, x = small(module)
  folded, folded_params = folding.fold_batchnorm(module, params, state,
                                                 sample_input=x)
  assert "batch_stats" in folded_params  # Nothing folded.
  logits, features, _ = folded.apply(folded_params, {}, x, train=False)
  want = module.apply({"params": params, **state}, x, train=False)
  helpers.assert_close(logits, want[0], rtol=1e-6, atol=1e-6)
  helpers.assert_close(features["conv"], want[1]["conv"], rtol=1e-6,
                       atol=1e-6)


@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(
    seed=st.integers(0, 2**16),
    use_bias=st.booleans(),
    dense=st.booleans(),
)
def test_conv_or_dense_with_batchnorm_folds_exactly(seed, use_bias, dense):
  module = ConvBN(use_bias=use_bias, dense=dense)
  params, state, x = small(module, seed)
  if use_bias:
    layer = "Dense_0" if dense else "Conv_0"
    params[layer]["bias"] = jnp.asarray(
        np.random.default_rng(seed).normal(size=4), jnp.float32
    )
  folded, folded_params = folding.fold_batchnorm(module, params, state,
                                                 sample_input=x)
  assert sorted(folded_params) == ["params"]
  got, _, _ = folded.apply(folded_params, {}, x, train=False)
  want, _ = module.apply({"params": params, **state}, x, train=False)
  helpers.assert_close(got, want, rtol=1e-5, atol=1e-5)
