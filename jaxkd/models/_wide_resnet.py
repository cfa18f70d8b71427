"""Wide residual networks WRN-d-w for CIFAR, in Flax linen (NHWC).

A 3x3 stem convolution with 16 channels, three groups of
``n = (depth - 4) / 6`` pre-activation basic blocks with ``16 w``, ``32 w``
and ``64 w`` channels (strides 1, 2, 2), a final BN-ReLU, global average
pooling and a linear classifier. A block whose input and output widths differ
normalises and activates its input once, and both branches (the 1x1
projection shortcut and the 3x3 convolutions) read that activated input; a
block of equal widths adds its raw input.

The layer order, widths, strides, bias-free convolutions and initialisation
(Kaiming normal ``fan_out`` convolutions, zero classifier bias, PyTorch's
default classifier kernel) follow ``models/wrn.py`` of RepDistiller, so the
trainable parameter counts are the PyTorch ones.

Reference: Zagoruyko and Komodakis, `Wide Residual Networks
<https://arxiv.org/abs/1605.07146>`_, BMVC 2016; Tian, Krishnan and Isola,
`Contrastive Representation Distillation <https://arxiv.org/abs/1910.10699>`_,
ICLR 2020 (github.com/HobbitLong/RepDistiller).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models import _layers

Dtype = Any


class WideBasicBlock(nn.Module):
  """Pre-activation block: BN-ReLU-conv3x3, BN-ReLU-(dropout)-conv3x3.

  Attributes:
    features: Output channels.
    stride: Stride of the first convolution and of the shortcut.
    dropout_rate: Dropout between the two convolutions (0 in the reference).
    dtype: Compute dtype.
  """

  features: int
  stride: int = 1
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    kw = dict(dtype=self.dtype)
    equal_widths = x.shape[-1] == self.features
    activated = _layers.bn_relu(x, train=train, name="bn1", **kw)
    y = _layers.conv(
        self.features, 3, stride=self.stride, padding=1, name="conv1", **kw
    )(activated)
    y = _layers.bn_relu(y, train=train, name="bn2", **kw)
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = _layers.conv(self.features, 3, padding=1, name="conv2", **kw)(y)
    if equal_widths:
      # As in the reference, equal widths mean an identity shortcut (the
      # reference's depths and strides never combine them with stride 2).
      shortcut = x
    else:
      shortcut = _layers.conv(
          self.features, 1, stride=self.stride, name="shortcut_conv", **kw
      )(activated)
    return shortcut + y


class WideResNet(nn.Module):
  """WRN-``depth``-``widen_factor`` for CIFAR.

  Attributes:
    depth: Total depth, ``6n + 4`` (10, 16, 22, 28, 40, ...).
    widen_factor: Width multiplier ``w`` of the three groups.
    num_classes: Number of output classes.
    dropout_rate: Dropout inside every block (0 in the reference models).
    dtype: Compute dtype (``jnp.bfloat16`` for mixed precision); parameters
      and BatchNorm statistics are float32 and the logits are returned in
      float32.

  ``__call__(x, train)`` takes NHWC images ``[batch, 32, 32, 3]`` and returns
  ``(logits, features)``: logits ``[batch, num_classes]`` and the features
  ``"stem"`` (the first convolution), ``"stage1"``, ``"stage2"``,
  ``"stage3"`` (the raw outputs of the three groups, before the next BN-ReLU;
  ``[batch, 32, 32, 16 w]``, ``[batch, 16, 16, 32 w]``,
  ``[batch, 8, 8, 64 w]``) and ``"embedding"`` (``[batch, 64 w]``, the pooled
  vector fed to the classifier), in the compute dtype.
  """

  depth: int
  widen_factor: int = 1
  num_classes: int = 10
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> _layers.Outputs:
    blocks_per_group = _layers.blocks_per_stage(self, self.depth, offset=4)
    if self.widen_factor < 1:
      raise ValueError(
          f"WideResNet widen_factor must be >= 1, got {self.widen_factor}."
      )
    kw = dict(dtype=self.dtype)
    x = _layers.conv(16, 3, padding=1, name="conv1", **kw)(
        _layers.image_input(self, x)
    )
    features = {"stem": x}
    widths = [16 * self.widen_factor * 2**g for g in range(3)]
    for group, (width, stride) in enumerate(zip(widths, (1, 2, 2)), start=1):
      for block in range(blocks_per_group):
        x = WideBasicBlock(
            width,
            stride=stride if block == 0 else 1,
            dropout_rate=self.dropout_rate,
            name=f"block{group}_{block}",
            **kw,
        )(x, train)
      features[f"stage{group}"] = x
    x = _layers.bn_relu(x, train=train, name="bn1", **kw)
    # The reference's avg_pool2d(8) is the global average for 32x32 inputs;
    # its classifier bias starts at zero.
    head = _layers.dense(
        self.num_classes,
        kernel_init=_layers.torch_default_kernel_init,
        name="fc",
        **kw,
    )
    return _layers.classify(_layers.global_average_pool(x), features, head)


def wrn_16_1(*, num_classes: int, dtype: Dtype = jnp.float32) -> WideResNet:
  """WRN-16-1 (RepDistiller's ``wrn_16_1``) as a linen module."""
  return WideResNet(16, 1, num_classes=num_classes, dtype=dtype)


def wrn_16_2(*, num_classes: int, dtype: Dtype = jnp.float32) -> WideResNet:
  """WRN-16-2 (RepDistiller's ``wrn_16_2``) as a linen module."""
  return WideResNet(16, 2, num_classes=num_classes, dtype=dtype)


def wrn_40_1(*, num_classes: int, dtype: Dtype = jnp.float32) -> WideResNet:
  """WRN-40-1 (RepDistiller's ``wrn_40_1``) as a linen module."""
  return WideResNet(40, 1, num_classes=num_classes, dtype=dtype)


def wrn_40_2(*, num_classes: int, dtype: Dtype = jnp.float32) -> WideResNet:
  """WRN-40-2 (RepDistiller's ``wrn_40_2``) as a linen module."""
  return WideResNet(40, 2, num_classes=num_classes, dtype=dtype)
