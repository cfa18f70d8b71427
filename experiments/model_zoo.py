"""Models by name: jaxkd's bundled ones, MLPs of any width, ImageNet ResNets.

* every name of ``jaxkd.models.available()`` (CIFAR ResNets, WRNs, VGG,
  MobileNetV2, ShuffleNetV2, Hinton's MLPs, ViT);
* ``mlp_<w1>[_<w2>...]``: a ReLU MLP with those hidden widths, no dropout
  (``mlp_300`` is 784-300-10 on MNIST);
* ``resnet18`` and ``resnet34``: the ImageNet ResNets of He et al. (2016) in
  torchvision's layout, defined here (``experiments/imagenet_resnet.py``),
  since jaxkd bundles only the CIFAR variants.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from experiments import imagenet_resnet
from jaxkd import models

_MLP = re.compile(r"^mlp((?:_[1-9][0-9]*)+)$")
_LOCAL = {
    "resnet18": imagenet_resnet.resnet18,
    "resnet34": imagenet_resnet.resnet34,
}


def available() -> tuple[str, ...]:
  """Every fixed name (``mlp_<widths>`` is accepted besides these)."""
  return tuple(sorted(set(models.available()) | set(_LOCAL)))


def check_name(name: str) -> str:
  """Returns ``name`` if :func:`create` knows it, else raises ValueError."""
  if name in _LOCAL or name in models.available() or _MLP.match(str(name)):
    return name
  raise ValueError(
      f"Unknown model {name!r}. Known models: {', '.join(available())}, and"
      " mlp_<width>[_<width>...] (e.g. mlp_300, mlp_800_800)."
  )


def create(name: str, *, num_classes: int) -> models.Model:
  """The :class:`jaxkd.models.Model` called ``name``."""
  check_name(name)
  if name in _LOCAL:
    return models.from_linen(_LOCAL[name](num_classes=num_classes), name=name)
  match = _MLP.match(name)
  if match:
    widths = tuple(int(w) for w in match.group(1).strip("_").split("_"))
    return models.from_linen(
        models.MLP(widths, num_classes=num_classes), name=name)
  return models.create(name, num_classes=num_classes)


def count_params(params) -> int:
  """The number of trainable scalars."""
  return int(sum(np.prod(np.shape(p)) for p in jax.tree.leaves(params)))


def check_input_shape(
    model: models.Model,
    image_shape: tuple[int, ...],
    *,
    where: str,
    params=None,
    state=None,
) -> None:
  """Raises ValueError unless ``model`` takes images of ``image_shape``.

  Only abstract shapes are traced (``jax.eval_shape``): nothing is compiled.
  With ``params`` (a trained or loaded model), the check is that these
  parameters fit the images, e.g. a teacher saved for another data set.
  """
  images = jax.ShapeDtypeStruct((2,) + tuple(image_shape), jnp.float32)
  try:
    if params is None:
      jax.eval_shape(model.init, jax.random.key(0), images)
    else:
      jax.eval_shape(
          lambda p, s, x: model.apply(p, s, x, train=False, rng=None),
          params, state or {}, images)
  except Exception as error:  # Flax raises several types for shapes.
    made = " with these parameters" if params is not None else ""
    raise ValueError(
        f"{where}: model {model.name!r}{made} does not take images of shape"
        f" {tuple(image_shape)} (height, width, channels): {error}"
    ) from error
