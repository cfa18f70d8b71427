"""Tests of the jitted sampler against manual decoding loops."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import models
from jaxkd.lm import _sampling

VOCAB = 13
PROMPT = np.array([[1, 2, 3, 4], [5, 6, 0, 0], [7, 0, 0, 0]], np.int32)
LENGTHS = np.array([4, 2, 1], np.int32)
NEW = 5


@functools.cache
def tiny_lm():
  model = models.from_linen(
      models.TransformerLM(
          vocab_size=VOCAB, num_layers=2, hidden_size=16, num_heads=2
      ),
      name="tiny_lm",
  )
  params, state = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  # Larger logits than at initialisation make the argmax well separated.
  params = jax.tree.map(lambda p: 4.0 * p, params)
  return model, params, state


@jax.jit
def forward(params, state, tokens):
  """The tiny LM's logits (a separate jit from the sampler's)."""
  return tiny_lm()[0].apply(params, state, tokens, train=False)[0]


def run_sample(**kwargs):
  model, params, state = tiny_lm()
  options = dict(key=jax.random.key(3), max_new_tokens=NEW)
  options.update(kwargs)
  prompt = options.pop("prompt", PROMPT)
  lengths = options.pop("lengths", LENGTHS)
  tokens, mask = _sampling.sample(
      model, params, state, jnp.asarray(prompt), jnp.asarray(lengths),
      **options,
  )
  return np.asarray(tokens), np.asarray(mask)


def manual_greedy(row, length, steps, eos_id=None):
  """One row decoded by a Python loop of forward passes.

  The sequence is right-padded to one fixed length so that the forward pass
  compiles once; the model is causal (tested in test_transformer.py), so the
  padding never reaches the logits read at the last real token.
  """
  _, params, state = tiny_lm()
  tokens = list(PROMPT[row, :length])
  for _ in range(steps):
    buffer = np.zeros((1, PROMPT.shape[1] + NEW), np.int32)
    buffer[0, : len(tokens)] = tokens
    logits = np.asarray(forward(params, state, jnp.asarray(buffer)))
    tokens.append(int(np.argmax(logits[0, len(tokens) - 1])))
    if tokens[-1] == eos_id:
      break
  return tokens


def expected_layout(rows, pad_id=0):
  """``(tokens, mask)`` arrays from per-row lists of real tokens."""
  tokens = np.full((len(rows), PROMPT.shape[1] + NEW), pad_id, np.int32)
  mask = np.zeros(tokens.shape, bool)
  for b, row in enumerate(rows):
    tokens[b, : len(row)] = row
    mask[b, : len(row)] = True
  return tokens, mask


def test_greedy_equals_a_manual_argmax_loop():
  tokens, mask = run_sample(temperature=0.0)
  rows = [manual_greedy(b, LENGTHS[b], NEW) for b in range(3)]
  expected_tokens, expected_mask = expected_layout(rows)
  np.testing.assert_array_equal(tokens, expected_tokens)
  np.testing.assert_array_equal(mask, expected_mask)
  # The decoded continuations differ between rows (the test can fail).
  assert len({tuple(r[-NEW:]) for r in rows}) > 1


def test_top_k_one_equals_greedy():
  greedy = run_sample(temperature=0.0)
  for got, want in zip(run_sample(temperature=1.0, top_k=1), greedy):
    np.testing.assert_array_equal(got, want)


def test_under_jit_traced_zero_temperature_is_greedy_and_bad_lengths_mask():
  model, params, state = tiny_lm()
  fn = jax.jit(
      lambda p, lengths, t, key: _sampling.sample(
          model, p, state, jnp.asarray(PROMPT), lengths,
          key=key, max_new_tokens=NEW, temperature=t, top_p=0.9, pad_id=11,
      )
  )
  greedy = run_sample(temperature=0.0, pad_id=11)
  tokens, mask = fn(params, jnp.asarray(LENGTHS), 0.0, jax.random.key(9))
  np.testing.assert_array_equal(tokens, greedy[0])
  np.testing.assert_array_equal(mask, greedy[1])
  # The same compiled function samples at a traced temperature > 0, as the
  # eager call does (same options and key).
  tokens, mask = fn(params, jnp.asarray(LENGTHS), 1.5, jax.random.key(9))
  eager = run_sample(temperature=1.5, top_p=0.9, pad_id=11,
                     key=jax.random.key(9))
  np.testing.assert_array_equal(tokens, eager[0])
  np.testing.assert_array_equal(mask, eager[1])
  # A traced length outside [1, prompt_len] masks its whole row.
  tokens, mask = fn(
      params, jnp.asarray([4, 0, 7], jnp.int32), 0.0, jax.random.key(9)
  )
  np.testing.assert_array_equal(tokens[0], greedy[0][0])
  assert not mask[1:].any() and np.all(tokens[1:] == 11)


def test_sampled_tokens_lie_in_the_filtered_set():
  model, params, state = tiny_lm()
  tokens, mask = run_sample(temperature=2.0, top_k=3, key=jax.random.key(5))
  # One causal forward pass over the output scores every generated token.
  logits = np.asarray(forward(params, state, jnp.asarray(tokens)))
  for b in range(3):
    for position in range(LENGTHS[b], LENGTHS[b] + NEW):
      top3 = np.argsort(-logits[b, position - 1])[:3]
      assert tokens[b, position] in top3
  assert mask.sum() == LENGTHS.sum() + 3 * NEW


def test_same_key_same_tokens_other_key_other_tokens():
  a = run_sample(temperature=3.0, key=jax.random.key(1))
  b = run_sample(temperature=3.0, key=jax.random.key(1))
  c = run_sample(temperature=3.0, key=jax.random.key(2))
  np.testing.assert_array_equal(a[0], b[0])
  assert np.any(a[0] != c[0])


def test_eos_stops_a_row_and_pads_after_it():
  plain, _ = run_sample(temperature=0.0)
  eos_id = int(plain[0, LENGTHS[0] + 1])  # Row 0's second new token.
  tokens, mask = run_sample(temperature=0.0, eos_id=eos_id, pad_id=12)
  rows = [manual_greedy(b, LENGTHS[b], NEW, eos_id=eos_id) for b in range(3)]
  expected_tokens, expected_mask = expected_layout(rows, pad_id=12)
  np.testing.assert_array_equal(tokens, expected_tokens)
  np.testing.assert_array_equal(mask, expected_mask)
  assert len(rows[0]) == LENGTHS[0] + 2 and rows[0][-1] == eos_id


def test_prompt_mask_equals_lengths_and_prompt_padding_is_ignored():
  by_lengths = run_sample(temperature=1.0)
  prefix_mask = np.arange(4)[None] < LENGTHS[:, None]
  other_padding = np.where(prefix_mask, PROMPT, 9)
  by_mask = run_sample(temperature=1.0, prompt=other_padding,
                       lengths=prefix_mask)
  for got, want in zip(by_mask, by_lengths):
    np.testing.assert_array_equal(got, want)


def test_zero_new_tokens_returns_the_prompt():
  tokens, mask = run_sample(max_new_tokens=0, pad_id=10)
  np.testing.assert_array_equal(mask, np.arange(4)[None] < LENGTHS[:, None])
  np.testing.assert_array_equal(tokens, np.where(mask, PROMPT, 10))


def np_top_p_keep(logits, p):
  """Float64 reference: the smallest most-likely set with mass >= p."""
  z = np.asarray(logits, np.float64)
  probs = np.exp(z - z.max())
  probs /= probs.sum()
  order = np.argsort(-probs, kind="stable")
  cumulative = np.cumsum(probs[order])
  size = int(np.searchsorted(cumulative, p)) + 1  # first index with cum >= p
  keep = np.zeros(z.shape, bool)
  keep[order[:size]] = True
  return keep, cumulative


def test_top_p_filter_matches_numpy(rng):
  logits = rng.standard_normal((40, 9)) * 2.0
  checked = 0
  for p in (0.05, 0.3, 0.6, 0.9, 0.99, 1.0):
    filtered = np.asarray(
        _sampling.top_p_filter(jnp.asarray(logits, jnp.float32), p)
    )
    for row in range(logits.shape[0]):
      keep, cumulative = np_top_p_keep(logits[row], p)
      if p < 1 and np.min(np.abs(cumulative - p)) < 1e-5:
        continue  # Too close to a boundary for float32.
      np.testing.assert_array_equal(np.isfinite(filtered[row]), keep)
      np.testing.assert_array_equal(
          filtered[row][keep], logits[row][keep].astype(np.float32)
      )
      checked += 1
  assert checked > 200


def test_top_p_filter_hand_example():
  logits = jnp.log(jnp.asarray([0.1, 0.5, 0.05, 0.35]))
  kept = lambda p: np.isfinite(  # noqa: E731
      np.asarray(_sampling.top_p_filter(logits, p))
  )
  np.testing.assert_array_equal(kept(0.4), [False, True, False, False])
  np.testing.assert_array_equal(kept(0.7), [False, True, False, True])
  np.testing.assert_array_equal(kept(0.9), [True, True, False, True])
  np.testing.assert_array_equal(kept(1.0), [True, True, True, True])


def test_top_k_filter_matches_numpy(rng):
  logits = rng.standard_normal((6, 10)).astype(np.float32)
  filtered = np.asarray(_sampling.top_k_filter(jnp.asarray(logits), 3))
  for row in range(6):
    keep = np.zeros(10, bool)
    keep[np.argsort(-logits[row])[:3]] = True
    np.testing.assert_array_equal(np.isfinite(filtered[row]), keep)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=VOCAB + 1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(eos_id=-2), "eos_id"),
        (dict(prompt=PROMPT.astype(np.float32)), "prompt_tokens"),
        (dict(lengths=np.array([4, 2], np.int32)), "prompt_lengths"),
        (dict(lengths=np.array([4, 5, 1], np.int32)), "prompt_lengths"),
        (dict(lengths=np.array([4, 0, 1], np.int32)), "prompt_lengths"),
        (dict(lengths=np.array([[True, False, True, False]] * 3)), "prefix"),
    ],
)
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    run_sample(**kwargs)


def test_a_non_integer_count_is_a_type_error():
  with pytest.raises(TypeError, match="`max_new_tokens` must be a Python int"):
    run_sample(max_new_tokens=2.0)


def test_model_must_be_callable():
  with pytest.raises(TypeError, match="model"):
    _sampling.sample(
        object(), {}, {}, jnp.asarray(PROMPT), jnp.asarray(LENGTHS),
        key=jax.random.key(0), max_new_tokens=1,
    )
