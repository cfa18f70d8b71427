"""A small Vision Transformer for 32x32 and 28x28 images, Flax linen (NHWC).

Non-overlapping ``patch_size`` x ``patch_size`` patches are embedded by a
strided convolution, a learned position embedding is added (with a class token
in front when ``pooling="cls"``), and ``depth`` pre-norm transformer blocks
follow (``x + MHSA(LN(x))``, ``x + MLP(LN(x))``, MLP width
``mlp_ratio * hidden_size``, exact GELU). A final LayerNorm precedes the
pooling (the class token, or the mean of the patch tokens) and a linear head.
The layout and parameter count are those of ``timm``'s ``VisionTransformer``
with the same sizes (LayerNorm epsilon ``1e-6``, biased projections).

``vit_tiny`` has the widths of DeiT-Tiny (hidden size 192, 12 blocks, 3 heads,
MLP 768) with 4x4 patches: 64 patches for a 32x32 image, 49 for 28x28.

Initialisation: truncated normal (standard deviation 0.02, cut at two standard
deviations) for every dense kernel, the position embedding and the class
token; zero biases; LeCun normal for the patch embedding (as in the JAX ViT).
LayerNorms run in float32 whatever the compute dtype.

References: Dosovitskiy et al., `An Image is Worth 16x16 Words: Transformers
for Image Recognition at Scale <https://arxiv.org/abs/2010.11929>`_, ICLR
2021; Touvron et al., `Training data-efficient image transformers &
distillation through attention <https://arxiv.org/abs/2012.12877>`_, ICML
2021.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models import _layers

Dtype = Any

_trunc_normal = nn.initializers.truncated_normal(0.02)


def _dense(features: int, *, dtype: Dtype, name: str) -> nn.Dense:
  return _layers.dense(
      features, kernel_init=_trunc_normal, dtype=dtype, name=name
  )


class TransformerBlock(nn.Module):
  """Pre-norm block: ``x + MHSA(LN(x))`` then ``x + MLP(LN(x))``.

  Attributes:
    num_heads: Attention heads.
    mlp_dim: Hidden width of the MLP.
    dropout_rate: Dropout after the attention projection and in the MLP.
    attention_dropout_rate: Dropout on the attention weights.
    dtype: Compute dtype.
  """

  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    width = x.shape[-1]
    y = _layers.layer_norm(epsilon=1e-6, dtype=self.dtype, name="norm1")(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=_trunc_normal,
        bias_init=nn.initializers.zeros,
        dropout_rate=self.attention_dropout_rate,
        deterministic=not train,
        name="attention",
    )(y, y)
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    x = x + y
    y = _layers.layer_norm(epsilon=1e-6, dtype=self.dtype, name="norm2")(x)
    y = _dense(self.mlp_dim, dtype=self.dtype, name="mlp_fc1")(y)
    # Exact (erf) GELU, as torch.nn.GELU; Flax's default is the tanh form.
    y = nn.gelu(y, approximate=False)
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = _dense(width, dtype=self.dtype, name="mlp_fc2")(y)
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    return x + y


class ViT(nn.Module):
  """Vision Transformer for small images.

  Attributes:
    num_classes: Number of output classes.
    patch_size: Side of the square patches; must divide the image sides.
    hidden_size: Token width.
    depth: Number of transformer blocks.
    num_heads: Attention heads (must divide ``hidden_size``).
    mlp_ratio: MLP width as a multiple of ``hidden_size``.
    pooling: ``"cls"`` (a class token, read after the last block) or
      ``"mean"`` (no class token; mean of the patch tokens).
    dropout_rate: Dropout on the embeddings, after attention and in the MLPs.
    attention_dropout_rate: Dropout on the attention weights.
    dtype: Compute dtype (``jnp.bfloat16`` for mixed precision); parameters
      are float32 and the logits are returned in float32.

  ``__call__(x, train)`` takes NHWC images ``[batch, height, width,
  channels]`` and returns ``(logits, features)``: logits
  ``[batch, num_classes]`` and the features ``"stage1"`` ...
  ``"stage{depth}"`` (the tokens after each block, ``[batch, tokens,
  hidden_size]`` with ``tokens = patches + 1`` for class-token pooling) and
  ``"embedding"`` (``[batch, hidden_size]``, the pooled, normalised vector
  fed to the head), in the compute dtype.
  """

  num_classes: int = 10
  patch_size: int = 4
  hidden_size: int = 192
  depth: int = 12
  num_heads: int = 3
  mlp_ratio: int = 4
  pooling: str = "cls"
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> _layers.Outputs:
    if self.pooling not in ("cls", "mean"):
      raise ValueError(
          f"ViT pooling must be 'cls' or 'mean', got {self.pooling!r}."
      )
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"ViT num_heads ({self.num_heads}) must divide hidden_size"
          f" ({self.hidden_size})."
      )
    x = _layers.image_input(self, x)
    if x.shape[1] % self.patch_size or x.shape[2] % self.patch_size:
      raise ValueError(
          f"ViT patch_size {self.patch_size} must divide the image height and"
          f" width, got images of shape {tuple(x.shape)}."
      )
    x = nn.Conv(
        self.hidden_size,
        (self.patch_size, self.patch_size),
        strides=(self.patch_size, self.patch_size),
        padding="VALID",
        dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.initializers.lecun_normal(),
        bias_init=nn.initializers.zeros,
        name="patch_embedding",
    )(x)
    batch = x.shape[0]
    x = x.reshape(batch, -1, self.hidden_size)
    if self.pooling == "cls":
      cls = self.param(
          "cls_token", _trunc_normal, (1, 1, self.hidden_size), jnp.float32
      )
      cls = jnp.broadcast_to(
          cls.astype(self.dtype), (batch, 1, self.hidden_size)
      )
      x = jnp.concatenate([cls, x], axis=1)
    position = self.param(
        "position_embedding",
        _trunc_normal,
        (1, x.shape[1], self.hidden_size),
        jnp.float32,
    )
    x = x + position.astype(self.dtype)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    features = {}
    for block in range(1, self.depth + 1):
      x = TransformerBlock(
          num_heads=self.num_heads,
          mlp_dim=self.mlp_ratio * self.hidden_size,
          dropout_rate=self.dropout_rate,
          attention_dropout_rate=self.attention_dropout_rate,
          dtype=self.dtype,
          name=f"block{block}",
      )(x, train)
      features[f"stage{block}"] = x
    x = _layers.layer_norm(epsilon=1e-6, dtype=self.dtype, name="norm")(x)
    x = x[:, 0] if self.pooling == "cls" else jnp.mean(x, axis=1)
    head = _dense(self.num_classes, dtype=self.dtype, name="head")
    return _layers.classify(x, features, head)


def vit_tiny(*, num_classes: int, dtype: Dtype = jnp.float32) -> ViT:
  """ViT with DeiT-Tiny widths (192, 12 blocks, 3 heads) and 4x4 patches."""
  return ViT(
      num_classes=num_classes,
      patch_size=4,
      hidden_size=192,
      depth=12,
      num_heads=3,
      mlp_ratio=4,
      pooling="cls",
      dtype=dtype,
  )
