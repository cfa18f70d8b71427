"""CIFAR ResNets of the CRD / RepDistiller benchmark, in Flax linen (NHWC).

A 3x3 stem convolution, three stages of ``n = (depth - 2) / 6`` basic blocks
(strides 1, 2, 2), global average pooling and a linear classifier. Widths are
``[16, 16, 32, 64]`` (stem, stage 1, 2, 3) for ``resnet8`` ... ``resnet110``
and ``[32, 64, 128, 256]`` for ``resnet8x4`` and ``resnet32x4``. A stage whose
first block changes the stride or the width has a projection shortcut
(1x1 convolution + BatchNorm), as in the reference; the other shortcuts are
identities.

Layer order, widths, strides, padding, bias-free convolutions before every
BatchNorm, the biased classifier and the initialisation (Kaiming normal,
``fan_out``, for convolutions; PyTorch's default for the classifier) follow
``models/resnet.py`` of RepDistiller, so the trainable parameter counts are the
published ones (``resnet8x4``: 1,233,540 with 100 classes).

Reference: Tian, Krishnan and Isola, `Contrastive Representation Distillation
<https://arxiv.org/abs/1910.10699>`_, ICLR 2020 (github.com/HobbitLong/
RepDistiller); He, Zhang, Ren and Sun, `Deep Residual Learning for Image
Recognition <https://arxiv.org/abs/1512.03385>`_, CVPR 2016.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models import _layers

Dtype = Any


class BasicBlock(nn.Module):
  """Two 3x3 conv-BN layers with a residual connection, ReLU after the sum.

  Attributes:
    features: Output channels.
    stride: Stride of the first convolution (and of the projection shortcut).
    dtype: Compute dtype.
  """

  features: int
  stride: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    kw = dict(train=train, dtype=self.dtype)
    y = _layers.conv_bn(
        x, self.features, 3, stride=self.stride, padding=1,
        conv_name="conv1", bn_name="bn1", **kw,
    )
    y = _layers.conv_bn(
        y, self.features, 3, padding=1, relu=False,
        conv_name="conv2", bn_name="bn2", **kw,
    )
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = _layers.conv_bn(
          x, self.features, 1, stride=self.stride, relu=False,
          conv_name="downsample_conv", bn_name="downsample_bn", **kw,
      )
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """CIFAR ResNet of depth ``6n + 2`` with basic blocks.

  Attributes:
    depth: Total depth, ``6n + 2`` (8, 14, 20, 32, 44, 56, 110, ...).
    widths: Four channel counts: stem, stage 1, stage 2, stage 3.
    num_classes: Number of output classes.
    dtype: Compute dtype (``jnp.bfloat16`` for mixed precision); parameters
      and BatchNorm statistics are float32 and the logits are returned in
      float32.

  ``__call__(x, train)`` takes NHWC images ``[batch, height, width, 3]``
  (32x32 in the reference) and returns ``(logits, features)``: logits
  ``[batch, num_classes]`` and the features ``"stem"`` (after the stem's
  ReLU), ``"stage1"``, ``"stage2"``, ``"stage3"`` (after each stage's last
  ReLU; ``[batch, 32, 32, w1]``, ``[batch, 16, 16, w2]``, ``[batch, 8, 8, w3]``
  for 32x32 inputs) and ``"embedding"`` (``[batch, w3]``, the pooled vector
  fed to the classifier), all in the compute dtype.
  """

  depth: int
  widths: Sequence[int] = (16, 16, 32, 64)
  num_classes: int = 10
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> _layers.Outputs:
    blocks_per_stage = _layers.blocks_per_stage(self, self.depth, offset=2)
    if len(self.widths) != 4:
      raise ValueError(
          f"ResNet widths must hold 4 channel counts (stem, stage 1-3), got"
          f" {tuple(self.widths)}."
      )
    x = _layers.conv_bn(
        _layers.image_input(self, x), self.widths[0], 3, padding=1,
        train=train, conv_name="conv1", bn_name="bn1", dtype=self.dtype,
    )
    features = {"stem": x}
    for stage, (width, stride) in enumerate(
        zip(self.widths[1:], (1, 2, 2)), start=1
    ):
      for block in range(blocks_per_stage):
        x = BasicBlock(
            width,
            stride=stride if block == 0 else 1,
            name=f"layer{stage}_{block}",
            dtype=self.dtype,
        )(x, train)
      features[f"stage{stage}"] = x
    # The reference's AvgPool2d(8) is the global average for 32x32 inputs.
    head = _layers.torch_default_head(
        self.num_classes, dtype=self.dtype, name="fc"
    )
    return _layers.classify(_layers.global_average_pool(x), features, head)


_NARROW = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


def resnet8(*, num_classes: int, dtype: Dtype = jnp.float32) -> ResNet:
  """RepDistiller's ``resnet8``: depth 8, widths [16, 16, 32, 64]."""
  return ResNet(8, _NARROW, num_classes=num_classes, dtype=dtype)


def resnet14(*, num_classes: int, dtype: Dtype = jnp.float32) -> ResNet:
  """RepDistiller's ``resnet14``: depth 14, widths [16, 16, 32, 64]."""
  return ResNet(14, _NARROW, num_classes=num_classes, dtype=dtype)


def resnet20(*, num_classes: int, dtype: Dtype = jnp.float32) -> ResNet:
  """RepDistiller's ``resnet20``: depth 20, widths [16, 16, 32, 64]."""
  return ResNet(20, _NARROW, num_classes=num_classes, dtype=dtype)


def resnet32(*, num_classes: int, dtype: Dtype = jnp.float32) -> ResNet:
  """RepDistiller's ``resnet32``: depth 32, widths [16, 16, 32, 64]."""
  return ResNet(32, _NARROW, num_classes=num_classes, dtype=dtype)


def resnet44(*, num_classes: int, dtype: Dtype = jnp.float32) -> ResNet:
  """RepDistiller's ``resnet44``: depth 44, widths [16, 16, 32, 64]."""
  return ResNet(44, _NARROW, num_classes=num_classes, dtype=dtype)


def resnet56(*, num_classes: int, dtype: Dtype = jnp.float32) -> ResNet:
  """RepDistiller's ``resnet56``: depth 56, widths [16, 16, 32, 64]."""
  return ResNet(56, _NARROW, num_classes=num_classes, dtype=dtype)


def resnet110(*, num_classes: int, dtype: Dtype = jnp.float32) -> ResNet:
  """RepDistiller's ``resnet110``: depth 110, widths [16, 16, 32, 64]."""
  return ResNet(110, _NARROW, num_classes=num_classes, dtype=dtype)


def resnet8x4(*, num_classes: int, dtype: Dtype = jnp.float32) -> ResNet:
  """RepDistiller's ``resnet8x4``: depth 8, widths [32, 64, 128, 256]."""
  return ResNet(8, _WIDE, num_classes=num_classes, dtype=dtype)


def resnet32x4(*, num_classes: int, dtype: Dtype = jnp.float32) -> ResNet:
  """RepDistiller's ``resnet32x4``: depth 32, widths [32, 64, 128, 256]."""
  return ResNet(32, _WIDE, num_classes=num_classes, dtype=dtype)
