"""A small decoder-only transformer language model, Flax linen.

Token embedding, ``num_layers`` pre-norm blocks (``x + Attn(RMSNorm(x))``,
``x + MLP(RMSNorm(x))``), a final RMSNorm and a linear output head over the
vocabulary, tied to the embedding (``logits = h E^T``) or untied. Attention is
causal, multi-head, with rotary position embeddings (RoPE) on the queries and
keys and optionally fewer key/value heads than query heads (grouped-query
attention). The MLP is SwiGLU (``W2 (silu(W1 x) * W3 x)``) or exact GELU. No
projection has a bias. There is no absolute position embedding: with RoPE the
attention scores depend only on relative offsets, so the model is unchanged
when every position is shifted by a constant.

The input is ``[batch, length]`` integer tokens, or a mapping
``{"tokens": ..., "mask": ..., "positions": ...}`` (``"mask"`` and
``"positions"`` optional), which is how a padding mask travels through the
:class:`~jaxkd.models.Model` contract (``apply(params, state, x, ...)`` takes a
single ``x``). ``mask`` (``[batch, length]``, ``True`` for real tokens) removes
padded keys from every query's attention; each query may always attend to
itself, so a padded query's row stays finite (its outputs are meaningless and
should be masked by the loss). Left or right padding both work: with RoPE only
relative positions matter.

Head weights: the output layer's ``[hidden_size, vocab_size]`` kernel is
``params["head"]["kernel"]`` when untied and ``params["embed"]["embedding"].T``
when tied; :func:`output_kernel` returns whichever applies, so that a fused
output-layer loss can consume ``features["final_hidden"]`` and the kernel
without materialising the logits.

Initialisation: normal with standard deviation 0.02 for the embedding and
every kernel (GPT-2); RMSNorm scales start at one. RMSNorm, RoPE, the
attention scores and their softmax run in float32 whatever the compute dtype.

References: Vaswani et al., `Attention Is All You Need
<https://arxiv.org/abs/1706.03762>`_, 2017; Zhang and Sennrich, `Root Mean
Square Layer Normalization <https://arxiv.org/abs/1910.07467>`_, 2019; Su et
al., `RoFormer: Enhanced Transformer with Rotary Position Embedding
<https://arxiv.org/abs/2104.09864>`_, 2021; Shazeer, `GLU Variants Improve
Transformer <https://arxiv.org/abs/2002.05202>`_, 2020; Ainslie et al., `GQA:
Training Generalized Multi-Query Transformer Models from Multi-Head
Checkpoints <https://arxiv.org/abs/2305.13245>`_, 2023.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models import _layers

__all__ = [
    "RMSNorm",
    "TransformerLM",
    "apply_rope",
    "lm_student",
    "lm_teacher",
    "output_kernel",
]

Dtype = Any

_init = nn.initializers.normal(0.02)
_MLP_KINDS = ("swiglu", "gelu")


class RMSNorm(nn.Module):
  r"""Root-mean-square normalisation over the last axis, in float32.

  .. math::
    y = \frac{x}{\sqrt{\frac{1}{D}\sum_d x_d^2 + \epsilon}} \odot g

  Attributes:
    epsilon: :math:`\epsilon`, added to the mean square.
    dtype: The output dtype.
    param_dtype: The dtype of the scale :math:`g` (initialised to ones).
  """

  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param(
        "scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype
    )
    x = x.astype(jnp.float32)
    mean_square = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    y = x * jax.lax.rsqrt(mean_square + self.epsilon)
    scale = scale.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
    return (y * scale).astype(self.dtype)


def apply_rope(
    x: jax.Array, positions: jax.Array, *, base: float = 10000.0
) -> jax.Array:
  r"""Rotary position embedding of queries or keys, in float32.

  Feature pairs :math:`(x_i, x_{i + d/2})` of each head are rotated by the
  angle :math:`p\,\theta_i`, :math:`\theta_i = \text{base}^{-2i/d}`, so that
  :math:`\langle R_m q, R_n k\rangle` depends on :math:`m - n` only.

  Args:
    x: ``[batch, length, heads, head_dim]`` with an even ``head_dim``.
    positions: ``[batch, length]`` positions (integers).
    base: The frequency base.

  Returns:
    The rotated ``x``, float32, same shape.
  """
  half = x.shape[-1] // 2
  exponents = jnp.arange(half, dtype=jnp.float32) / half
  inverse_frequency = jnp.asarray(base, jnp.float32) ** -exponents
  angles = (
      positions.astype(jnp.float32)[..., None] * inverse_frequency[None, None]
  )
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x = x.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _dense(features, *, axis=-1, dtype, param_dtype, name) -> nn.DenseGeneral:
  return nn.DenseGeneral(
      features,
      axis=axis,
      use_bias=False,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=_init,
      name=name,
  )


class CausalSelfAttention(nn.Module):
  """Causal multi-head (optionally grouped-query) attention with RoPE.

  ``__call__(x, positions, allowed)`` returns ``(out, scores)``: the output
  ``[batch, length, width]`` and the float32 scaled scores
  ``[batch, heads, length, length]`` with ``-inf`` where ``allowed`` is
  ``False``.
  """

  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_base: float
  dtype: Dtype
  param_dtype: Dtype

  @nn.compact
  def __call__(self, x, positions, allowed):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q = _dense((self.num_heads, self.head_dim), name="query", **kw)(x)
    k = _dense((self.num_kv_heads, self.head_dim), name="key", **kw)(x)
    v = _dense((self.num_kv_heads, self.head_dim), name="value", **kw)(x)
    q = apply_rope(q, positions, base=self.rope_base)
    k = apply_rope(k, positions, base=self.rope_base)
    group = self.num_heads // self.num_kv_heads
    k = jnp.repeat(k, group, axis=2)
    v = jnp.repeat(v, group, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(
        jnp.float32(self.head_dim)
    )
    scores = jnp.where(allowed, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v)
    out = _dense(x.shape[-1], axis=(-2, -1), name="out", **kw)(out)
    return out, scores


class MLP(nn.Module):
  """SwiGLU (``W2 (silu(W1 x) * W3 x)``) or exact-GELU MLP, no biases."""

  hidden_dim: int
  kind: str
  dtype: Dtype
  param_dtype: Dtype

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = _dense(self.hidden_dim, name="up", **kw)(x)
    if self.kind == "swiglu":
      h = nn.silu(_dense(self.hidden_dim, name="gate", **kw)(x)) * h
    else:
      h = nn.gelu(h, approximate=False)
    return _dense(x.shape[-1], name="down", **kw)(h)


class TransformerLM(nn.Module):
  """Decoder-only transformer language model.

  Attributes:
    vocab_size: Vocabulary size ``V`` (256 for bytes).
    num_layers: Number of blocks.
    hidden_size: Model width ``D``.
    num_heads: Query heads; must divide ``hidden_size``, and the head dim
      ``D / num_heads`` must be even (RoPE).
    num_kv_heads: Key/value heads (grouped-query attention); must divide
      ``num_heads``. ``None`` means ``num_heads`` (multi-head attention).
    mlp_dim: Hidden width of the MLP; ``None`` means ``4 * hidden_size``.
    mlp: ``"swiglu"`` (three matrices) or ``"gelu"`` (two).
    tie_embeddings: Whether the output head is the transposed embedding.
    rope_base: RoPE frequency base.
    norm_epsilon: RMSNorm epsilon.
    dropout_rate: Dropout on each residual branch (training only; draws from
      the ``"dropout"`` stream).
    return_attention: Also return the attention features (big: ``[B, H, L,
      L]`` per block).
    dtype: Compute dtype (``jnp.bfloat16`` for mixed precision); the logits
      are float32.
    param_dtype: Parameter dtype.

  ``__call__(x, train=False)`` takes ``[batch, length]`` integer tokens or a
  mapping with ``"tokens"`` and optional ``"mask"`` (``[batch, length]``
  bool) and ``"positions"`` (``[batch, length]`` ints; ``arange`` by
  default). It returns ``(logits, features)``: float32 logits ``[batch,
  length, vocab_size]`` (position ``t`` predicts token ``t + 1``) and, in the
  compute dtype, ``"embedding"`` (token embeddings ``[B, L, D]``),
  ``"block_0"`` ... ``"block_{num_layers - 1}"`` (each block's output
  ``[B, L, D]``, 0-based) and ``"final_hidden"`` (after the final norm,
  ``[B, L, D]``; ``logits = final_hidden @ output_kernel(params)``). With
  ``return_attention``, also float32 ``"attention_{i}"`` (probabilities
  ``[B, heads, L, L]``) and ``"attention_logits_{i}"`` (the scaled scores
  ``q.k / sqrt(head_dim)``, ``-inf`` at disallowed keys: what
  :func:`jaxkd.losses.attention_kl_loss` takes).
  """

  vocab_size: int = 256
  num_layers: int = 2
  hidden_size: int = 64
  num_heads: int = 4
  num_kv_heads: int | None = None
  mlp_dim: int | None = None
  mlp: str = "swiglu"
  tie_embeddings: bool = True
  rope_base: float = 10000.0
  norm_epsilon: float = 1e-6
  dropout_rate: float = 0.0
  return_attention: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _check(self) -> tuple[int, int]:
    if self.mlp not in _MLP_KINDS:
      raise ValueError(
          f"TransformerLM mlp must be 'swiglu' or 'gelu', got {self.mlp!r}."
      )
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"TransformerLM num_heads ({self.num_heads}) must divide"
          f" hidden_size ({self.hidden_size})."
      )
    head_dim = self.hidden_size // self.num_heads
    if head_dim % 2:
      raise ValueError(
          "TransformerLM head dim hidden_size / num_heads must be even for"
          f" RoPE, got {head_dim}."
      )
    kv_heads = self.num_kv_heads or self.num_heads
    if self.num_heads % kv_heads:
      raise ValueError(
          f"TransformerLM num_kv_heads ({kv_heads}) must divide num_heads"
          f" ({self.num_heads})."
      )
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(
          f"TransformerLM dropout_rate must be in [0, 1), got"
          f" {self.dropout_rate}."
      )
    return head_dim, kv_heads

  @nn.compact
  def __call__(
      self, x: Any, train: bool = False
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    head_dim, kv_heads = self._check()
    tokens, mask, positions = _parse_input(x)
    batch, length = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    diagonal = jnp.eye(length, dtype=jnp.bool_)
    allowed = jnp.tril(jnp.ones((length, length), jnp.bool_))[None, None]
    if mask is not None:
      allowed = allowed & (mask[:, None, None, :] | diagonal[None, None])
    embed = nn.Embed(
        self.vocab_size,
        self.hidden_size,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        embedding_init=_init,
        name="embed",
    )
    h = embed(tokens)
    features = {"embedding": h}
    norm = dict(
        epsilon=self.norm_epsilon, dtype=self.dtype,
        param_dtype=self.param_dtype,
    )
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dropout = nn.Dropout(self.dropout_rate, deterministic=not train)
    for i in range(self.num_layers):
      y = RMSNorm(**norm, name=f"block_{i}_attention_norm")(h)
      y, scores = CausalSelfAttention(
          num_heads=self.num_heads, num_kv_heads=kv_heads, head_dim=head_dim,
          rope_base=self.rope_base, name=f"block_{i}_attention", **kw,
      )(y, positions, allowed)
      h = h + dropout(y)
      y = RMSNorm(**norm, name=f"block_{i}_mlp_norm")(h)
      y = MLP(
          self.mlp_dim or 4 * self.hidden_size, self.mlp,
          name=f"block_{i}_mlp", **kw,
      )(y)
      h = h + dropout(y)
      features[f"block_{i}"] = h
      if self.return_attention:
        features[f"attention_{i}"] = jax.nn.softmax(scores, axis=-1)
        features[f"attention_logits_{i}"] = scores
    h = RMSNorm(**norm, name="final_norm")(h)
    features["final_hidden"] = h
    if self.tie_embeddings:
      logits = embed.attend(h)
    else:
      logits = nn.Dense(
          self.vocab_size, use_bias=False, kernel_init=_init, name="head",
          **kw,
      )(h)
    return _layers.to_float32_logits(logits), features


def _parse_input(x: Any):
  """``(tokens, mask, positions)`` from an array or a mapping; checked."""
  if isinstance(x, Mapping):
    unknown = set(x) - {"tokens", "mask", "positions"}
    if "tokens" not in x or unknown:
      raise ValueError(
          "TransformerLM input mapping must have 'tokens' and optionally"
          f" 'mask' and 'positions', got keys {sorted(x)}."
      )
    tokens, mask, positions = x["tokens"], x.get("mask"), x.get("positions")
  else:
    tokens, mask, positions = x, None, None
  tokens = jnp.asarray(tokens)
  if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(
        "TransformerLM expects integer tokens [batch, length], got shape"
        f" {tuple(tokens.shape)} and dtype {tokens.dtype}."
    )
  if mask is not None:
    mask = jnp.asarray(mask)
    if mask.shape != tokens.shape or mask.dtype != jnp.bool_:
      raise ValueError(
          "TransformerLM `mask` must be a boolean [batch, length] array like"
          f" the tokens {tuple(tokens.shape)}, got shape {tuple(mask.shape)}"
          f" and dtype {mask.dtype}."
      )
  if positions is not None:
    positions = jnp.asarray(positions)
    if positions.shape != tokens.shape or not jnp.issubdtype(
        positions.dtype, jnp.integer
    ):
      raise ValueError(
          "TransformerLM `positions` must be an integer [batch, length] array"
          f" like the tokens {tuple(tokens.shape)}, got shape"
          f" {tuple(positions.shape)} and dtype {positions.dtype}."
      )
  return tokens, mask, positions


def output_kernel(params: Mapping[str, Any]) -> jax.Array:
  """The output layer's ``[hidden_size, vocab_size]`` kernel.

  ``params["head"]["kernel"]`` for an untied :class:`TransformerLM`, the
  transposed embedding ``params["embed"]["embedding"].T`` for a tied one; in
  both cases ``logits = features["final_hidden"] @ output_kernel(params)``.

  Args:
    params: A :class:`TransformerLM`'s ``params``.

  Returns:
    The kernel, ``[hidden_size, vocab_size]``, in the parameter dtype.
  """
  if "head" in params:
    return params["head"]["kernel"]
  return params["embed"]["embedding"].T


def lm_teacher(*, num_classes: int = 256, dtype: Dtype = jnp.float32):
  """Teacher LM: 4 layers, width 128, 4 heads, SwiGLU 512, tied head.

  ``num_classes`` is the vocabulary size (256 for bytes).
  """
  return TransformerLM(
      vocab_size=num_classes, num_layers=4, hidden_size=128, num_heads=4,
      mlp_dim=512, dtype=dtype,
  )


def lm_student(*, num_classes: int = 256, dtype: Dtype = jnp.float32):
  """Student LM: 2 layers, width 64, 4 heads, SwiGLU 256, tied head.

  ``num_classes`` is the vocabulary size (256 for bytes).
  """
  return TransformerLM(
      vocab_size=num_classes, num_layers=2, hidden_size=64, num_heads=4,
      mlp_dim=256, dtype=dtype,
  )
