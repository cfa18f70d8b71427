"""MobileNetV2 for CIFAR (RepDistiller's ``mobile_half``), Flax linen (NHWC).

A stride-2 3x3 stem, seven groups of inverted residual blocks (expansion
``t``, widths ``16, 24, 32, 64, 96, 160, 320`` times the width multiplier,
``1, 2, 3, 4, 3, 3, 1`` blocks, first-block strides ``1, 1, 2, 2, 1, 2, 1``),
a 1x1 convolution to 1280 channels, global average pooling and a linear
classifier. Every inverted residual block has the 1x1 expansion convolution,
also in the first group where ``t = 1`` (unlike torchvision's MobileNetV2), as
in the reference; the residual connection is used when the stride is 1 and the
widths agree.

The layer order, widths, strides, bias-free convolutions and initialisation
(Kaiming normal ``fan_out`` convolutions, ``normal(0, 0.01)`` classifier with
zero bias) follow ``models/mobilenetv2.py`` of RepDistiller, so the trainable
parameter counts are the PyTorch ones.

Reference: Sandler, Howard, Zhu, Zhmoginov and Chen, `MobileNetV2: Inverted
Residuals and Linear Bottlenecks <https://arxiv.org/abs/1801.04381>`_, CVPR
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

# (expansion or None for "the model's", width, blocks, first stride) per group.
_GROUPS = (
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
)
# The reference records its features after groups 2, 3, 5 and 7.
_STAGE_AFTER_GROUP = {2: "stage1", 3: "stage2", 5: "stage3", 7: "stage4"}


class InvertedResidual(nn.Module):
  """1x1 expansion, 3x3 depthwise, 1x1 linear projection, each with BN.

  Attributes:
    features: Output channels.
    stride: Stride of the depthwise convolution.
    expansion: Expansion factor ``t`` of the hidden width.
    dtype: Compute dtype.
  """

  features: int
  stride: int
  expansion: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    kw = dict(train=train, dtype=self.dtype)
    hidden = x.shape[-1] * self.expansion
    y = _layers.conv_bn(
        x, hidden, 1, conv_name="expand_conv", bn_name="expand_bn", **kw
    )
    y = _layers.conv_bn(
        y, hidden, 3, stride=self.stride, padding=1, groups=hidden,
        conv_name="depthwise_conv", bn_name="depthwise_bn", **kw,
    )
    y = _layers.conv_bn(
        y, self.features, 1, relu=False,
        conv_name="project_conv", bn_name="project_bn", **kw,
    )
    if self.stride == 1 and x.shape[-1] == self.features:
      y = x + y
    return y


class MobileNetV2(nn.Module):
  """CIFAR MobileNetV2 of RepDistiller (``mobilenetv2_T_w``).

  Attributes:
    expansion: Expansion factor ``T`` of groups 2-7 (6 in ``mobile_half``).
    width_multiplier: Multiplies the group widths (0.5 in ``mobile_half``);
      the stem has ``int(32 * width_multiplier)`` channels and the last
      convolution ``1280`` (``int(1280 * width_multiplier)`` above 1).
    num_classes: Number of output classes.
    dtype: Compute dtype (``jnp.bfloat16`` for mixed precision); parameters
      and BatchNorm statistics are float32 and the logits are returned in
      float32.

  ``__call__(x, train)`` takes NHWC images ``[batch, 32, 32, 3]`` and returns
  ``(logits, features)``: logits ``[batch, num_classes]`` and the features
  ``"stem"`` (``[batch, 16, 16, 16]`` for ``mobile_half``), ``"stage1"`` ...
  ``"stage4"`` (the outputs of groups 2, 3, 5 and 7, the reference's
  ``f1`` ... ``f4``: ``[batch, 16, 16, 12]``, ``[batch, 8, 8, 16]``,
  ``[batch, 4, 4, 48]``, ``[batch, 2, 2, 160]``) and ``"embedding"``
  (``[batch, 1280]``), in the compute dtype.
  """

  expansion: int = 6
  width_multiplier: float = 0.5
  num_classes: int = 100
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> _layers.Outputs:
    if self.width_multiplier <= 0:
      raise ValueError(
          "MobileNetV2 width_multiplier must be > 0, got"
          f" {self.width_multiplier}."
      )
    kw = dict(train=train, dtype=self.dtype)
    x = _layers.conv_bn(
        _layers.image_input(self, x), int(32 * self.width_multiplier), 3,
        stride=2, padding=1, conv_name="conv1", bn_name="bn1", **kw,
    )
    features = {"stem": x}
    for group, (expansion, width, blocks, stride) in enumerate(
        _GROUPS, start=1
    ):
      for block in range(blocks):
        x = InvertedResidual(
            int(width * self.width_multiplier),
            stride=stride if block == 0 else 1,
            expansion=expansion or self.expansion,
            name=f"group{group}_{block}",
            dtype=self.dtype,
        )(x, train)
      if group in _STAGE_AFTER_GROUP:
        features[_STAGE_AFTER_GROUP[group]] = x
    last_width = (
        int(1280 * self.width_multiplier) if self.width_multiplier > 1 else 1280
    )
    x = _layers.conv_bn(
        x, last_width, 1, conv_name="conv2", bn_name="bn2", **kw
    )
    # The reference's AvgPool2d(2, ceil_mode=True) on the 2x2 map of a 32x32
    # input is the global average.
    head = _layers.small_normal_dense(
        self.num_classes, dtype=self.dtype, name="classifier"
    )
    return _layers.classify(_layers.global_average_pool(x), features, head)


def mobile_half(*, num_classes: int, dtype: Dtype = jnp.float32) -> MobileNetV2:
  """MobileNetV2, ``T = 6``, width 0.5 (RepDistiller's ``mobile_half``)."""
  return MobileNetV2(
      expansion=6, width_multiplier=0.5, num_classes=num_classes, dtype=dtype
  )
