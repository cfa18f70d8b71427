"""ShuffleNetV2 for CIFAR (RepDistiller's ``ShuffleV2``), Flax linen (NHWC).

A 1x1 stem convolution to 24 channels (no pooling: CIFAR images are small),
three stages each made of one down-sampling block (stride 2) and ``3, 7, 3``
basic blocks, a 1x1 convolution to 1024 channels, global average pooling and a
linear classifier. A basic block splits its channels in two halves, passes the
first through and transforms the second (1x1 conv-BN-ReLU, 3x3 depthwise
conv-BN, 1x1 conv-BN-ReLU), concatenates them and shuffles the channels in two
groups; a down-sampling block transforms the whole input in two branches and
concatenates them.

The layer order, widths (``116, 232, 464, 1024`` for the net size 1 of
``ShuffleV2``), strides and bias-free convolutions follow
``models/ShuffleNetv2.py`` of RepDistiller, so the trainable parameter counts
are the PyTorch ones. The reference does not re-initialise its weights, so
here too convolutions and the classifier get PyTorch's default
initialisation (uniform on ``±1 / sqrt(fan_in)``).

Reference: Ma, Zhang, Zheng and Sun, `ShuffleNet V2: Practical Guidelines for
Efficient CNN Architecture Design <https://arxiv.org/abs/1807.11164>`_, ECCV
2018; Tian, Krishnan and Isola, `Contrastive Representation Distillation
<https://arxiv.org/abs/1910.10699>`_, ICLR 2020 (github.com/HobbitLong/
RepDistiller).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models import _layers

Dtype = Any

# Output channels (three stages, last convolution) and basic blocks per stage.
SHUFFLENETV2_CONFIGS: dict[float, dict[str, tuple[int, ...]]] = {
    0.2: {"widths": (40, 80, 160, 512), "blocks": (3, 3, 3)},
    0.3: {"widths": (40, 80, 160, 512), "blocks": (3, 7, 3)},
    0.5: {"widths": (48, 96, 192, 1024), "blocks": (3, 7, 3)},
    1.0: {"widths": (116, 232, 464, 1024), "blocks": (3, 7, 3)},
    1.5: {"widths": (176, 352, 704, 1024), "blocks": (3, 7, 3)},
    2.0: {"widths": (224, 488, 976, 2048), "blocks": (3, 7, 3)},
}


def channel_shuffle(x: jax.Array, groups: int = 2) -> jax.Array:
  """Interleaves the channel groups of an NHWC array.

  Channel ``g * (C / groups) + j`` moves to ``j * groups + g``: the NHWC form
  of the reference's ``view(N, g, C/g, H, W).permute(0, 2, 1, 3, 4)``.
  """
  *lead, channels = x.shape
  x = x.reshape(*lead, groups, channels // groups)
  return jnp.swapaxes(x, -1, -2).reshape(*lead, channels)


def _conv_bn(x, features, kernel_size, *, name, **kwargs) -> jax.Array:
  """``conv{name}``-``bn{name}`` with PyTorch's default conv init."""
  return _layers.conv_bn(
      x,
      features,
      kernel_size,
      kernel_init=_layers.torch_default_kernel_init,
      conv_name=f"conv{name}",
      bn_name=f"bn{name}",
      **kwargs,
  )


class ShuffleBasicBlock(nn.Module):
  """Split, transform the second half, concatenate, shuffle (stride 1)."""

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    kw = dict(train=train, dtype=self.dtype)
    half = x.shape[-1] // 2
    kept, y = x[..., :half], x[..., half:]
    width = y.shape[-1]
    y = _conv_bn(y, width, 1, name=1, **kw)
    y = _conv_bn(y, width, 3, padding=1, groups=width, relu=False, name=2, **kw)
    y = _conv_bn(y, width, 1, name=3, **kw)
    return channel_shuffle(jnp.concatenate([kept, y], axis=-1))


class ShuffleDownBlock(nn.Module):
  """Two stride-2 branches of ``features / 2`` channels, concatenated, shuffled.

  Attributes:
    features: Output channels.
    dtype: Compute dtype.
  """

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    kw = dict(train=train, dtype=self.dtype)
    width_in = x.shape[-1]
    mid = self.features // 2
    depthwise = dict(stride=2, padding=1, relu=False)
    # Left: 3x3 depthwise (stride 2)-BN, 1x1 conv-BN-ReLU.
    left = _conv_bn(x, width_in, 3, groups=width_in, name=1, **depthwise, **kw)
    left = _conv_bn(left, mid, 1, name=2, **kw)
    # Right: 1x1 conv-BN-ReLU, 3x3 depthwise (stride 2)-BN, 1x1 conv-BN-ReLU.
    right = _conv_bn(x, mid, 1, name=3, **kw)
    right = _conv_bn(right, mid, 3, groups=mid, name=4, **depthwise, **kw)
    right = _conv_bn(right, mid, 1, name=5, **kw)
    return channel_shuffle(jnp.concatenate([left, right], axis=-1))


class ShuffleNetV2(nn.Module):
  """CIFAR ShuffleNetV2 of RepDistiller.

  Attributes:
    net_size: A key of :data:`SHUFFLENETV2_CONFIGS` (1.0 for ``ShuffleV2``).
    num_classes: Number of output classes.
    dtype: Compute dtype (``jnp.bfloat16`` for mixed precision); parameters
      and BatchNorm statistics are float32 and the logits are returned in
      float32.

  ``__call__(x, train)`` takes NHWC images ``[batch, 32, 32, 3]`` and returns
  ``(logits, features)``: logits ``[batch, num_classes]`` and the features
  ``"stem"`` (``[batch, 32, 32, 24]``), ``"stage1"``, ``"stage2"``,
  ``"stage3"`` (``[batch, 16, 16, 116]``, ``[batch, 8, 8, 232]``,
  ``[batch, 4, 4, 464]`` for net size 1) and ``"embedding"``
  (``[batch, 1024]``), in the compute dtype.
  """

  net_size: float = 1.0
  num_classes: int = 100
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> _layers.Outputs:
    if self.net_size not in SHUFFLENETV2_CONFIGS:
      raise ValueError(
          f"ShuffleNetV2 net_size must be one of"
          f" {sorted(SHUFFLENETV2_CONFIGS)}, got {self.net_size!r}."
      )
    config = SHUFFLENETV2_CONFIGS[self.net_size]
    kw = dict(dtype=self.dtype)
    x = _conv_bn(_layers.image_input(self, x), 24, 1, name=1, train=train, **kw)
    features = {"stem": x}
    for stage, (width, blocks) in enumerate(
        zip(config["widths"][:3], config["blocks"]), start=1
    ):
      x = ShuffleDownBlock(width, name=f"layer{stage}_down", **kw)(x, train)
      for block in range(blocks):
        x = ShuffleBasicBlock(name=f"layer{stage}_{block}", **kw)(x, train)
      features[f"stage{stage}"] = x
    x = _conv_bn(x, config["widths"][3], 1, name=2, train=train, **kw)
    # The reference's avg_pool2d(4) is the global average for 32x32 inputs.
    head = _layers.torch_default_head(self.num_classes, name="linear", **kw)
    return _layers.classify(_layers.global_average_pool(x), features, head)


def shufflev2(*, num_classes: int, dtype: Dtype = jnp.float32) -> ShuffleNetV2:
  """RepDistiller's ``ShuffleV2`` (net size 1) as a linen module."""
  return ShuffleNetV2(net_size=1.0, num_classes=num_classes, dtype=dtype)
