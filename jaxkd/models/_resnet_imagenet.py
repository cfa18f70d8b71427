"""ImageNet ResNet-18 and ResNet-34 in torchvision's layout (Flax linen, NHWC).

A 7x7 stride-2 stem convolution with BatchNorm and ReLU, a 3x3 stride-2 max
pool, four stages of basic blocks (``[2, 2, 2, 2]`` or ``[3, 4, 6, 3]``) of
widths 64, 128, 256 and 512 (stride 2 from the second stage on, with a 1x1
convolution + BatchNorm shortcut where the shape changes), global average
pooling and a linear classifier. Trainable parameters with 1,000 classes:
11,689,512 (ResNet-18) and 21,797,672 (ResNet-34), torchvision's counts.
Initialisation as torchvision: Kaiming normal (``fan_out``) convolutions,
BatchNorm scale 1 and offset 0, PyTorch's default for the classifier.

``__call__(x, train)`` returns ``(logits, features)`` with ``"stem"``,
``"stage1"`` ... ``"stage4"`` and ``"embedding"`` (the pooled 512-vector),
the feature contract of ``jaxkd.models``.

Reference: He, Zhang, Ren and Sun, `Deep Residual Learning for Image
Recognition <https://arxiv.org/abs/1512.03385>`_, CVPR 2016.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# The CIFAR ResNets' basic block is torchvision's BasicBlock (3x3 conv-BN-ReLU,
# 3x3 conv-BN, projection shortcut where the shape changes, ReLU after the sum)
# and the layers follow PyTorch's initialisation and BatchNorm defaults.
from jaxkd.models import _layers
from jaxkd.models._resnet_cifar import BasicBlock

Dtype = Any


class ImageNetResNet(nn.Module):
  """A torchvision-layout ResNet with basic blocks.

  Attributes:
    stage_sizes: Blocks per stage, e.g. ``(2, 2, 2, 2)``.
    num_classes: Number of output classes.
    dtype: Compute dtype; parameters and logits are float32.
  """

  stage_sizes: Sequence[int]
  num_classes: int = 1000
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> _layers.Outputs:
    x = _layers.conv_bn(
        _layers.image_input(self, x), 64, 7, stride=2, padding=3,
        train=train, conv_name="conv1", bn_name="bn1", dtype=self.dtype,
    )
    features = {"stem": x}
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, (blocks, width) in enumerate(
        zip(self.stage_sizes, (64, 128, 256, 512)), start=1
    ):
      for block in range(blocks):
        stride = 2 if stage > 1 and block == 0 else 1
        x = BasicBlock(width, stride=stride, name=f"layer{stage}_{block}",
                       dtype=self.dtype)(x, train)
      features[f"stage{stage}"] = x
    head = _layers.torch_default_head(
        self.num_classes, dtype=self.dtype, name="fc"
    )
    return _layers.classify(_layers.global_average_pool(x), features, head)


def resnet18(*, num_classes: int, dtype: Dtype = jnp.float32) -> ImageNetResNet:
  """ResNet-18: basic blocks ``[2, 2, 2, 2]``."""
  return ImageNetResNet((2, 2, 2, 2), num_classes=num_classes, dtype=dtype)


def resnet34(*, num_classes: int, dtype: Dtype = jnp.float32) -> ImageNetResNet:
  """ResNet-34: basic blocks ``[3, 4, 6, 3]``."""
  return ImageNetResNet((3, 4, 6, 3), num_classes=num_classes, dtype=dtype)
