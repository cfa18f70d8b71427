"""Bundled models and the model contract.

Every bundled model is a ``flax.linen`` module on NHWC images (the MLPs take
any per-example shape) whose ``__call__(x, train)`` returns
``(logits, features)``: float32 logits ``[batch, num_classes]`` and a dict of
named arrays: ``"stage1"``, ``"stage2"``, ... (the output of each stage or
block group), ``"embedding"`` (the pooled pre-logit vector ``[batch, dim]``)
and, for the CNNs, ``"stem"``. The language models ``"lm_teacher"`` and
``"lm_student"`` (:class:`TransformerLM`) take ``[batch, length]`` tokens
instead and return ``[batch, length, vocab]`` logits; for them
``num_classes`` is the vocabulary size. :func:`create` builds one by name and
wraps it into the engine's :class:`Model` contract.

Examples:
  >>> import jax
  >>> import jax.numpy as jnp
  >>> from jaxkd import models
  >>> model = models.create("resnet8", num_classes=10)
  >>> model
  Model('resnet8')
  >>> params, state = jax.eval_shape(
  ...     model.init, jax.random.key(0), jnp.zeros((2, 32, 32, 3))
  ... )
  >>> sum(p.size for p in jax.tree.leaves(params))
  78042
  >>> sorted(state)
  ['batch_stats']
"""

from __future__ import annotations

import numbers
import re
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from jaxkd.models._contract import from_linen as from_linen
from jaxkd.models._contract import from_nnx as from_nnx
from jaxkd.models._contract import Model as Model
from jaxkd.models._lenet import LeNet5 as LeNet5
from jaxkd.models._lenet import lenet5 as lenet5
from jaxkd.models._lenet import lenet5_half as lenet5_half
from jaxkd.models._mlp import hinton_student as hinton_student
from jaxkd.models._mlp import hinton_teacher as hinton_teacher
from jaxkd.models._mlp import MLP as MLP
from jaxkd.models._mobilenetv2 import mobile_half as mobile_half
from jaxkd.models._mobilenetv2 import MobileNetV2 as MobileNetV2
from jaxkd.models._resnet_cifar import ResNet as ResNet
from jaxkd.models._resnet_imagenet import ImageNetResNet as ImageNetResNet
from jaxkd.models._resnet_imagenet import resnet18 as resnet18
from jaxkd.models._resnet_imagenet import resnet34 as resnet34
from jaxkd.models._resnet_cifar import resnet110 as resnet110
from jaxkd.models._resnet_cifar import resnet14 as resnet14
from jaxkd.models._resnet_cifar import resnet20 as resnet20
from jaxkd.models._resnet_cifar import resnet32 as resnet32
from jaxkd.models._resnet_cifar import resnet32x4 as resnet32x4
from jaxkd.models._resnet_cifar import resnet44 as resnet44
from jaxkd.models._resnet_cifar import resnet56 as resnet56
from jaxkd.models._resnet_cifar import resnet8 as resnet8
from jaxkd.models._resnet_cifar import resnet8x4 as resnet8x4
from jaxkd.models._shufflenetv2 import ShuffleNetV2 as ShuffleNetV2
from jaxkd.models._shufflenetv2 import shufflev2 as shufflev2
from jaxkd.models._transformer import lm_student as lm_student
from jaxkd.models._transformer import lm_teacher as lm_teacher
from jaxkd.models._transformer import output_kernel as lm_output_kernel
from jaxkd.models._transformer import TransformerLM as TransformerLM
from jaxkd.models._vgg import VGG as VGG
from jaxkd.models._vgg import vgg11 as vgg11
from jaxkd.models._vgg import vgg13 as vgg13
from jaxkd.models._vgg import vgg8 as vgg8
from jaxkd.models._vit import ViT as ViT
from jaxkd.models._vit import vit_tiny as vit_tiny
from jaxkd.models._wide_resnet import WideResNet as WideResNet
from jaxkd.models._wide_resnet import wrn_16_1 as wrn_16_1
from jaxkd.models._wide_resnet import wrn_16_2 as wrn_16_2
from jaxkd.models._wide_resnet import wrn_40_1 as wrn_40_1
from jaxkd.models._wide_resnet import wrn_40_2 as wrn_40_2

__all__ = [
    "ImageNetResNet",
    "LeNet5",
    "MLP",
    "MobileNetV2",
    "Model",
    "ResNet",
    "ShuffleNetV2",
    "TransformerLM",
    "VGG",
    "ViT",
    "WideResNet",
    "available",
    "check_name",
    "create",
    "from_linen",
    "from_nnx",
    "hinton_student",
    "hinton_teacher",
    "lenet5",
    "lenet5_half",
    "lm_student",
    "lm_teacher",
    "mobile_half",
    "resnet110",
    "resnet14",
    "resnet18",
    "resnet20",
    "resnet32",
    "resnet32x4",
    "resnet34",
    "resnet44",
    "resnet56",
    "resnet8",
    "resnet8x4",
    "shufflev2",
    "vgg11",
    "vgg13",
    "vgg8",
    "vit_tiny",
    "wrn_16_1",
    "wrn_16_2",
    "wrn_40_1",
    "wrn_40_2",
]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "resnet8": resnet8,
    "resnet14": resnet14,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet8x4": resnet8x4,
    "resnet32x4": resnet32x4,
    "wrn_16_1": wrn_16_1,
    "wrn_16_2": wrn_16_2,
    "wrn_40_1": wrn_40_1,
    "wrn_40_2": wrn_40_2,
    "vgg8": vgg8,
    "vgg11": vgg11,
    "vgg13": vgg13,
    "mobile_half": mobile_half,
    "shufflev2": shufflev2,
    "hinton_teacher": hinton_teacher,
    "hinton_student": hinton_student,
    "lenet5": lenet5,
    "lenet5_half": lenet5_half,
    "vit_tiny": vit_tiny,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "lm_teacher": lm_teacher,
    "lm_student": lm_student,
}

# ``mlp_<w1>[_<w2>...]``: a ReLU MLP with those hidden widths, no dropout
# (``mlp_300`` is 784-300-10 on MNIST).
_MLP_NAME = re.compile(r"^mlp((?:_[1-9][0-9]*)+)$")


def available() -> tuple[str, ...]:
  """The fixed names :func:`create` accepts, sorted.

  Besides these, ``mlp_<width>[_<width>...]`` names an MLP of those hidden
  widths (``mlp_300``, ``mlp_1200_1200``).
  """
  return tuple(sorted(_REGISTRY))


def check_name(name: str) -> str:
  """Returns ``name`` if :func:`create` knows it, else raises ``ValueError``."""
  if name in _REGISTRY or _MLP_NAME.match(str(name)):
    return name
  raise ValueError(
      f"Unknown model name {name!r}; available: {', '.join(available())},"
      " and mlp_<width>[_<width>...] (e.g. mlp_300, mlp_800_800)."
  )


def _mlp(widths: tuple[int, ...]) -> Callable[..., nn.Module]:
  def make(*, num_classes: int, dtype: Any = jnp.float32) -> nn.Module:
    return MLP(widths, num_classes=num_classes, dtype=dtype)
  return make


def create(name: str, *, num_classes: int, dtype: Any = jnp.float32) -> Model:
  """Builds a bundled model by name and wraps it with :func:`from_linen`.

  Args:
    name: One of :func:`available` (``"resnet8x4"``, ``"wrn_40_2"``, ...).
    num_classes: Number of output classes, a positive integer.
    dtype: The compute dtype, a floating dtype (``jnp.bfloat16`` for mixed
      precision). Parameters and BatchNorm statistics are always float32 and
      the logits are returned in float32.

  Returns:
    The :class:`Model` named ``name``.

  Raises:
    ValueError: For an unknown ``name`` (the message lists the available
      names), a non-positive ``num_classes`` or a non-floating ``dtype``.
  """
  check_name(name)
  if (
      isinstance(num_classes, bool)
      or not isinstance(num_classes, numbers.Integral)
      or num_classes < 1
  ):
    raise ValueError(
        f"`num_classes` must be a positive integer, got {num_classes!r}."
    )
  try:
    compute_dtype = jnp.dtype(dtype)
  except TypeError as error:
    raise ValueError(
        f"`dtype` must be a floating dtype, got {dtype!r}."
    ) from error
  if not jnp.issubdtype(compute_dtype, jnp.floating):
    raise ValueError(
        f"`dtype` must be a floating dtype (float32, bfloat16, ...), got"
        f" {dtype!r}."
    )
  match = _MLP_NAME.match(name)
  factory = (
      _mlp(tuple(int(w) for w in match.group(1).strip("_").split("_")))
      if match
      else _REGISTRY[name]
  )
  module = factory(num_classes=int(num_classes), dtype=compute_dtype)
  return from_linen(module, name=name)
