"""LeNet-5 with BatchNorm: the MNIST CNN teacher of data-free distillation.

The layout is LeCun et al.'s LeNet-5 as DAFL (Chen et al. 2019) uses it for
MNIST: three 5x5 convolutions (6, 16 and 120 channels) with 2x2 max pooling
after the first two, a 84-unit hidden layer and the classifier, ReLU
throughout. Each convolution is followed by BatchNorm, so that
DeepInversion's feature-statistics term (Yin et al. 2020) has running
statistics to match. ``lenet5_half`` halves every width (3, 8, 60, 42), as
DAFL's student does.

Inputs ``[batch, H, W, C]`` of 28x28 (MNIST as stored) or 32x32 (MNIST
padded, as in the paper); the first convolution is padded by 2 pixels on a
28x28 input so that both see the same 32x32 field. The third convolution
covers the whole 5x5 map that remains, so the features are:

* ``"stage1"``: after the first convolution block, ``[B, 14, 14, 6w]``
  (pooled);
* ``"stage2"``: after the second, ``[B, 5, 5, 16w]`` (pooled);
* ``"stage3"``: after the third, ``[B, 120w]``;
* ``"embedding"``: the 84-unit hidden layer the classifier reads.

Reference: LeCun, Bottou, Bengio and Haffner, `Gradient-Based Learning
Applied to Document Recognition
<http://yann.lecun.com/exdb/publis/pdf/lecun-01a.pdf>`_, 1998; Chen et al.,
`Data-Free Learning of Student Networks <https://arxiv.org/abs/1904.01186>`_,
2019.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models import _layers

Dtype = Any

_SIDES = (28, 32)


class LeNet5(nn.Module):
  """LeNet-5 with BatchNorm after each convolution.

  Attributes:
    width: Channel multiplier (1.0 for LeNet-5, 0.5 for the half network).
    num_classes: Number of output classes.
    dtype: Compute dtype; parameters, BatchNorm and logits are float32.

  ``__call__(x, train)`` takes images ``[batch, 28 or 32, same, C]`` and
  returns ``(logits [batch, num_classes], features)`` (see the module
  docstring for the features).
  """

  width: float = 1.0
  num_classes: int = 10
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self, x: jax.Array, train: bool
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    x = _layers.image_input(self, x)
    side = x.shape[1]
    if side not in _SIDES or x.shape[2] != side:
      raise ValueError(
          "LeNet5 expects square 28x28 or 32x32 images, got shape"
          f" {tuple(x.shape)}."
      )
    if not self.width > 0:
      raise ValueError(f"LeNet5 width must be > 0, got {self.width}.")
    channels = [max(1, round(c * self.width)) for c in (6, 16, 120, 84)]
    features = {}
    for index, (out, padding) in enumerate(
        zip(channels[:3], (2 if side == 28 else 0, 0, 0)), start=1
    ):
      x = _layers.conv_bn(
          x, out, 5, train=train, conv_name=f"conv{index}",
          bn_name=f"bn{index}", dtype=self.dtype, padding=padding,
          use_bias=True,
      )
      if index < 3:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      features[f"stage{index}"] = x
    x = x.reshape(x.shape[0], -1)
    features["stage3"] = x
    x = nn.relu(_layers.torch_default_dense(
        channels[3], x, name="dense", dtype=self.dtype)(x))
    return _layers.classify(x, features, _layers.torch_default_head(
        self.num_classes, dtype=self.dtype, name="classifier"))


def lenet5(*, num_classes: int, dtype: Dtype = jnp.float32) -> LeNet5:
  """LeNet-5 with BatchNorm (6-16-120-84), about 62k parameters."""
  return LeNet5(width=1.0, num_classes=num_classes, dtype=dtype)


def lenet5_half(*, num_classes: int, dtype: Dtype = jnp.float32) -> LeNet5:
  """LeNet-5 at half width (3-8-60-42), DAFL's MNIST student."""
  return LeNet5(width=0.5, num_classes=num_classes, dtype=dtype)
