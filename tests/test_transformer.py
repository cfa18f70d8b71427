"""Tests of the decoder-only transformer LM against independent routes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import models
from jaxkd.models import _transformer
from tests import helpers

TINY = dict(vocab_size=11, num_layers=2, hidden_size=16, num_heads=4)


def count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def expected_param_count(
    *, vocab, layers, width, heads, kv_heads, mlp_dim, mlp, tied
):
  """Embedding, per block (2 norms, q/k/v/out, MLP), final norm, head."""
  head_dim = width // heads
  attention = width * heads * head_dim * 2 + 2 * width * kv_heads * head_dim
  mlp_params = (3 if mlp == "swiglu" else 2) * width * mlp_dim
  block = 2 * width + attention + mlp_params
  return vocab * width + layers * block + width + (0 if tied else width * vocab)


def tokens_for(rng, shape, vocab=TINY["vocab_size"]):
  return jnp.asarray(rng.integers(0, vocab, shape), jnp.int32)


@functools.cache
def tiny_model(**overrides):
  module = _transformer.TransformerLM(**{**TINY, **overrides})
  x = jnp.zeros((2, 7), jnp.int32)
  params = module.init(jax.random.key(0), x)["params"]
  return module, params


def run(module, params, x):
  return module.apply({"params": params}, x)


def test_rmsnorm_matches_numpy(rng):
  x = rng.standard_normal((3, 5, 8)).astype(np.float32)
  scale = rng.standard_normal(8).astype(np.float32)
  norm = _transformer.RMSNorm(epsilon=1e-5)
  y = norm.apply({"params": {"scale": jnp.asarray(scale)}}, jnp.asarray(x))
  x64 = x.astype(np.float64)
  expected = x64 / np.sqrt(np.mean(x64**2, -1, keepdims=True) + 1e-5) * scale
  helpers.assert_close(y, expected, rtol=1e-5, atol=1e-6)
  assert y.dtype == jnp.float32
  y16 = _transformer.RMSNorm(epsilon=1e-5, dtype=jnp.bfloat16).apply(
      {"params": {"scale": jnp.asarray(scale)}}, jnp.asarray(x, jnp.bfloat16)
  )
  assert y16.dtype == jnp.bfloat16


def test_rope_matches_complex_rotation(rng):
  x = rng.standard_normal((2, 5, 3, 8)).astype(np.float32)
  positions = rng.integers(0, 50, (2, 5))
  y = _transformer.apply_rope(jnp.asarray(x), jnp.asarray(positions), base=100.0)
  # Second route: pair i is the complex number x_i + i x_{i+4}, multiplied by
  # exp(i p theta_i) with theta_i = base^(-i / 4).
  theta = 100.0 ** (-np.arange(4) / 4)
  z = x[..., :4].astype(np.float64) + 1j * x[..., 4:]
  z = z * np.exp(1j * positions[:, :, None, None] * theta)
  helpers.assert_close(
      y, np.concatenate([z.real, z.imag], -1), rtol=1e-5, atol=1e-5
  )


def test_rope_scores_depend_only_on_relative_offsets(rng):
  q = jnp.asarray(rng.standard_normal((1, 6, 2, 8)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((1, 6, 2, 8)), jnp.float32)
  positions = jnp.asarray(rng.integers(0, 20, (1, 6)))

  def scores(shift):
    rq = _transformer.apply_rope(q, positions + shift)
    rk = _transformer.apply_rope(k, positions + shift)
    return jnp.einsum("bqhd,bkhd->bhqk", rq, rk)

  base = scores(0)
  helpers.assert_close(scores(37), base, rtol=1e-4, atol=1e-4)
  # ...but the scores do depend on the offsets themselves.
  shifted_keys = jnp.einsum(
      "bqhd,bkhd->bhqk",
      _transformer.apply_rope(q, positions),
      _transformer.apply_rope(k, positions + 3),
  )
  assert np.max(np.abs(np.asarray(shifted_keys - base))) > 1e-2


def test_model_is_invariant_to_a_position_shift(rng):
  module, params = tiny_model(return_attention=True)
  tokens = tokens_for(rng, (2, 7))
  positions = jnp.broadcast_to(jnp.arange(7), (2, 7))
  logits, features = run(module, params, {"tokens": tokens})
  shifted_logits, shifted = run(
      module, params, {"tokens": tokens, "positions": positions + 13}
  )
  helpers.assert_close(shifted_logits, logits, rtol=1e-4, atol=1e-5)
  for i in range(2):
    a, b = features[f"attention_logits_{i}"], shifted[f"attention_logits_{i}"]
    finite = np.isfinite(np.asarray(a))
    np.testing.assert_array_equal(finite, np.isfinite(np.asarray(b)))
    helpers.assert_close(
        np.asarray(b)[finite], np.asarray(a)[finite], rtol=1e-4, atol=1e-5
    )


def test_causality(rng):
  module, params = tiny_model()
  tokens = tokens_for(rng, (2, 7))
  changed = tokens.at[:, 4].set((tokens[:, 4] + 1) % TINY["vocab_size"])
  before, _ = run(module, params, tokens)
  after, _ = run(module, params, changed)
  helpers.assert_close(after[:, :4], before[:, :4], rtol=1e-6, atol=1e-6)
  assert np.all(np.max(np.abs(np.asarray(after - before)[:, 4:]), -1) > 0)


def test_attention_is_causal_and_normalised(rng):
  module, params = tiny_model(return_attention=True)
  _, features = run(module, params, tokens_for(rng, (2, 7)))
  for i in range(2):
    probs = np.asarray(features[f"attention_{i}"])
    assert probs.shape == (2, 4, 7, 7) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
    upper = np.triu(np.ones((7, 7), bool), 1)
    np.testing.assert_array_equal(probs[..., upper], 0.0)
    scores = np.asarray(features[f"attention_logits_{i}"], np.float64)
    assert np.all(np.isneginf(scores[..., upper]))
    softmax = np.exp(scores - scores.max(-1, keepdims=True))
    helpers.assert_close(
        probs, softmax / softmax.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7
    )


def test_left_padding_with_mask_equals_the_unpadded_sequence(rng):
  module, params = tiny_model(return_attention=True)
  tokens = tokens_for(rng, (1, 5))
  pad = 2
  padded = jnp.concatenate([jnp.full((1, pad), 3, jnp.int32), tokens], 1)
  mask = jnp.arange(7)[None] >= pad
  logits, _ = run(module, params, tokens)
  padded_logits, features = run(module, params, {"tokens": padded, "mask": mask})
  helpers.assert_close(padded_logits[:, pad:], logits, rtol=1e-5, atol=1e-5)
  # The pad tokens' values do not matter either, and get no attention.
  other = padded.at[:, :pad].set(9)
  other_logits, _ = run(module, params, {"tokens": other, "mask": mask})
  helpers.assert_close(
      other_logits[:, pad:], padded_logits[:, pad:], rtol=1e-6, atol=1e-6
  )
  probs = np.asarray(features["attention_0"])
  np.testing.assert_array_equal(probs[:, :, pad:, :pad], 0.0)
  # Without the mask the pad tokens are attended to and change the logits.
  unmasked, _ = run(module, params, padded)
  assert np.max(np.abs(np.asarray(unmasked[:, pad:] - logits))) > 1e-4
  # A padded query attends to itself only: its row stays finite.
  assert np.all(np.isfinite(np.asarray(padded_logits)))
  np.testing.assert_allclose(probs[:, :, 0, 0], 1.0)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_embeddings": False},
        {"mlp": "gelu", "mlp_dim": 24},
        {"num_kv_heads": 2, "num_layers": 3},
        {"num_kv_heads": 1, "tie_embeddings": False, "mlp": "gelu"},
    ],
)
def test_parameter_count_formula(overrides):
  module = _transformer.TransformerLM(**{**TINY, **overrides})
  variables = jax.eval_shape(
      module.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32)
  )
  assert set(variables) == {"params"}
  cfg = {**TINY, **overrides}
  assert count(variables["params"]) == expected_param_count(
      vocab=cfg["vocab_size"], layers=cfg["num_layers"],
      width=cfg["hidden_size"], heads=cfg["num_heads"],
      kv_heads=cfg.get("num_kv_heads") or cfg["num_heads"],
      mlp_dim=cfg.get("mlp_dim") or 4 * cfg["hidden_size"],
      mlp=cfg.get("mlp", "swiglu"), tied=cfg.get("tie_embeddings", True),
  )


@pytest.mark.parametrize("tied", [True, False])
def test_logits_are_final_hidden_times_output_kernel(rng, tied):
  module, params = tiny_model(tie_embeddings=tied)
  assert ("head" in params) != tied
  kernel = _transformer.output_kernel(params)
  assert kernel.shape == (TINY["hidden_size"], TINY["vocab_size"])
  if tied:
    np.testing.assert_array_equal(kernel, params["embed"]["embedding"].T)
  else:
    np.testing.assert_array_equal(kernel, params["head"]["kernel"])
  logits, features = run(module, params, tokens_for(rng, (2, 7)))
  expected = np.asarray(features["final_hidden"], np.float64) @ np.asarray(
      kernel, np.float64
  )
  helpers.assert_close(logits, expected, rtol=1e-5, atol=1e-6)
  assert models.lm_output_kernel is _transformer.output_kernel


def test_grouped_query_attention_equals_mha_with_repeated_kv(rng):
  gqa, params = tiny_model(num_kv_heads=2)
  mha = _transformer.TransformerLM(**TINY)

  def repeat_kv(path, leaf):
    names = [getattr(p, "key", None) for p in path]
    if names[-2] in ("key", "value"):  # kernel [width, kv_heads, head_dim]
      return jnp.repeat(leaf, 2, axis=1)
    return leaf

  mha_params = jax.tree_util.tree_map_with_path(repeat_kv, params)
  tokens = tokens_for(rng, (2, 7))
  helpers.assert_close(
      run(mha, mha_params, tokens)[0], run(gqa, params, tokens)[0],
      rtol=1e-5, atol=1e-6,
  )


@pytest.mark.parametrize(
    "name, layers, width, mlp_dim", [("lm_student", 2, 64, 256),
                                     ("lm_teacher", 4, 128, 512)]
)
def test_registry_sizes_shapes_and_dtypes(name, layers, width, mlp_dim):
  assert name in models.available()
  model = models.create(name, num_classes=256, dtype=jnp.bfloat16)
  assert model.name == name
  x = jnp.zeros((2, 9), jnp.int32)

  def init_and_apply(key):
    params, state = model.init(key, x)
    logits, features, new_state = model.apply(
        params, state, x, train=True, rng=key
    )
    return params, state, logits, features, new_state

  params, state, logits, features, new_state = jax.eval_shape(
      init_and_apply, jax.random.key(0)
  )
  assert count(params) == expected_param_count(
      vocab=256, layers=layers, width=width, heads=4, kv_heads=4,
      mlp_dim=mlp_dim, mlp="swiglu", tied=True,
  )
  assert state == {} and new_state == {}
  assert logits.shape == (2, 9, 256) and logits.dtype == jnp.float32
  expected = {"embedding", "final_hidden"} | {
      f"block_{i}" for i in range(layers)
  }
  assert set(features) == expected
  assert all(f.shape == (2, 9, width) for f in features.values())
  assert all(f.dtype == jnp.bfloat16 for f in features.values())
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))


def test_contract_jit_and_mask_input(rng):
  model = models.from_linen(
      _transformer.TransformerLM(**TINY, dropout_rate=0.5), name="tiny_lm"
  )
  tokens = tokens_for(rng, (2, 7))
  x = {"tokens": tokens, "mask": jnp.ones((2, 7), jnp.bool_)}
  params, state = model.init(jax.random.key(0), x)
  eager = model.apply(params, state, x, train=False)
  jitted = jax.jit(lambda p, x: model.apply(p, state, x, train=False))(
      params, x
  )
  helpers.assert_close(jitted[:2], eager[:2], rtol=1e-5, atol=1e-6)
  # An all-True mask is no mask at all.
  helpers.assert_close(
      model.apply(params, state, tokens, train=False)[0], eager[0],
      rtol=1e-6, atol=1e-6,
  )
  # Dropout acts in training only, driven by `rng`.
  key = jax.random.key(1)
  train_a = model.apply(params, state, x, train=True, rng=key)[0]
  train_b = model.apply(params, state, x, train=True, rng=key)[0]
  np.testing.assert_array_equal(train_a, train_b)
  assert np.max(np.abs(np.asarray(train_a - eager[0]))) > 1e-4


@pytest.mark.parametrize(
    "overrides, x, match",
    [
        ({}, jnp.zeros((2, 3)), "integer tokens"),
        ({}, jnp.zeros((6,), jnp.int32), "integer tokens"),
        ({}, {"tokens": jnp.zeros((2, 3), jnp.int32),
              "mask": jnp.ones((2, 4), jnp.bool_)}, "mask"),
        ({}, {"tokens": jnp.zeros((2, 3), jnp.int32),
              "mask": jnp.ones((2, 3))}, "mask"),
        ({}, {"tokens": jnp.zeros((2, 3), jnp.int32),
              "positions": jnp.zeros((2, 3))}, "positions"),
        ({}, {"inputs": jnp.zeros((2, 3), jnp.int32)}, "tokens"),
        ({"num_heads": 3}, jnp.zeros((1, 3), jnp.int32), "num_heads"),
        ({"hidden_size": 12, "num_heads": 4}, jnp.zeros((1, 3), jnp.int32),
         "even"),
        ({"num_kv_heads": 3}, jnp.zeros((1, 3), jnp.int32), "num_kv_heads"),
        ({"mlp": "relu"}, jnp.zeros((1, 3), jnp.int32), "mlp"),
        ({"dropout_rate": 1.0}, jnp.zeros((1, 3), jnp.int32), "dropout_rate"),
    ],
)
def test_bad_arguments(overrides, x, match):
  module = _transformer.TransformerLM(**{**TINY, **overrides})
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(module.init, jax.random.key(0), x)
