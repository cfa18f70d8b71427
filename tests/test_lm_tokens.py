"""Tests of the per-token reductions, next-token alignment and top-k targets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import lm
from tests import helpers


def np_log_softmax(z):
  z = np.asarray(z, np.float64)
  shifted = z - z.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


# ---------------------------------------------------------------------------
# token_mean, token_sum_and_count.
# ---------------------------------------------------------------------------


def test_token_mean_matches_numpy(x64, rng):
  values = rng.standard_normal((3, 7))
  mask = rng.random((3, 7)) > 0.3
  expected = values[mask].sum() / mask.sum()
  helpers.assert_close(lm.token_mean(values, mask), expected, rtol=1e-14)
  total, count = lm.token_sum_and_count(values, mask)
  helpers.assert_close(total, values[mask].sum(), rtol=1e-14)
  assert float(count) == mask.sum()
  helpers.assert_close(lm.token_mean(values), values.mean(), rtol=1e-14)


def test_token_mean_all_masked_is_zero_with_zero_grad():
  values = jnp.array([[1.0, jnp.nan], [jnp.inf, 2.0]])
  mask = jnp.zeros((2, 2), jnp.bool_)
  value, grad = jax.value_and_grad(lm.token_mean)(values, mask)
  assert float(value) == 0.0
  np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_token_mean_masked_nan_hidden_valid_nan_shown():
  values = jnp.array([1.0, jnp.nan, 3.0])
  value, grad = jax.value_and_grad(lm.token_mean)(
      values, jnp.array([True, False, True])
  )
  assert float(value) == 2.0
  np.testing.assert_array_equal(np.asarray(grad), [0.5, 0.0, 0.5])
  assert np.isnan(float(lm.token_mean(values)))


def test_token_mean_low_precision_computes_in_float32():
  values = jnp.array([1.0, 2.0, 4.0], jnp.bfloat16)
  assert lm.token_mean(values).dtype == jnp.float32
  total, count = lm.token_sum_and_count(values)
  assert total.dtype == count.dtype == jnp.float32


def _per_token_loss(w, x):
  # A per-token loss of a shared parameter: l_i = (w . x_i)^2 + sin(w . x_i).
  y = x @ w
  return y**2 + jnp.sin(y)


def test_micro_batch_sums_combine_to_the_unsplit_mean(x64, rng):
  w = rng.standard_normal(4)
  x = rng.standard_normal((12, 4))
  # Unequal valid-token counts per micro-batch: 4, 1 and 3 of 4 tokens each.
  mask = np.array([1, 1, 1, 1, 0, 0, 1, 0, 1, 1, 0, 1], bool)
  parts = [slice(0, 4), slice(4, 8), slice(8, 12)]

  def unsplit(w):
    return lm.token_mean(_per_token_loss(w, x), mask)

  def micro(w, part):
    return lm.token_sum_and_count(_per_token_loss(w, x[part]), mask[part])

  # Gradient accumulation: sum each part's (sum, count) and sum gradient,
  # divide once at the end.
  total = count = 0.0
  grad_total = np.zeros(4)
  for part in parts:
    (s, n), g = jax.value_and_grad(
        lambda w, p=part: micro(w, p), has_aux=True
    )(w)
    total, count = total + s, count + n
    grad_total = grad_total + g
  expected_value, expected_grad = jax.value_and_grad(unsplit)(w)
  helpers.assert_close(
      lm.mean_from_sum_and_count(total, count), expected_value, rtol=1e-13
  )
  helpers.assert_close(grad_total / count, expected_grad, rtol=1e-12)
  # The mean of per-part means weights tokens unequally: a different number.
  mean_of_means = np.mean(
      [lm.token_mean(_per_token_loss(w, x[p]), mask[p]) for p in parts]
  )
  assert abs(mean_of_means - float(expected_value)) > 1e-3


def test_token_mean_bad_mask():
  with pytest.raises(ValueError, match="`mask` must have shape"):
    lm.token_mean(jnp.zeros((2, 3)), jnp.ones((3, 2), bool))
  with pytest.raises(TypeError, match="`mask` must be a boolean"):
    lm.token_mean(jnp.zeros((2, 3)), jnp.ones((2, 3)))
  with pytest.raises(TypeError, match="`per_token`"):
    lm.token_mean(jnp.zeros((2, 3), jnp.int32))


# ---------------------------------------------------------------------------
# Next-token alignment.
# ---------------------------------------------------------------------------


def test_next_token_targets_by_hand():
  tokens = np.array([[11, 12, 13, 14, 15, 0], [21, 22, 23, 24, 25, 26]])
  mask = tokens > 0
  prompt = np.zeros_like(mask)
  prompt[0, :2] = True  # Prompt: 11 12; response: 13 14 15; then padding.
  prompt[1, :4] = True
  out = lm.next_token_targets(tokens, mask, prompt_mask=prompt)
  np.testing.assert_array_equal(out.inputs, tokens[:, :-1])
  np.testing.assert_array_equal(out.targets, tokens[:, 1:])
  # Row 0 scores predicting 13, 14, 15 (from 12, 13, 14); not 12 (prompt)
  # nor the padding. Row 1 scores 25, 26.
  np.testing.assert_array_equal(
      out.mask,
      [[False, True, True, True, False], [False, False, False, True, True]],
  )


def test_next_token_targets_defaults_and_leading_dims():
  tokens = jnp.arange(24).reshape(2, 3, 4)
  out = lm.next_token_targets(tokens)
  assert out.mask.shape == (2, 3, 3) and bool(out.mask.all())
  np.testing.assert_array_equal(out.targets, np.arange(24).reshape(2, 3, 4)[..., 1:])
  jitted = jax.jit(lm.next_token_targets)(tokens, tokens % 5 > 0)
  eager = lm.next_token_targets(tokens, tokens % 5 > 0)
  for a, b in zip(jitted, eager):
    np.testing.assert_array_equal(a, b)


def test_next_token_targets_errors():
  tokens = jnp.zeros((2, 5), jnp.int32)
  with pytest.raises(TypeError, match="`tokens` must be an integer"):
    lm.next_token_targets(jnp.zeros((2, 5)))
  with pytest.raises(ValueError, match="at least 2 positions"):
    lm.next_token_targets(jnp.zeros((2, 1), jnp.int32))
  with pytest.raises(ValueError, match=r"`mask` must have shape \(2, 5\)"):
    lm.next_token_targets(tokens, jnp.ones((2, 4), bool))
  with pytest.raises(ValueError, match="`prompt_mask` must have shape"):
    lm.next_token_targets(tokens, prompt_mask=jnp.ones((5,), bool))
  with pytest.raises(TypeError, match="`prompt_mask` must be a boolean"):
    lm.next_token_targets(tokens, prompt_mask=jnp.ones((2, 5), jnp.int32))


def test_next_token_logits_lines_up_with_targets():
  tokens = jnp.arange(10).reshape(2, 5)
  targets = lm.next_token_targets(tokens).targets
  logits = jnp.arange(2 * 5 * 3.0).reshape(2, 5, 3)
  shifted = lm.next_token_logits(logits, targets=targets)
  np.testing.assert_array_equal(shifted, np.asarray(logits)[:, :-1])
  with pytest.raises(ValueError, match="`targets` has shape"):
    lm.next_token_logits(logits[:, :-1], targets=targets)
  with pytest.raises(ValueError, match="`outputs` must have at least 2"):
    lm.next_token_logits(jnp.zeros(5))


# ---------------------------------------------------------------------------
# top_k_log_probs.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_top_k_log_probs_matches_numpy(x64, rng, temperature):
  logits = 4 * rng.standard_normal((3, 4, 17))
  log_probs, ids = lm.top_k_log_probs(logits, 5, temperature=temperature)
  assert ids.dtype == jnp.int32 and log_probs.shape == ids.shape == (3, 4, 5)
  reference = np_log_softmax(logits / temperature)
  expected_ids = np.argsort(-reference, axis=-1, kind="stable")[..., :5]
  np.testing.assert_array_equal(ids, expected_ids)
  helpers.assert_close(
      log_probs, np.take_along_axis(reference, expected_ids, -1), rtol=1e-13
  )


def test_top_k_log_probs_full_vocab_ties_and_dtype():
  logits = jnp.array([1.0, 3.0, 3.0, -2.0], jnp.bfloat16)
  log_probs, ids = lm.top_k_log_probs(logits, 4)
  assert log_probs.dtype == jnp.float32
  np.testing.assert_array_equal(ids, [1, 2, 0, 3])  # Ties: lower id first.
  np.testing.assert_allclose(
      float(jax.nn.logsumexp(log_probs)), 0.0, atol=1e-6
  )
  jitted = jax.jit(lambda z: lm.top_k_log_probs(z, 2, temperature=2.0))
  helpers.assert_close(
      jitted(logits), lm.top_k_log_probs(logits, 2, temperature=2.0),
      rtol=1e-6,
  )


def test_top_k_log_probs_errors():
  logits = jnp.zeros((2, 6))
  with pytest.raises(ValueError, match="`k`=7 exceeds the vocabulary size 6"):
    lm.top_k_log_probs(logits, 7)
  with pytest.raises(ValueError, match="`k` must be >= 1"):
    lm.top_k_log_probs(logits, 0)
  with pytest.raises(TypeError, match="`k` must be a Python int"):
    lm.top_k_log_probs(logits, 2.0)
  with pytest.raises(ValueError, match="`temperature` must be a finite number > 0"):
    lm.top_k_log_probs(logits, 2, temperature=0.0)
  with pytest.raises(TypeError, match="`teacher_logits`"):
    lm.top_k_log_probs(jnp.zeros((2, 6), jnp.int32), 2)


def test_top_k_log_probs_traced_bad_temperature_is_nan():
  log_probs, _ = jax.jit(
      lambda t: lm.top_k_log_probs(jnp.zeros(4), 2, temperature=t)
  )(-1.0)
  assert np.all(np.isnan(np.asarray(log_probs)))
