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
    kw = dict(dtype=self.dtype)
    hidden = x.shape[-1] * self.expansion
    y = _layers.conv(hidden, 1, name="expand_conv", **kw)(x)
    y = nn.relu(_layers.batch_norm(train=train, name="expand_bn", **kw)(y))
    y = _layers.conv(
        hidden,
        3,
        stride=self.stride,
        padding=1,
        groups=hidden,
        name="depthwise_conv",
        **kw,
    )(y)
    y = nn.relu(_layers.batch_norm(train=train, name="depthwise_bn", **kw)(y))
    y = _layers.conv(self.features, 1, name="project_conv", **kw)(y)
    y = _layers.batch_norm(train=train, name="project_bn", **kw)(y)
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
  def __call__(
      self, x: jax.Array, train: bool
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    if self.width_multiplier <= 0:
      raise ValueError(
          "MobileNetV2 width_multiplier must be > 0, got"
          f" {self.width_multiplier}."
      )
    _layers.check_image("MobileNetV2", x)
    kw = dict(dtype=self.dtype)
    x = _layers.to_compute_dtype(x, self.dtype)
    x = _layers.conv(
        int(32 * self.width_multiplier), 3, stride=2, padding=1, name="conv1",
        **kw,
    )(x)
    x = nn.relu(_layers.batch_norm(train=train, name="bn1", **kw)(x))
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
            **kw,
        )(x, train)
      if group in _STAGE_AFTER_GROUP:
        features[_STAGE_AFTER_GROUP[group]] = x
    last_width = (
        int(1280 * self.width_multiplier) if self.width_multiplier > 1 else 1280
    )
    x = _layers.conv(last_width, 1, name="conv2", **kw)(x)
    x = nn.relu(_layers.batch_norm(train=train, name="bn2", **kw)(x))
    # The reference's AvgPool2d(2, ceil_mode=True) on the 2x2 map of a 32x32
    # input is the global average.
    x = _layers.global_average_pool(x)
    features["embedding"] = x
    logits = nn.Dense(
        self.num_classes,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.initializers.normal(0.01),
        bias_init=nn.initializers.zeros,
        name="classifier",
    )(x)
    return _layers.to_float32_logits(logits), features


def mobile_half(*, num_classes: int, dtype: Dtype = jnp.float32) -> MobileNetV2:
  """MobileNetV2, ``T = 6``, width 0.5 (RepDistiller's ``mobile_half``)."""
  return MobileNetV2(
      expansion=6, width_multiplier=0.5, num_classes=num_classes, dtype=dtype
  )
