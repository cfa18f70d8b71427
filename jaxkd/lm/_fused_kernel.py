r"""The forward computation of the fused loss: token chunks, vocabulary tiles.

:func:`jaxkd.lm.fused_distillation_loss` checks its arguments and calls
:func:`jaxkd.lm._fused_vjp.fused`, whose forward pass is :func:`forward`
here; none of it builds an ``[N, V]`` array.

How it computes, for each chunk of ``token_chunk`` tokens:

1. **Pass 1** runs over the vocabulary tiles and combines each tile's
   log-sum-exp into a running one, ``lse = logaddexp(lse, logsumexp(tile))``
   for the student and every teacher. This is exact, not an approximation:
   ``log sum_v exp(s_v)`` is ``logaddexp`` of the log-sum-exps of any
   partition of the vocabulary, so tiles (or devices holding vocabulary
   shards, see ``vocab_axis_name``) can be combined in any order.
2. **Pass 2** runs over the tiles again, recomputes the logits, forms the
   log-probabilities ``s - lse`` and accumulates the divergence's sum over
   the vocabulary.

The backward pass (a ``jax.custom_vjp``) is in :mod:`jaxkd.lm._fused_vjp`;
pass 2 also accumulates, per token, the one number it needs besides the
two log-sum-exps (see there).

Forward and reverse KL of one teacher (or a weighted mean over teachers)
need no second pass: :math:`\mathrm{KL}(p^x \| p^y) = E_{p^x}[x - y]
- \log Z_x + \log Z_y` in the scaled logits, and the expectation is
accumulated in pass 1 itself, rescaled with the running maximum as the
log-sum-exp is. This saves a quarter of the matrix products of the loss and
its gradient.

The last chunk of tokens and the last tile of the vocabulary are not padded:
when ``N`` (or ``V``) is not a multiple of the chunk, the last one is shifted
back to end at ``N`` (``V``) and the entries it shares with the one before
are masked out, so no padded copy of the hidden states or of the head is
ever made.
"""

from __future__ import annotations

from typing import Any, Hashable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
ArrayLike = Any


class Static(NamedTuple):
  """The Python-level configuration (hashable: a ``nondiff_argnum``)."""

  divergence: str
  teacher_reduction: str
  token_chunk: int
  vocab_chunk: int
  soft_cap: bool
  axis_name: Hashable | None
  hidden_grad: str = "accumulate"


class Params(NamedTuple):
  """Scalar (and per-teacher) hyper-parameters, as arrays: may be traced."""

  factor: Array  # logit_scale / temperature.
  soft_cap: Array
  beta: Array
  alpha: Array
  weights: Array  # [K], normalised to sum to 1.
  log_weights: Array  # [K].


# ---------------------------------------------------------------------------
# Elementwise math.
# ---------------------------------------------------------------------------


def scaled(z: Array, st: Static, prm: Params) -> tuple[Array, Array]:
  """``(s, ds/dz)`` with ``s = cap * tanh(z / cap) * scale / T``."""
  if st.soft_cap:
    squashed = jnp.tanh(z / prm.soft_cap)
    return (
        prm.soft_cap * squashed * prm.factor,
        (1 - squashed * squashed) * prm.factor,
    )
  return z * prm.factor, jnp.broadcast_to(prm.factor, z.shape)


def _log_mixture(w: Array, log_a: Array, log_b: Array) -> Array:
  """``log(w a + (1 - w) b)`` from ``w``, ``log a`` and ``log b``."""
  # Never log(w a + (1 - w) b) of probabilities: logaddexp stays exact where
  # they underflow, and log1p keeps log(1 - w) accurate for small w. At w = 0
  # or 1 one side is -inf and logaddexp returns the other side exactly.
  return jnp.logaddexp(jnp.log(w) + log_a, jnp.log1p(-w) + log_b)


def _term(divergence: str, log_ps: Array, log_pt: Array, prm: Params):
  """The divergence's elementwise term, summed over the vocabulary later."""
  if divergence == "forward_kl":
    return jnp.exp(log_pt) * (log_pt - log_ps)
  if divergence == "reverse_kl":
    return jnp.exp(log_ps) * (log_ps - log_pt)
  if divergence == "jsd":
    beta = prm.beta
    log_m = _log_mixture(beta, log_pt, log_ps)
    return beta * jnp.exp(log_pt) * (log_pt - log_m) + (1 - beta) * jnp.exp(
        log_ps
    ) * (log_ps - log_m)
  if divergence == "skew_kl":
    log_m = _log_mixture(prm.alpha, log_pt, log_ps)
    return jnp.exp(log_pt) * (log_pt - log_m)
  if divergence == "skew_reverse_kl":
    log_m = _log_mixture(prm.alpha, log_ps, log_pt)
    return jnp.exp(log_ps) * (log_ps - log_m)
  if divergence == "tvd":
    return 0.5 * jnp.abs(jnp.exp(log_pt) - jnp.exp(log_ps))
  raise ValueError(f"Unknown divergence {divergence!r}.")  # Checked on entry.


def term_and_slope(
    st: Static, log_ps: Array, log_pt: Array, prm: Params
) -> tuple[Array, Array]:
  """The term ``f`` and ``u = df / dlog p_S`` over a tile.

  ``log_ps`` is ``[tc, vc]``, ``log_pt`` the teachers' ``[K, tc, vc]``. The
  term is elementwise in ``log_ps``, so one forward-mode product with a
  tangent of ones gives every ``u_v`` at once.
  """
  if st.teacher_reduction == "mixture" or log_pt.shape[0] == 1:
    if log_pt.shape[0] == 1:
      log_target = log_pt[0]
    else:
      # p_T = sum_k w_k p_k, in log space.
      log_target = jax.nn.logsumexp(
          log_pt + prm.log_weights[:, None, None], axis=0
      )

    def term(log_ps):
      return _term(st.divergence, log_ps, log_target, prm)

  else:  # "mean": sum_k w_k D(p_k, p_S).

    def term(log_ps):
      per_teacher = _term(st.divergence, log_ps[None], log_pt, prm)
      return jnp.sum(prm.weights[:, None, None] * per_teacher, axis=0)

  return jax.jvp(term, (log_ps,), (jnp.ones_like(log_ps),))


# ---------------------------------------------------------------------------
# Chunks and tiles.
# ---------------------------------------------------------------------------


def window(i: Array, size: int, total: int) -> tuple[Array, Array]:
  """Start of chunk ``i`` of ``size`` in ``[0, total)`` and its fresh entries.

  The last chunk is shifted back to end at ``total`` instead of being padded;
  ``fresh`` is ``False`` on the entries it shares with the chunk before.
  """
  start = jnp.minimum(i * size, total - size)
  fresh = start + jnp.arange(size, dtype=jnp.int32) >= i * size
  return start, fresh


def _unchunk(stacked: Array, total: int) -> Array:
  """``[n, size, ...]`` per-chunk rows back to ``[total, ...]`` (see window)."""
  n, size = stacked.shape[:2]
  rows = stacked.reshape((n * size,) + stacked.shape[2:])
  if n * size == total:
    return rows
  tail = total - (n - 1) * size
  return jnp.concatenate(
      [rows[: (n - 1) * size], stacked[-1, size - tail :]], axis=0
  )


def matmul(a: Array, b: Array, dims, dtype) -> Array:
  """``dot_general`` accumulating in ``dtype`` (float32 for 16-bit inputs)."""
  if a.dtype != b.dtype:
    a, b = a.astype(dtype), b.astype(dtype)
  return lax.dot_general(a, b, dims, preferred_element_type=dtype)


def like(x: Array, other: Array) -> Array:
  """``x`` in ``other``'s dtype if that is a 16-bit float, else unchanged."""
  if jnp.dtype(other.dtype).itemsize < 4:
    return x.astype(other.dtype)
  return x


ROWS_BY_COLS = (((1,), (0,)), ((), ()))  # [n, h] x [h, v] -> [n, v]
TEACHERS = (((2,), (1,)), ((0,), (0,)))  # [k, n, h] x [k, h, v] -> [k, n, v]
BY_COLS_T = (((1,), (1,)), ((), ()))  # [n, v] x [h, v] -> [n, h]
T_BY_ROWS = (((0,), (0,)), ((), ()))  # [n, h] x [n, v] -> [h, v]


class Sizes(NamedTuple):
  tokens: int
  vocab: int
  token_chunk: int
  vocab_chunk: int
  chunks: int
  tiles: int


def sizes(st: Static, hs: Array, ws: Array) -> Sizes:
  tokens, vocab = hs.shape[0], ws.shape[1]
  tc, vc = min(st.token_chunk, tokens), min(st.vocab_chunk, vocab)
  return Sizes(tokens, vocab, tc, vc, -(-tokens // tc), -(-vocab // vc))


def tile_heads(j, ws, wt, sz: Sizes):
  """Vocabulary tile ``j`` of the heads, its start and its fresh columns."""
  start, fresh = window(j, sz.vocab_chunk, sz.vocab)
  ws_j = lax.dynamic_slice_in_dim(ws, start, sz.vocab_chunk, axis=1)
  wt_j = lax.dynamic_slice_in_dim(wt, start, sz.vocab_chunk, axis=2)
  return start, fresh, ws_j, wt_j


def _tile_logits(j, hs_c, ht_c, ws, wt, sz: Sizes, dtype):
  """Raw logits of vocabulary tile ``j``: student ``[tc, vc]``, teachers."""
  _, fresh, ws_j, wt_j = tile_heads(j, ws, wt, sz)
  zs = matmul(hs_c, ws_j, ROWS_BY_COLS, dtype)
  zt = matmul(ht_c, wt_j, TEACHERS, dtype)
  return fresh, zs, zt


def varying(x: Array, st: Static) -> Array:
  """Marks a loop's initial carry as varying over the vocabulary axis.

  Under ``shard_map`` a carry that accumulates per-shard values must be
  typed as varying over the mesh axis from the start.
  """
  if st.axis_name is None:
    return x
  return lax.pcast(x, st.axis_name, to="varying")


def _add_logsumexp(running: Array, tile: Array) -> Array:
  """``logaddexp(running, logsumexp(tile, axis=-1))``, in few operations.

  ``tile`` holds at least one finite entry per row (every tile has a fresh
  column), so its row maximum is finite and no ``inf - inf`` can arise;
  ``running`` starts at ``-inf``. A ``nan`` logit propagates.
  """
  peak = jnp.maximum(running, jnp.max(tile, axis=-1))
  total = jnp.exp(running - peak) + jnp.sum(
      jnp.exp(tile - peak[..., None]), axis=-1
  )
  return peak + jnp.log(total)


def _all_logsumexp(lse: Array, axis_name) -> Array:
  """Combines per-device log-sum-exps of vocabulary shards (exactly)."""
  peak = lax.pmax(lse, axis_name)
  return peak + jnp.log(lax.psum(jnp.exp(lse - peak), axis_name))


def _one_pass(st: Static, k: int) -> bool:
  """Whether one pass over the tiles suffices: KL of each single teacher.

  Forward and reverse KL are ``E_p[x - y] - lse(x) + lse(y)`` in the scaled
  logits ``x, y``, which one pass accumulates with running maxima (as the
  online normaliser does); the KL to a mixture of teachers, and the other
  divergences, are not linear in the logits and need the two passes.
  """
  return st.divergence in ("forward_kl", "reverse_kl") and (
      k == 1 or st.teacher_reduction == "mean"
  )


def _kl_chunk_statistics(st, prm, hs_c, ht_c, ws, wt, sz, dtype):
  """Forward or reverse KL of a chunk in one pass over the tiles.

  With ``x`` the logits the expectation is taken under (the teacher's for
  forward KL, the student's for reverse KL) and ``y`` the other side's,
  ``KL = A / L_x - lse_x + lse_y`` where ``L_x = sum_v exp(x_v - m_x)`` and
  ``A = sum_v exp(x_v - m_x) (x_v - y_v)`` are carried with the running
  maximum ``m_x`` and rescaled by ``exp(m_old - m_new)`` whenever it grows,
  exactly as the log-sum-exps are.
  """
  k, tc = ht_c.shape[0], sz.token_chunk
  forward = st.divergence == "forward_kl"
  minus_inf = jnp.full((), -jnp.inf, dtype)
  zero = jnp.zeros((), dtype)

  def rescaled(m, l, tile):
    """New running maximum and sum of exponentials with ``tile`` added."""
    new_m = jnp.maximum(m, jnp.max(tile, axis=-1))
    l = l * jnp.exp(m - new_m) + jnp.sum(
        jnp.exp(tile - new_m[..., None]), axis=-1
    )
    return new_m, l

  def step(carry, j):
    m_s, l_s, m_t, l_t, a = carry
    fresh, zs, zt = _tile_logits(j, hs_c, ht_c, ws, wt, sz, dtype)
    s = jnp.where(fresh[None, :], scaled(zs, st, prm)[0], minus_inf)
    t = jnp.where(fresh[None, None, :], scaled(zt, st, prm)[0], minus_inf)
    new_m_s, l_s = rescaled(m_s, l_s, s)
    new_m_t, l_t = rescaled(m_t, l_t, t)
    # Shared (stale) columns hold -inf on both sides: their difference is
    # replaced by 0, and their weight is exp(-inf) = 0.
    if forward:
      diff = jnp.where(fresh[None, None, :], t - s[None], zero)
      weight = jnp.exp(t - new_m_t[..., None])
      a = a * jnp.exp(m_t - new_m_t)
    else:
      diff = jnp.where(fresh[None, None, :], s[None] - t, zero)
      weight = jnp.exp(s - new_m_s[:, None])[None]
      a = a * jnp.exp(m_s - new_m_s)[None]
    a = a + jnp.sum(weight * diff, axis=-1)
    return (new_m_s, l_s, new_m_t, l_t, a), None

  init = (
      jnp.full((tc,), -jnp.inf, dtype), jnp.zeros((tc,), dtype),
      jnp.full((k, tc), -jnp.inf, dtype), jnp.zeros((k, tc), dtype),
      jnp.zeros((k, tc), dtype),
  )
  (m_s, l_s, m_t, l_t, a), _ = lax.scan(
      step, varying(init, st), jnp.arange(sz.tiles, dtype=jnp.int32)
  )
  if st.axis_name is not None:
    # Devices' partial sums, brought to the common maximum, add up.
    peak_s, peak_t = lax.pmax(m_s, st.axis_name), lax.pmax(m_t, st.axis_name)
    l_s = lax.psum(l_s * jnp.exp(m_s - peak_s), st.axis_name)
    l_t = lax.psum(l_t * jnp.exp(m_t - peak_t), st.axis_name)
    scale = jnp.exp(m_t - peak_t) if forward else jnp.exp(m_s - peak_s)[None]
    a = lax.psum(a * scale, st.axis_name)
    m_s, m_t = peak_s, peak_t
  lse_s, lse_t = m_s + jnp.log(l_s), m_t + jnp.log(l_t)
  if forward:
    per_teacher = a / l_t - lse_t + lse_s[None]
  else:
    per_teacher = a / l_s[None] - lse_s[None] + lse_t
  total = jnp.sum(prm.weights[:, None] * per_teacher, axis=0)
  # sum_v u_v: forward KL's u = -p_T sums to -1; reverse KL's
  # u = p_S (log p_S - log p_T + 1) sums to KL + 1.
  slope = jnp.full((tc,), -1.0, dtype) if forward else total + 1
  return total, (lse_s, jnp.moveaxis(lse_t, 0, 1), slope)


def _chunk_statistics(st, prm, hs_c, ht_c, ws, wt, sz, dtype, with_slope):
  """Per-token divergence (and the backward pass's statistics) of a chunk."""
  k, tc = ht_c.shape[0], sz.token_chunk
  if _one_pass(st, k):
    return _kl_chunk_statistics(st, prm, hs_c, ht_c, ws, wt, sz, dtype)
  tiles = jnp.arange(sz.tiles, dtype=jnp.int32)
  minus_inf = jnp.full((), -jnp.inf, dtype)

  def lse_step(carry, j):
    lse_s, lse_t = carry
    fresh, zs, zt = _tile_logits(j, hs_c, ht_c, ws, wt, sz, dtype)
    s = jnp.where(fresh[None, :], scaled(zs, st, prm)[0], minus_inf)
    t = jnp.where(fresh[None, None, :], scaled(zt, st, prm)[0], minus_inf)
    return (_add_logsumexp(lse_s, s), _add_logsumexp(lse_t, t)), None

  init = (jnp.full((tc,), -jnp.inf, dtype), jnp.full((k, tc), -jnp.inf, dtype))
  (lse_s, lse_t), _ = lax.scan(lse_step, varying(init, st), tiles)
  if st.axis_name is not None:
    lse_s = _all_logsumexp(lse_s, st.axis_name)
    lse_t = _all_logsumexp(lse_t, st.axis_name)

  zero = jnp.zeros((), dtype)

  def divergence_step(carry, j):
    total, slope = carry
    fresh, zs, zt = _tile_logits(j, hs_c, ht_c, ws, wt, sz, dtype)
    log_ps = scaled(zs, st, prm)[0] - lse_s[:, None]
    log_pt = scaled(zt, st, prm)[0] - lse_t[..., None]
    f, u = term_and_slope(st, log_ps, log_pt, prm)
    total = total + jnp.sum(jnp.where(fresh[None, :], f, zero), axis=-1)
    if with_slope:
      slope = slope + jnp.sum(jnp.where(fresh[None, :], u, zero), axis=-1)
    return (total, slope), None

  init = (jnp.zeros((tc,), dtype), jnp.zeros((tc,), dtype))
  (total, slope), _ = lax.scan(divergence_step, varying(init, st), tiles)
  if st.axis_name is not None:
    total = lax.psum(total, st.axis_name)
    slope = lax.psum(slope, st.axis_name) if with_slope else slope
  return total, (lse_s, jnp.moveaxis(lse_t, 0, 1), slope)


def forward(st, hs, ws, ht, wt, prm, with_slope):
  """Per-token divergences ``[N]`` and, if asked, the residual statistics."""
  dtype = prm.factor.dtype
  sz = sizes(st, hs, ws)

  def chunk_step(_, i):
    row0, _ = window(i, sz.token_chunk, sz.tokens)
    hs_c = lax.dynamic_slice_in_dim(hs, row0, sz.token_chunk, axis=0)
    ht_c = lax.dynamic_slice_in_dim(ht, row0, sz.token_chunk, axis=1)
    out = _chunk_statistics(
        st, prm, hs_c, ht_c, ws, wt, sz, dtype, with_slope
    )
    return None, out if with_slope else out[0]

  _, out = lax.scan(chunk_step, None, jnp.arange(sz.chunks, dtype=jnp.int32))
  return jax.tree.map(lambda x: _unchunk(x, sz.tokens), out)
