r"""The fused loss as a ``jax.custom_vjp``: a backward pass without logits.

The backward pass recomputes every tile's logits instead of storing them.
Every divergence of the fused loss is a sum over the vocabulary of an
elementwise term :math:`f(\log p^S_v, \log p^T_v)`, so with
:math:`u_v = \partial f / \partial \log p^S_v` the gradient with respect to
the student's scaled logits is

.. math::
  \frac{\partial D}{\partial s_v} = u_v - p^S_v \sum_w u_w .

The forward pass (:func:`jaxkd.lm._fused_kernel.forward`) keeps, per token,
the two log-sum-exps and :math:`\sum_w u_w`; from them each (token chunk,
vocabulary tile) pair gives its ``dz`` (the gradient with respect to the
raw logits of the tile), and from ``dz`` the two gradients: the head's tile
``hidden_chunk^T @ dz`` (a sum over the tokens) and the hidden states'
chunk ``dz @ head_tile^T`` (a sum over the vocabulary). One loop nest can
finish only one of the two sums in its inner loop; ``hidden_grad`` says
which way the other is had:

* ``"accumulate"`` (one sweep, vocabulary tiles outer): each tile of the
  head's gradient is complete when its inner loop over the token chunks
  ends and is written once, in the head's dtype, into the gradient (no
  float32 ``[H, V]`` accumulator even for a bfloat16 head); the hidden
  states' gradient accumulates over the tiles in a float32 ``[N, H]``
  array, the one working buffer that grows with ``N``.
* ``"recompute"`` (two sweeps): the head's gradient as above, then a second
  sweep with the token chunks outer recomputes every tile's ``dz`` once
  more and finishes each chunk of the hidden states' gradient in a float32
  ``[token_chunk, H]`` buffer. The working memory depends on neither ``N``
  nor ``V``; the backward pass does two more matrix products per (chunk,
  tile) pair (the student's and the teachers' logits), four instead of six
  for a forward KL of one teacher.

Both give the same gradients (the same sums, in float32, of the same
products).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxkd.lm import _fused_kernel as kernel

HIDDEN_GRADS = ("accumulate", "recompute")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def fused(st, hs, ws, ht, wt, prm):
  """Per-token divergence ``[N]``; teachers get a zero gradient."""
  return kernel.forward(st, hs, ws, ht, wt, prm, with_slope=False)


def _fused_fwd(st, hs, ws, ht, wt, prm):
  per_token, stats = kernel.forward(st, hs, ws, ht, wt, prm, with_slope=True)
  return per_token, (hs, ws, ht, wt, prm, stats)


def _fused_bwd(st, residuals, cotangent):
  hs, ws, ht, wt, prm, (lse_s, lse_t, slope) = residuals
  dtype = prm.factor.dtype
  sz = kernel.sizes(st, hs, ws)
  lse_t = jnp.moveaxis(lse_t, 1, 0)  # [K, N].
  cotangent = cotangent.astype(dtype)
  zero = jnp.zeros((), dtype)
  chunks = jnp.arange(sz.chunks, dtype=jnp.int32)
  tiles = jnp.arange(sz.tiles, dtype=jnp.int32)

  def chunk_rows(i):
    """Chunk ``i``'s first row, its fresh rows and its slices."""
    row0, fresh_rows = kernel.window(i, sz.token_chunk, sz.tokens)

    def rows(x, axis=0):
      return lax.dynamic_slice_in_dim(x, row0, sz.token_chunk, axis=axis)

    # Rows shared with the chunk before were counted there: no cotangent.
    g_c = jnp.where(fresh_rows, rows(cotangent), zero)
    stats = (rows(lse_s), rows(lse_t, axis=1), rows(slope))
    return row0, fresh_rows, rows(hs), rows(ht, axis=1), g_c, stats

  def tile_dz(hs_c, ht_c, g_c, stats, fresh, ws_j, wt_j):
    """``dD/dz`` of one chunk and tile, zero on the tile's stale columns."""
    lse_s_c, lse_t_c, slope_c = stats
    zs = kernel.matmul(hs_c, ws_j, kernel.ROWS_BY_COLS, dtype)
    zt = kernel.matmul(ht_c, wt_j, kernel.TEACHERS, dtype)
    s, ds_dz = kernel.scaled(zs, st, prm)
    log_ps = s - lse_s_c[:, None]
    log_pt = kernel.scaled(zt, st, prm)[0] - lse_t_c[..., None]
    _, u = kernel.term_and_slope(st, log_ps, log_pt, prm)
    grad_s = g_c[:, None] * (u - jnp.exp(log_ps) * slope_c[:, None])
    return jnp.where(fresh[None, :], grad_s * ds_dz, zero)

  def hidden_part(dz, ws_j):
    # With 16-bit weights (hidden states), dz is rounded to their dtype and
    # multiplied with float32 accumulation, as in the forward pass: no
    # float32 copy of the head's tile (of the hidden chunk) is made.
    return kernel.matmul(kernel.like(dz, ws_j), ws_j, kernel.BY_COLS_T, dtype)

  def head_part(hs_c, dz):
    return kernel.matmul(hs_c, kernel.like(dz, hs_c), kernel.T_BY_ROWS, dtype)

  accumulate = st.hidden_grad == "accumulate"

  def tile_step(carry, j):
    """Tile ``j`` of the head's gradient (and, accumulating, ``dh``'s part)."""
    dh, dws = carry
    start, fresh, ws_j, wt_j = kernel.tile_heads(j, ws, wt, sz)

    def chunk_step(carry, i):
      dh, dws_j = carry
      row0, _, hs_c, ht_c, g_c, stats = chunk_rows(i)
      dz = tile_dz(hs_c, ht_c, g_c, stats, fresh, ws_j, wt_j)
      if accumulate:
        dh_c = lax.dynamic_slice_in_dim(dh, row0, sz.token_chunk, axis=0)
        dh = lax.dynamic_update_slice_in_dim(
            dh, dh_c + hidden_part(dz, ws_j), row0, axis=0
        )
      return (dh, dws_j + head_part(hs_c, dz)), None

    dws_j = kernel.varying(jnp.zeros(ws_j.shape, dtype), st)
    (dh, dws_j), _ = lax.scan(chunk_step, (dh, dws_j), chunks)
    # The last tile's columns shared with the tile before keep that tile's
    # gradient (here they hold zeros: dz was masked there).
    previous = lax.dynamic_slice_in_dim(dws, start, sz.vocab_chunk, axis=1)
    dws_j = jnp.where(fresh[None, :], dws_j.astype(dws.dtype), previous)
    dws = lax.dynamic_update_slice_in_dim(dws, dws_j, start, axis=1)
    return (dh, dws), None

  def hidden_chunk_step(dh, i):
    """Chunk ``i`` of the hidden states' gradient, summed over the tiles."""
    row0, fresh_rows, hs_c, ht_c, g_c, stats = chunk_rows(i)

    def step(dh_c, j):
      _, fresh, ws_j, wt_j = kernel.tile_heads(j, ws, wt, sz)
      dz = tile_dz(hs_c, ht_c, g_c, stats, fresh, ws_j, wt_j)
      return dh_c + hidden_part(dz, ws_j), None

    init = kernel.varying(jnp.zeros(hs_c.shape, dtype), st)
    dh_c, _ = lax.scan(step, init, tiles)
    if st.axis_name is not None:
      dh_c = lax.psum(dh_c, st.axis_name)
    # Rows shared with the chunk before keep that chunk's gradient.
    previous = lax.dynamic_slice_in_dim(dh, row0, sz.token_chunk, axis=0)
    dh_c = jnp.where(fresh_rows[:, None], dh_c.astype(dh.dtype), previous)
    return lax.dynamic_update_slice_in_dim(dh, dh_c, row0, axis=0), None

  dws = jnp.zeros(ws.shape, ws.dtype)
  if accumulate:
    init = kernel.varying((jnp.zeros(hs.shape, dtype), dws), st)
    (dh, dws), _ = lax.scan(tile_step, init, tiles)
    if st.axis_name is not None:
      dh = lax.psum(dh, st.axis_name)
    dh = dh.astype(hs.dtype)
  else:
    (_, dws), _ = lax.scan(tile_step, (None, kernel.varying(dws, st)), tiles)
    dh, _ = lax.scan(hidden_chunk_step, jnp.zeros(hs.shape, hs.dtype), chunks)
  return (
      dh,
      dws,
      jnp.zeros_like(ht),
      jnp.zeros_like(wt),
      jax.tree.map(jnp.zeros_like, prm),
  )


fused.defvjp(_fused_fwd, _fused_bwd)
