"""CIFAR VGG networks with BatchNorm (RepDistiller's ``vgg*_bn``), Flax linen.

Five groups of 3x3 convolutions, each convolution followed by BatchNorm and
ReLU; 2x2 max pooling after groups 1, 2 and 3 (and after group 4 only for
64x64 inputs, as in the reference), global average pooling after group 5
and a single linear classifier (the VGG fully connected layers are removed).

As in the reference, the convolutions keep their bias although a BatchNorm
follows (this is what makes the parameter counts match PyTorch's), and the
initialisation is Kaiming normal ``fan_out`` for the convolutions with zero
biases and ``normal(0, 0.01)`` with zero bias for the classifier.

Reference: Simonyan and Zisserman, `Very Deep Convolutional Networks for
Large-Scale Image Recognition <https://arxiv.org/abs/1409.1556>`_, ICLR 2015;
Tian, Krishnan and Isola, `Contrastive Representation Distillation
<https://arxiv.org/abs/1910.10699>`_, ICLR 2020 (github.com/HobbitLong/
RepDistiller, ``models/vgg.py``).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models import _layers

Dtype = Any

# Output channels of the convolutions of each of the five groups.
VGG_CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
}


class VGG(nn.Module):
  """CIFAR VGG with BatchNorm.

  Attributes:
    groups: Five sequences of output channels, one entry per 3x3 convolution.
    num_classes: Number of output classes.
    dtype: Compute dtype (``jnp.bfloat16`` for mixed precision); parameters
      and BatchNorm statistics are float32 and the logits are returned in
      float32.

  ``__call__(x, train)`` takes NHWC images ``[batch, 32, 32, 3]`` (or 64x64)
  and returns ``(logits, features)``: logits ``[batch, num_classes]`` and the
  features ``"stage1"`` ... ``"stage5"`` (the output of each group after its
  last ReLU, before pooling; ``[batch, 32, 32, 64]``, ``[batch, 16, 16,
  128]``, ``[batch, 8, 8, 256]``, ``[batch, 4, 4, 512]``, ``[batch, 4, 4,
  512]`` for 32x32 inputs) and ``"embedding"`` (``[batch, 512]``), in the
  compute dtype.
  """

  groups: Sequence[Sequence[int]]
  num_classes: int = 10
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> _layers.Outputs:
    if len(self.groups) != 5 or not all(len(g) for g in self.groups):
      raise ValueError(
          f"VGG groups must be 5 non-empty sequences of channel counts, got"
          f" {self.groups!r}."
      )
    x = _layers.image_input(self, x)
    pool_after_group4 = x.shape[1] == 64
    features = {}
    for group, widths in enumerate(self.groups, start=1):
      if group == 5 and pool_after_group4:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      for layer, width in enumerate(widths):
        x = _layers.conv_bn(
            x, width, 3, padding=1, use_bias=True, train=train,
            conv_name=f"block{group}_conv{layer}",
            bn_name=f"block{group}_bn{layer}", dtype=self.dtype,
        )
      features[f"stage{group}"] = x
      if group <= 3:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    head = _layers.small_normal_dense(
        self.num_classes, dtype=self.dtype, name="classifier"
    )
    return _layers.classify(_layers.global_average_pool(x), features, head)


def vgg8(*, num_classes: int, dtype: Dtype = jnp.float32) -> VGG:
  """VGG-8 with BatchNorm (RepDistiller's ``vgg8_bn``) as a linen module."""
  return VGG(VGG_CONFIGS["vgg8"], num_classes=num_classes, dtype=dtype)


def vgg11(*, num_classes: int, dtype: Dtype = jnp.float32) -> VGG:
  """VGG-11 with BatchNorm (RepDistiller's ``vgg11_bn``) as a linen module."""
  return VGG(VGG_CONFIGS["vgg11"], num_classes=num_classes, dtype=dtype)


def vgg13(*, num_classes: int, dtype: Dtype = jnp.float32) -> VGG:
  """VGG-13 with BatchNorm (RepDistiller's ``vgg13_bn``) as a linen module."""
  return VGG(VGG_CONFIGS["vgg13"], num_classes=num_classes, dtype=dtype)
