"""Tests of the transformer feature losses against float64 NumPy formulas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxkd import losses
from tests import helpers


# Independent float64 references, written from the formulas.
def np_hidden(student, teacher, mask=None, kind="mse"):
  s = np.asarray(student, np.float64).reshape(-1, student.shape[-1])
  t = np.asarray(teacher, np.float64).reshape(-1, teacher.shape[-1])
  keep = np.ones(len(s), bool) if mask is None else np.asarray(mask).ravel()
  s, t = s[keep], t[keep]
  if not len(s):
    return 0.0
  if kind == "mse":
    return np.sum((s - t) ** 2) / (len(s) * s.shape[-1])
  cos = np.sum(s * t, -1) / (np.linalg.norm(s, axis=-1) *
                             np.linalg.norm(t, axis=-1))
  return np.mean(1 - cos)


def np_attention_kl(student, teacher, mask=None, causal=True):
  """Row by row: softmax over the allowed keys only, KL(teacher || student)."""
  s = np.asarray(student, np.float64)
  t = np.asarray(teacher, np.float64)
  batch, heads, length, _ = s.shape
  mask = np.ones((batch, length), bool) if mask is None else np.asarray(mask)
  total, rows = 0.0, 0
  for b in range(batch):
    for q in range(length):
      if not mask[b, q]:
        continue
      rows += 1
      keys = [k for k in range(length)
              if (k <= q or not causal) and (mask[b, k] or k == q)]
      for h in range(heads):
        ls = s[b, h, q, keys] - np.logaddexp.reduce(s[b, h, q, keys])
        lt = t[b, h, q, keys] - np.logaddexp.reduce(t[b, h, q, keys])
        total += np.sum(np.exp(lt) * (lt - ls))
  return total / (heads * rows) if rows else 0.0


def pair(rng, shape, scale=1.0, dtype=np.float64):
  return tuple((scale * rng.standard_normal(shape)).astype(dtype)
               for _ in range(2))


def random_mask(rng, shape):
  mask = rng.random(shape) < 0.7
  mask[..., 0] = True
  return mask


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_state_matches_float64_reference(x64, rng, kind):
  s, t = pair(rng, (3, 5, 4))
  mask = random_mask(rng, (3, 5))
  for m in (None, mask):
    actual = losses.hidden_state_loss(s, t, mask=m, kind=kind)
    assert actual.shape == () and actual.dtype == jnp.float64
    helpers.assert_close(actual, np_hidden(s, t, m, kind), rtol=1e-12)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_state_mask_equals_slicing_and_broadcasts(rng, kind):
  s, t = pair(rng, (3, 5, 4), dtype=np.float32)
  mask = random_mask(rng, (3, 5))
  masked = losses.hidden_state_loss(s, t, mask=jnp.asarray(mask), kind=kind)
  sliced = losses.hidden_state_loss(s[mask], t[mask], kind=kind)
  helpers.assert_close(masked, sliced, rtol=1e-6)
  # A [length] mask broadcasts over the batch.
  helpers.assert_close(
      losses.hidden_state_loss(s, t, mask=jnp.asarray(mask[0]), kind=kind),
      losses.hidden_state_loss(s[:, mask[0]], t[:, mask[0]], kind=kind),
      rtol=1e-6,
  )


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_state_grads_jit_and_masked_nan(x64, rng, kind):
  s, t = pair(rng, (2, 3, 4))
  mask = jnp.asarray([[True, False, True], [True, True, False]])
  fn = lambda s, t: losses.hidden_state_loss(  # noqa: E731
      s, t, mask=mask, kind=kind
  )
  check_grads(jax.jit(fn), (s, t), order=2, modes=["rev"])
  helpers.assert_jit_matches_eager(fn, s, t)
  # Whatever a masked token holds reaches neither the value nor the gradient.
  s_nan = s.copy()
  s_nan[0, 1] = np.nan
  helpers.assert_close(fn(s_nan, t), fn(s, t), rtol=1e-12)
  helpers.assert_finite_value_and_grad(fn, s_nan, t)
  # A NaN in a valid token is not hidden.
  s_nan[0, 0, 0] = np.nan
  assert np.isnan(fn(s_nan, t))


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_state_all_masked_and_zero_vectors(kind):
  s = jnp.ones((2, 3, 4))
  t = jnp.zeros((2, 3, 4))
  none = jnp.zeros((2, 3), jnp.bool_)
  value, grad = jax.value_and_grad(
      lambda s: losses.hidden_state_loss(s, t, mask=none, kind=kind)
  )(s)
  assert value == 0.0 and np.all(np.asarray(grad) == 0.0)
  # The teacher's zero vectors: cosine similarity 0, finite gradient.
  helpers.assert_finite_value_and_grad(
      lambda s, t: losses.hidden_state_loss(s, t, kind=kind), s, t
  )
  # mse: (1 - 0)^2 averaged; cosine: 1 - 0.
  assert losses.hidden_state_loss(s, t, kind=kind) == 1.0


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_state_bfloat16(rng, kind):
  s, t = pair(rng, (2, 6, 8), dtype=np.float32)
  s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  actual = losses.hidden_state_loss(s16, t16, kind=kind)
  assert actual.dtype == jnp.float32
  expected = np_hidden(np.asarray(s16, np.float64), np.asarray(t16, np.float64),
                       kind=kind)
  helpers.assert_close(actual, expected, rtol=1e-5)


def test_hidden_state_cosine_is_scale_invariant(rng):
  s, t = pair(rng, (2, 3, 4), dtype=np.float32)
  helpers.assert_close(
      losses.hidden_state_loss(3.0 * s, 0.5 * t, kind="cosine"),
      losses.hidden_state_loss(s, t, kind="cosine"), rtol=1e-5,
  )


@pytest.mark.parametrize("causal", [True, False])
def test_attention_kl_matches_float64_reference(x64, rng, causal):
  s, t = pair(rng, (2, 3, 5, 5), scale=2.0)
  mask = random_mask(rng, (2, 5))
  for m in (None, mask):
    actual = losses.attention_kl_loss(s, t, mask=m, causal=causal)
    assert actual.shape == () and actual.dtype == jnp.float64
    helpers.assert_close(
        actual, np_attention_kl(s, t, m, causal), rtol=1e-12
    )


def test_attention_kl_mask_equals_slicing(rng):
  s, t = pair(rng, (3, 2, 6, 6), scale=2.0, dtype=np.float32)
  mask = random_mask(rng, (3, 6))
  masked = losses.attention_kl_loss(s, t, mask=jnp.asarray(mask))
  # Second route: each example's valid tokens sliced out (queries and keys),
  # the per-example means weighted by their numbers of valid tokens.
  total = 0.0
  for b in range(3):
    idx = np.flatnonzero(mask[b])
    sub = lambda x: x[b : b + 1][:, :, idx][:, :, :, idx]  # noqa: E731
    total += len(idx) * float(losses.attention_kl_loss(sub(s), sub(t)))
  helpers.assert_close(masked, total / mask.sum(), rtol=1e-5)


def test_attention_kl_grads_and_jit(x64, rng):
  s, t = pair(rng, (2, 2, 4, 4))
  mask = jnp.asarray([[True, True, False, True], [False, True, True, True]])
  fn = lambda s, t: losses.attention_kl_loss(s, t, mask=mask)  # noqa: E731
  check_grads(jax.jit(fn), (s, t), order=2, modes=["rev"])
  helpers.assert_jit_matches_eager(fn, s, t)


def test_attention_kl_accepts_minus_inf_keys(rng):
  s, t = pair(rng, (2, 2, 5, 5), scale=2.0, dtype=np.float32)
  upper = np.triu(np.ones((5, 5), bool), 1)
  s_inf, t_inf = np.where(upper, -np.inf, s), np.where(upper, -np.inf, t)
  expected = losses.attention_kl_loss(s, t)
  # Already masked logits, with or without the causal mask applied again.
  for causal in (True, False):
    helpers.assert_close(
        losses.attention_kl_loss(s_inf, t_inf, causal=causal), expected,
        rtol=1e-6,
    )
    helpers.assert_finite_value_and_grad(
        lambda s, t, c=causal: losses.attention_kl_loss(s, t, causal=c),
        jnp.asarray(s_inf), jnp.asarray(t_inf),
    )
  # A fully padded example (left padding: no valid key before a masked
  # query) stays finite in value and gradient.
  mask = jnp.asarray([[False, False, True, True, True], [True] * 5])
  helpers.assert_finite_value_and_grad(
      lambda s, t: losses.attention_kl_loss(s, t, mask=mask),
      jnp.asarray(s_inf), jnp.asarray(t_inf),
  )


def test_attention_kl_zero_for_equal_inputs_nan_and_all_masked(rng):
  s, t = pair(rng, (1, 2, 4, 4), dtype=np.float32)
  assert abs(float(losses.attention_kl_loss(t, t))) < 1e-7
  assert float(losses.attention_kl_loss(s, t)) > 1e-3
  s_nan = s.copy()
  s_nan[0, 1, 2, 1] = np.nan
  assert np.isnan(losses.attention_kl_loss(s_nan, t))
  mask = jnp.asarray([[True, True, False, True]])
  masked_nan = s.copy()
  masked_nan[0, 0, 2, :] = np.nan  # A masked query row.
  helpers.assert_close(
      losses.attention_kl_loss(masked_nan, t, mask=mask),
      losses.attention_kl_loss(s, t, mask=mask), rtol=1e-6,
  )
  none = jnp.zeros((1, 4), jnp.bool_)
  value, grad = jax.value_and_grad(
      lambda s: losses.attention_kl_loss(s, t, mask=none)
  )(jnp.asarray(s))
  assert value == 0.0 and np.all(np.asarray(grad) == 0.0)


def test_attention_kl_bfloat16(rng):
  s, t = pair(rng, (2, 2, 4, 4), scale=2.0, dtype=np.float32)
  s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  helpers.assert_float32_matches_reference(
      losses.attention_kl_loss, np_attention_kl, s16, t16
  )


def test_attention_kl_on_model_features():
  from jaxkd import models  # The losses themselves import nothing of jaxkd.

  x = {"tokens": jnp.asarray([[1, 2, 3, 4, 5], [0, 0, 6, 7, 8]]),
       "mask": jnp.asarray([[True] * 5, [False, False, True, True, True]])}
  features = []
  for seed in (0, 1):
    module = models.TransformerLM(
        vocab_size=9, num_layers=1, hidden_size=8, num_heads=2,
        return_attention=True,
    )
    variables = jax.jit(module.init)(jax.random.key(seed), x)
    # Larger weights than at initialisation: attention far from uniform.
    variables = jax.tree.map(lambda p: 8.0 * p, variables)
    features.append(jax.jit(module.apply)(variables, x)[1])
  student, teacher = (f["attention_logits_0"] for f in features)
  loss = losses.attention_kl_loss(student, teacher, mask=x["mask"])
  assert np.isfinite(loss) and loss > 1e-2
  expected = np_attention_kl(student, teacher, np.asarray(x["mask"]))
  helpers.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
  assert losses.attention_kl_loss(teacher, teacher, mask=x["mask"]) == 0.0


@pytest.mark.parametrize(
    "fn, args, kwargs, error, match",
    [
        (losses.hidden_state_loss, ((2, 3, 4), (2, 3, 5)), {}, ValueError,
         "student_hidden"),
        (losses.hidden_state_loss, ((4,), (4,)), {}, ValueError,
         "student_hidden"),
        (losses.hidden_state_loss, ((2, 3, 4), (2, 3, 4)), {"kind": "l1"},
         ValueError, "kind"),
        (losses.hidden_state_loss, ((2, 3, 4), (2, 3, 4)),
         {"mask": np.ones((2, 4), bool)}, ValueError, "mask"),
        (losses.hidden_state_loss, ((2, 3, 4), (2, 3, 4)),
         {"mask": np.ones((2, 3))}, TypeError, "mask"),
        (losses.attention_kl_loss, ((1, 2, 3, 3), (1, 1, 3, 3)), {},
         ValueError, "student_attention"),
        (losses.attention_kl_loss, ((1, 3, 3), (1, 3, 3)), {}, ValueError,
         "student_attention"),
        (losses.attention_kl_loss, ((1, 2, 3, 4), (1, 2, 3, 4)), {},
         ValueError, "student_attention"),
        (losses.attention_kl_loss, ((1, 2, 3, 3), (1, 2, 3, 3)),
         {"mask": np.ones((3,), bool)}, ValueError, "mask"),
        (losses.attention_kl_loss, ((1, 2, 3, 3), (1, 2, 3, 3)),
         {"mask": np.ones((1, 3), np.int32)}, TypeError, "mask"),
    ],
)
def test_bad_arguments(fn, args, kwargs, error, match):
  arrays = [jnp.zeros(shape) for shape in args]
  with pytest.raises(error, match=match):
    fn(*arrays, **kwargs)


def test_integer_inputs_are_rejected():
  ints = jnp.zeros((2, 3, 4), jnp.int32)
  with pytest.raises(TypeError, match="teacher_hidden"):
    losses.hidden_state_loss(jnp.zeros((2, 3, 4)), ints)
  with pytest.raises(TypeError, match="student_attention"):
    losses.attention_kl_loss(jnp.zeros((1, 2, 3, 3), jnp.int32),
                             jnp.zeros((1, 2, 3, 3)))
