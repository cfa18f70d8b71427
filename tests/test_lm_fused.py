"""Tests of the fused output-layer loss against materialised-logit references.

Values are checked against float64 NumPy formulas written here; gradients
against autodiff of the same formulas on materialised ``[N, V]`` logits
(jax.numpy), against finite differences (``check_grads``) and, for forward
KL, against the closed form ``(p_S - p_T) / T``; the per-token values also
against ``jaxkd.losses``. Neither the token count nor the vocabulary is a
multiple of its chunk.

Every call goes through one jitted function whose hyper-parameters are
traced, so tests that differ only in their values share one compilation.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

from jaxkd import lm
from jaxkd import losses
from tests import helpers

N, H_S, H_T, V = 13, 5, 7, 37
CHUNKS = dict(token_chunk=4, vocab_chunk=8)
STATIC = ("divergence", "teacher_reduction", "token_chunk", "vocab_chunk",
          "reduction", "vocab_axis_name", "hidden_grad")
FUSED = jax.jit(lm.fused_distillation_loss, static_argnames=STATIC)
VALUE_AND_GRADS = jax.jit(
    jax.value_and_grad(lm.fused_distillation_loss, argnums=(0, 1, 2, 3)),
    static_argnames=STATIC,
)


# ---------------------------------------------------------------------------
# References: the formulas on materialised [N, V] logits. Written once over
# the array module `xp`: NumPy float64 for values, jax.numpy for autodiff.
# ---------------------------------------------------------------------------


def ref_log_softmax(xp, z):
  shifted = z - xp.max(z, axis=-1, keepdims=True)
  return shifted - xp.log(xp.sum(xp.exp(shifted), axis=-1, keepdims=True))


def ref_scaled_logits(xp, h, w, *, temperature, logit_scale, soft_cap):
  z = h @ w
  if soft_cap is not None:
    z = soft_cap * xp.tanh(z / soft_cap)
  return z * logit_scale / temperature


def ref_divergence(xp, name, log_ps, pt, *, beta, alpha):
  """Per-token D(p_T, p_S) from student log-probs and teacher probs."""
  ps, log_pt = xp.exp(log_ps), xp.log(pt)

  def kl(p, log_p, log_q):
    return xp.sum(p * (log_p - log_q), axis=-1)

  if name == "forward_kl":
    return kl(pt, log_pt, log_ps)
  if name == "reverse_kl":
    return kl(ps, log_ps, log_pt)
  if name == "jsd":
    log_m = xp.log(beta * pt + (1 - beta) * ps)
    return beta * kl(pt, log_pt, log_m) + (1 - beta) * kl(ps, log_ps, log_m)
  if name == "skew_kl":
    return kl(pt, log_pt, xp.log(alpha * pt + (1 - alpha) * ps))
  if name == "skew_reverse_kl":
    return kl(ps, log_ps, xp.log(alpha * ps + (1 - alpha) * pt))
  if name == "tvd":
    return 0.5 * xp.sum(xp.abs(pt - ps), axis=-1)
  raise ValueError(name)


def reference_loss(xp, hs, ws, ht, wt, *, mask=None, divergence="forward_kl",
                   temperature=1.0, beta=0.5, alpha=0.1, teacher_weights=None,
                   teacher_reduction="mixture", logit_scale=1.0,
                   soft_cap=None, reduction="mean"):
  """The loss on materialised logits, same arguments as the fused one."""
  if wt.ndim == 2:
    ht, wt = ht[None], wt[None]
  scale = dict(temperature=temperature, logit_scale=logit_scale,
               soft_cap=soft_cap)
  log_ps = ref_log_softmax(xp, ref_scaled_logits(xp, hs, ws, **scale))
  k = wt.shape[0]
  weights = (np.full(k, 1.0 / k) if teacher_weights is None
             else teacher_weights / np.sum(teacher_weights))
  pts = [
      xp.exp(ref_log_softmax(xp, ref_scaled_logits(xp, ht[i], wt[i], **scale)))
      for i in range(k)
  ]
  div = functools.partial(ref_divergence, xp, divergence, log_ps, beta=beta,
                          alpha=alpha)
  if teacher_reduction == "mixture":
    per_token = div(sum(weights[i] * pts[i] for i in range(k)))
  else:
    per_token = sum(weights[i] * div(pts[i]) for i in range(k))
  if mask is None:
    mask = np.ones(per_token.shape, bool)
  per_token = xp.where(mask, per_token, 0.0)
  if reduction == "none":
    return per_token
  total, count = xp.sum(per_token), np.sum(mask)
  if reduction == "sum_and_count":
    return total, count
  return total / float(max(count, 1))


def make_inputs(rng, *, k=None, n=N, vocab=V, dtype=np.float64):
  shape_t = (n, H_T) if k is None else (k, n, H_T)
  head_t = (H_T, vocab) if k is None else (k, H_T, vocab)
  arrays = (
      rng.standard_normal((n, H_S)),
      1.5 * rng.standard_normal((H_S, vocab)) / np.sqrt(H_S),
      rng.standard_normal(shape_t),
      1.5 * rng.standard_normal(head_t) / np.sqrt(H_T),
  )
  return tuple(a.astype(dtype) for a in arrays)


def reference_value_and_grads(args, **kwargs):
  """The reference's value and gradients w.r.t. the student, in float64."""
  args = tuple(np.asarray(a, np.float64) for a in args)
  with jax.enable_x64(True):
    fn = lambda hs, ws: reference_loss(  # noqa: E731
        jnp, hs, ws, jnp.asarray(args[2]), jnp.asarray(args[3]), **kwargs
    )
    value, grads = jax.value_and_grad(fn, argnums=(0, 1))(*args[:2])
    return np.asarray(value), tuple(np.asarray(g) for g in grads)


CONFIGS = {
    # divergence -> keyword arguments (non-defaults on purpose).
    "forward_kl": dict(temperature=2.0),
    "reverse_kl": dict(temperature=0.7, soft_cap=3.0),
    "jsd": dict(beta=0.3, logit_scale=0.8),
    "skew_kl": dict(alpha=0.2, temperature=1.3),
    "skew_reverse_kl": dict(alpha=0.4, soft_cap=2.5, logit_scale=1.2),
    "tvd": dict(temperature=1.5),
}
# The per-example losses of jaxkd.losses with the same definition.
LOSSES = {
    "forward_kl": losses.kl_divergence,
    "reverse_kl": losses.reverse_kl_divergence,
    "jsd": functools.partial(losses.jensen_shannon_divergence, beta=0.3),
    "tvd": losses.total_variation_distance,
}


def config(divergence, **overrides):
  return {"divergence": divergence, **CONFIGS[divergence], **overrides}


# ---------------------------------------------------------------------------
# Values and gradients equal the unfused loss.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", sorted(CONFIGS))
def test_float64_value_and_grads_match_reference(x64, rng, divergence):
  args = make_inputs(rng)
  mask = rng.random(N) > 0.25
  kwargs = config(divergence)
  value, grads = VALUE_AND_GRADS(*args, mask=mask, **kwargs, **CHUNKS)
  assert value.dtype == jnp.float64
  helpers.assert_close(
      value, reference_loss(np, *args, mask=mask, **kwargs), rtol=1e-12
  )
  _, expected_grads = reference_value_and_grads(args, mask=mask, **kwargs)
  helpers.assert_close(grads[:2], expected_grads, rtol=1e-10, atol=1e-13)
  np.testing.assert_array_equal(np.asarray(grads[0])[~mask], 0.0)
  # The teacher is frozen: zero gradient.
  for g in grads[2:]:
    np.testing.assert_array_equal(np.asarray(g), 0.0)
  if divergence in LOSSES:
    # A third route: jaxkd.losses on the scaled logits.
    scale = dict(temperature=kwargs.get("temperature", 1.0),
                 logit_scale=kwargs.get("logit_scale", 1.0),
                 soft_cap=kwargs.get("soft_cap"))
    per_token = LOSSES[divergence](
        ref_scaled_logits(np, *args[:2], **scale),
        ref_scaled_logits(np, *args[2:], **scale),
    )
    helpers.assert_close(value, per_token[mask].mean(), rtol=1e-12)


def test_forward_kl_grad_is_closed_form(x64, rng):
  # d KL(p_T || p_S) / d s = (p_S - p_T) / T per token, with s = h W.
  hs, ws, ht, wt = make_inputs(rng)
  mask = np.ones(N, bool)
  temperature = 2.0
  _, grads = VALUE_AND_GRADS(hs, ws, ht, wt, mask=mask,
                             **config("forward_kl"), **CHUNKS)
  ps = np.exp(ref_log_softmax(np, hs @ ws / temperature))
  pt = np.exp(ref_log_softmax(np, ht @ wt / temperature))
  dz = (ps - pt) / temperature / N
  helpers.assert_close(grads[0], dz @ ws.T, rtol=1e-11)
  helpers.assert_close(grads[1], hs.T @ dz, rtol=1e-11)


@pytest.mark.parametrize("divergence", sorted(CONFIGS))
def test_float32_value_and_grads_match_float64_reference(rng, divergence):
  args = make_inputs(rng, dtype=np.float32)
  mask = np.ones(N, bool)
  kwargs = config(divergence)
  value, grads = VALUE_AND_GRADS(*args, mask=mask, **kwargs, **CHUNKS)
  assert value.dtype == jnp.float32
  assert grads[0].dtype == grads[1].dtype == jnp.float32
  expected, expected_grads = reference_value_and_grads(args, **kwargs)
  helpers.assert_close(value, expected, rtol=1e-5, atol=1e-7)
  helpers.assert_close(grads[:2], expected_grads, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "divergence, teacher_reduction", [("forward_kl", "mixture"),
                                      ("reverse_kl", "mean"),
                                      ("jsd", "mean")]
)
def test_two_teachers_match_reference(x64, rng, divergence, teacher_reduction):
  args = make_inputs(rng, k=2)
  mask = rng.random(N) > 0.25
  kwargs = dict(divergence=divergence, teacher_reduction=teacher_reduction,
                teacher_weights=np.array([0.25, 0.5]), temperature=1.5)
  value, grads = VALUE_AND_GRADS(*args, mask=mask, **kwargs, **CHUNKS)
  helpers.assert_close(
      value, reference_loss(np, *args, mask=mask, **kwargs), rtol=1e-12
  )
  _, expected_grads = reference_value_and_grads(args, mask=mask, **kwargs)
  helpers.assert_close(grads[:2], expected_grads, rtol=1e-10, atol=1e-13)
  # Mixture and mean are different losses (for more than one teacher).
  other = "mean" if teacher_reduction == "mixture" else "mixture"
  assert abs(float(value) - reference_loss(
      np, *args, mask=mask, **{**kwargs, "teacher_reduction": other})) > 1e-4


@pytest.mark.parametrize(
    "divergence, k", [("forward_kl", 1), ("jsd", 1), ("skew_kl", 2)]
)
def test_recomputed_hidden_grad_equals_the_accumulated_one(
    x64, rng, divergence, k
):
  # Both backward routes against the float64 reference and each other, with
  # a shifted last token chunk (N = 13, chunks of 4) and vocabulary tile.
  args = make_inputs(rng, k=k)
  mask = rng.random(N) > 0.25
  kwargs = dict(config(divergence), mask=mask, **CHUNKS)
  _, expected = reference_value_and_grads(
      args, mask=mask, **config(divergence))
  grads = {
      how: VALUE_AND_GRADS(*args, hidden_grad=how, **kwargs)[1][:2]
      for how in lm.HIDDEN_GRADS
  }
  for how in lm.HIDDEN_GRADS:
    helpers.assert_close(grads[how], expected, rtol=1e-10, atol=1e-13)
  helpers.assert_close(grads["recompute"], grads["accumulate"], rtol=1e-14,
                       atol=1e-16)


def test_one_stacked_teacher_is_one_teacher(x64, rng):
  hs, ws, ht, wt = make_inputs(rng)
  kwargs = dict(divergence="reverse_kl", **CHUNKS)
  helpers.assert_close(
      FUSED(hs, ws, ht[None], wt[None], teacher_reduction="mean", **kwargs),
      FUSED(hs, ws, ht, wt, **kwargs),
      rtol=1e-14,
  )


def test_grads_match_finite_differences(x64, rng):
  # A route independent of any autodiff: numerical differences (on the
  # generalised JSD, with a soft cap).
  hs, ws, ht, wt = make_inputs(rng, n=5, vocab=11)
  fused = jax.jit(functools.partial(
      lm.fused_distillation_loss, teacher_hidden=ht, teacher_head=wt,
      divergence="jsd", soft_cap=2.0, temperature=1.3, token_chunk=2,
      vocab_chunk=4,
  ))
  check_grads(fused, (hs, ws), order=1, modes=["rev"])


def test_skew_and_jsd_endpoints(x64, rng):
  args = make_inputs(rng)
  mask = np.ones(N, bool)
  call = functools.partial(VALUE_AND_GRADS, *args, mask=mask, **CHUNKS)
  # alpha = 0: the skew divergences are the plain KLs.
  value, _ = call(**config("skew_kl", alpha=0.0))
  helpers.assert_close(
      value,
      reference_loss(np, *args, **config("forward_kl", temperature=1.3)),
      rtol=1e-12,
  )
  value, _ = call(**config("skew_reverse_kl", alpha=0.0))
  helpers.assert_close(
      value,
      reference_loss(np, *args, **config(
          "reverse_kl", soft_cap=2.5, logit_scale=1.2, temperature=1.0)),
      rtol=1e-12,
  )
  # alpha = 1 and beta in {0, 1}: exactly 0 with a zero gradient.
  for kwargs in [config("skew_kl", alpha=1.0),
                 config("skew_reverse_kl", alpha=1.0),
                 config("jsd", beta=0.0), config("jsd", beta=1.0)]:
    value, grads = call(**kwargs)
    assert abs(float(value)) < 1e-15, kwargs
    np.testing.assert_allclose(np.asarray(grads[0]), 0.0, atol=1e-15)


# ---------------------------------------------------------------------------
# Reductions, masks, shapes, dtypes.
# ---------------------------------------------------------------------------


def test_reductions_and_leading_shape(x64, rng):
  hs, ws, ht, wt = make_inputs(rng, n=12)
  mask = rng.random(12) > 0.3
  kwargs = dict(divergence="jsd", **CHUNKS)
  per_token = FUSED(
      hs.reshape(3, 4, H_S), ws, ht.reshape(3, 4, H_T), wt,
      mask=mask.reshape(3, 4), reduction="none", **kwargs,
  )
  assert per_token.shape == (3, 4)
  expected = reference_loss(np, hs, ws, ht, wt, mask=mask, divergence="jsd",
                            reduction="none")
  helpers.assert_close(per_token.reshape(-1), expected, rtol=1e-12)
  total, count = FUSED(hs, ws, ht, wt, mask=mask, reduction="sum_and_count",
                       **kwargs)
  assert float(count) == mask.sum()
  helpers.assert_close(total, expected.sum(), rtol=1e-12)


def test_mask_matches_slicing_and_blocks_nan(rng):
  hs, ws, ht, wt = make_inputs(rng, dtype=np.float32)
  mask = rng.random(N) > 0.4
  hs_bad, ht_bad = hs.copy(), ht.copy()
  hs_bad[~mask] = np.nan
  ht_bad[~mask] = np.inf
  kwargs = dict(divergence="jsd", **CHUNKS)
  value, grads = VALUE_AND_GRADS(hs_bad, ws, ht_bad, wt, mask=mask, **kwargs)
  sliced, sliced_grads = VALUE_AND_GRADS(
      hs[mask], ws, ht[mask], wt, mask=np.ones(mask.sum(), bool), **kwargs
  )
  helpers.assert_close(value, sliced, rtol=1e-6)
  helpers.assert_close(grads[0][mask], sliced_grads[0], rtol=1e-5, atol=1e-7)
  helpers.assert_close(grads[1], sliced_grads[1], rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(grads[0])[~mask], 0.0)
  # Where the mask lets it through, the nan shows.
  value, _ = VALUE_AND_GRADS(hs_bad, ws, ht, wt, mask=np.ones(N, bool),
                             **kwargs)
  assert np.isnan(float(value))


def test_all_masked_is_zero_with_zero_grads(rng):
  args = make_inputs(rng, dtype=np.float32)
  value, grads = VALUE_AND_GRADS(*args, mask=np.zeros(N, bool),
                                 **config("forward_kl"), **CHUNKS)
  assert float(value) == 0.0
  for g in grads:
    np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_bfloat16_inputs_accumulate_in_float32(rng):
  args = tuple(
      jnp.asarray(a, jnp.bfloat16)
      for a in make_inputs(rng, dtype=np.float32)
  )
  value, grads = VALUE_AND_GRADS(*args, **CHUNKS)
  assert value.dtype == jnp.float32
  assert grads[0].dtype == grads[1].dtype == jnp.bfloat16
  # The reference on the same (rounded) inputs, in float64: the value is
  # float32-accurate; the gradients are rounded to bfloat16 once, at the end.
  expected, expected_grads = reference_value_and_grads(args)
  helpers.assert_close(value, expected, rtol=1e-5)
  helpers.assert_close(grads[:2], expected_grads, rtol=1e-2, atol=1e-4)
  # The recomputing backward pass sums the same float32 products.
  recomputed = VALUE_AND_GRADS(*args, hidden_grad="recompute", **CHUNKS)[1]
  assert recomputed[0].dtype == jnp.bfloat16
  helpers.assert_close(recomputed[:2], grads[:2], rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize(
    "token_chunk, vocab_chunk", [(4, 8), (1, 1), (10_000, 10_000)]
)
def test_any_chunk_sizes_give_the_loss(rng, token_chunk, vocab_chunk):
  # Chunks of one token and one vocabulary entry; chunks larger than N and V
  # (one chunk, one tile).
  args = make_inputs(rng, dtype=np.float32)
  kwargs = config("skew_kl", soft_cap=2.0)
  value = FUSED(*args, **kwargs, token_chunk=token_chunk,
                vocab_chunk=vocab_chunk)
  expected = reference_loss(np, *(a.astype(np.float64) for a in args), **kwargs)
  helpers.assert_close(value, expected, rtol=2e-6)


def test_traced_bad_hyper_parameters_give_nan(rng):
  args = make_inputs(rng, dtype=np.float32)
  loss = functools.partial(FUSED, *args, divergence="jsd", **CHUNKS)
  assert np.isfinite(float(loss(temperature=1.0, beta=0.5)))
  assert np.isnan(float(loss(temperature=-1.0, beta=0.5)))
  assert np.isnan(float(loss(temperature=1.0, beta=1.5)))


# ---------------------------------------------------------------------------
# A vocabulary sharded over devices.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "divergence, hidden_grad", [("forward_kl", "accumulate"),
                                ("jsd", "accumulate"), ("jsd", "recompute")]
)
def test_vocabulary_sharded_heads_under_shard_map(
    x64, rng, divergence, hidden_grad
):
  # V = 40 over 4 devices: 10 entries each, tiles of 4 (the last shifted).
  # Forward KL takes the one-pass route, JSD the two passes.
  args = make_inputs(rng, vocab=40)
  kwargs = config(divergence, soft_cap=2.0)
  mesh = jax.make_mesh((4,), ("vocab",),
                       axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:4])

  def sharded(hs, ws, ht, wt):
    return jax.shard_map(
        functools.partial(lm.fused_distillation_loss, vocab_axis_name="vocab",
                          token_chunk=4, vocab_chunk=4,
                          hidden_grad=hidden_grad, **kwargs),
        mesh=mesh, in_specs=(P(), P(None, "vocab"), P(), P(None, "vocab")),
        out_specs=P(),
    )(hs, ws, ht, wt)

  value, grads = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1)))(*args)
  expected, expected_grads = reference_value_and_grads(args, **kwargs)
  helpers.assert_close(value, expected, rtol=1e-12)
  helpers.assert_close(grads, expected_grads, rtol=1e-10, atol=1e-13)
  assert grads[1].sharding.spec == P(None, "vocab")
  with pytest.raises(ValueError, match="does not vary over that axis"):
    lm.fused_distillation_loss(*args, vocab_axis_name="vocab")


# ---------------------------------------------------------------------------
# Memory: the compiled program's scratch space does not grow with V.
# ---------------------------------------------------------------------------


def _temp_bytes(fn, shapes, dtype=jnp.float32):
  abstract = [jax.ShapeDtypeStruct(s, dtype) for s in shapes]
  compiled = jax.jit(fn).lower(*abstract).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_temporary_memory_does_not_grow_with_vocab():
  n, h, token_chunk, vocab_chunk = 256, 32, 64, 256

  def fused(hs, ws, ht, wt):
    return lm.fused_distillation_loss(
        hs, ws, ht, wt, token_chunk=token_chunk, vocab_chunk=vocab_chunk
    )

  def unfused(hs, ws, ht, wt):
    return jnp.mean(losses.kl_divergence(hs @ ws, ht @ wt))

  programs = {
      "fused": fused,
      "fused grad": jax.grad(fused, argnums=(0, 1)),
      "unfused": unfused,
      "unfused grad": jax.grad(unfused, argnums=(0, 1)),
  }
  temp = {
      (name, vocab): _temp_bytes(fn, [(n, h), (h, vocab), (n, h), (h, vocab)])
      for name, fn in programs.items() for vocab in (1024, 8192)
  }
  one_logits_growth = n * (8192 - 1024) * 4  # One [N, V] float32 array.
  tile = token_chunk * vocab_chunk * 4
  for name in ("fused", "fused grad"):
    # Flat in V (a few bytes of loop bookkeeping at most), and a few tiles.
    assert abs(temp[name, 8192] - temp[name, 1024]) < 4096, temp
    assert temp[name, 8192] < 8 * tile, temp
  for name in ("unfused", "unfused grad"):
    assert temp[name, 8192] - temp[name, 1024] >= one_logits_growth, temp


def test_recomputed_hidden_grad_needs_no_buffer_that_grows_with_tokens():
  # bfloat16 inputs: the accumulated gradient is a float32 buffer apart from
  # the bfloat16 output (for float32 inputs XLA accumulates in the output).
  h, vocab, token_chunk, vocab_chunk = 64, 1024, 64, 128

  def grad(hidden_grad):
    return jax.grad(functools.partial(
        lm.fused_distillation_loss, token_chunk=token_chunk,
        vocab_chunk=vocab_chunk, hidden_grad=hidden_grad), argnums=(0, 1))

  temp = {
      (how, n): _temp_bytes(grad(how), [(n, h), (h, vocab), (n, h), (h, vocab)],
                            jnp.bfloat16)
      for how in lm.HIDDEN_GRADS for n in (256, 2048)
  }
  accumulator_growth = (2048 - 256) * h * 4  # The float32 [N, H] buffer.
  assert (temp["accumulate", 2048] - temp["accumulate", 256]
          >= accumulator_growth), temp
  # Per-token floats (two log-sum-exps, the slope sum, the per-token loss)
  # and a few bytes of bookkeeping aside, nothing grows.
  per_token_stats = (2048 - 256) * 4 * 4
  assert (temp["recompute", 2048] - temp["recompute", 256]
          <= per_token_stats + 4096), temp
  assert temp["recompute", 2048] < temp["accumulate", 2048] / 2, temp


# ---------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------


def test_errors(rng):
  hs, ws, ht, wt = make_inputs(rng, dtype=np.float32)
  loss = lm.fused_distillation_loss
  with pytest.raises(ValueError, match="`hidden_grad`"):
    loss(hs, ws, ht, wt, hidden_grad="two_sweeps")
  with pytest.raises(ValueError, match="`student_head` of shape"):
    loss(hs, ws[:-1], ht, wt)
  with pytest.raises(ValueError, match="`teacher_head` of shape"):
    loss(hs, ws, ht, wt[:-1])
  with pytest.raises(ValueError, match="same vocabulary size"):
    loss(hs, ws, ht, wt[:, :-1])
  with pytest.raises(ValueError, match="`teacher_hidden` of shape"):
    loss(hs, ws, ht[:-1], wt)
  with pytest.raises(ValueError, match=r"K = teacher_head.shape\[0\]"):
    loss(hs, ws, np.stack([ht] * 3), np.stack([wt] * 2))
  with pytest.raises(ValueError, match=r"`mask` must have shape \(13,\)"):
    loss(hs, ws, ht, wt, mask=np.ones(12, bool))
  with pytest.raises(TypeError, match="`mask` must be a boolean"):
    loss(hs, ws, ht, wt, mask=np.ones(N, np.float32))
  with pytest.raises(ValueError, match="`divergence` must be one of"):
    loss(hs, ws, ht, wt, divergence="kl")
  with pytest.raises(ValueError, match="`teacher_reduction` must be one of"):
    loss(hs, ws, ht, wt, teacher_reduction="sum")
  with pytest.raises(ValueError, match="`reduction` must be one of"):
    loss(hs, ws, ht, wt, reduction="sum")
  with pytest.raises(ValueError, match="`token_chunk` must be >= 1"):
    loss(hs, ws, ht, wt, token_chunk=0)
  with pytest.raises(ValueError, match="`vocab_chunk` must be >= 1"):
    loss(hs, ws, ht, wt, vocab_chunk=-4)
  with pytest.raises(TypeError, match="`vocab_chunk` must be a Python int"):
    loss(hs, ws, ht, wt, vocab_chunk=8.0)
  with pytest.raises(ValueError, match="`temperature` must be a finite number > 0"):
    loss(hs, ws, ht, wt, temperature=0.0)
  with pytest.raises(ValueError, match="`soft_cap` must be a finite number > 0"):
    loss(hs, ws, ht, wt, soft_cap=-1.0)
  with pytest.raises(ValueError, match=r"`beta` must be in \[0, 1\]"):
    loss(hs, ws, ht, wt, divergence="jsd", beta=2.0)
  with pytest.raises(ValueError, match="`teacher_weights` must have shape"):
    loss(hs, ws, ht, wt, teacher_weights=np.ones(2, np.float32))
  with pytest.raises(ValueError, match="`teacher_weights` must be non-neg"):
    loss(hs, ws, ht[None], wt[None],
         teacher_weights=np.array([-1.0], np.float32))
  with pytest.raises(TypeError, match="`student_hidden` must be a floating"):
    loss(hs.astype(np.int32), ws, ht, wt)
