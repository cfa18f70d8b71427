"""RepDistiller's CIFAR ResNets in PyTorch, for the reference benchmark.

The same architectures as ``jaxkd.models`` (``resnet8`` ... ``resnet110``,
``resnet8x4``, ``resnet32x4``): a 3x3 stem convolution with BatchNorm and
ReLU, three stages of ``(depth - 2) / 6`` basic blocks at strides 1, 2, 2, a
projection shortcut (1x1 convolution + BatchNorm) where a block changes the
stride or the width, global average pooling and a linear classifier.
Convolutions have no bias and are initialised with Kaiming normal
(``fan_out``); BatchNorm starts at scale 1 and bias 0. The pooling is the
global mean (the reference's ``AvgPool2d(8)`` on 32x32 inputs) so that the
smoke tests can use smaller images. Inputs are NCHW, PyTorch's default
layout.

Needs ``torch`` (the optional ``bench`` extra).
"""

from __future__ import annotations

import torch
from torch import nn

_NARROW = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)
DEPTHS_AND_WIDTHS = {
    "resnet8": (8, _NARROW),
    "resnet14": (14, _NARROW),
    "resnet20": (20, _NARROW),
    "resnet32": (32, _NARROW),
    "resnet44": (44, _NARROW),
    "resnet56": (56, _NARROW),
    "resnet110": (110, _NARROW),
    "resnet8x4": (8, _WIDE),
    "resnet32x4": (32, _WIDE),
}


class BasicBlock(nn.Module):
  """conv3x3-BN-ReLU, conv3x3-BN, plus the shortcut, then ReLU."""

  def __init__(self, in_channels: int, channels: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride,
                           padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(channels)
    self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(channels)
    self.shortcut = None
    if stride != 1 or in_channels != channels:
      self.shortcut = nn.Sequential(
          nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
          nn.BatchNorm2d(channels),
      )

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = torch.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    residual = x if self.shortcut is None else self.shortcut(x)
    return torch.relu(out + residual)


class ResNet(nn.Module):
  """CIFAR ResNet of depth ``6n + 2`` with widths (stem, stage 1, 2, 3)."""

  def __init__(self, depth: int, widths, num_classes: int):
    super().__init__()
    if depth < 8 or (depth - 2) % 6:
      raise ValueError(f"depth must be 6n + 2, got {depth}.")
    blocks = (depth - 2) // 6
    self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(widths[0])
    layers = []
    in_channels = widths[0]
    for width, stride in zip(widths[1:], (1, 2, 2)):
      for index in range(blocks):
        layers.append(
            BasicBlock(in_channels, width, stride if index == 0 else 1)
        )
        in_channels = width
    self.layers = nn.Sequential(*layers)
    self.fc = nn.Linear(widths[3], num_classes)
    for module in self.modules():
      if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out",
                                nonlinearity="relu")
      elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = torch.relu(self.bn1(self.conv1(x)))
    x = self.layers(x)
    return self.fc(x.mean(dim=(2, 3)))


def create(name: str, *, num_classes: int) -> ResNet:
  """A RepDistiller ResNet by name (``"resnet8x4"``, ``"resnet110"``, ...)."""
  if name not in DEPTHS_AND_WIDTHS:
    raise ValueError(
        f"Unknown model {name!r}; the PyTorch reference has"
        f" {', '.join(sorted(DEPTHS_AND_WIDTHS))}."
    )
  depth, widths = DEPTHS_AND_WIDTHS[name]
  return ResNet(depth, widths, num_classes)


def num_parameters(model: nn.Module) -> int:
  """Parameters (BatchNorm statistics, which are buffers, excluded)."""
  return sum(p.numel() for p in model.parameters())
