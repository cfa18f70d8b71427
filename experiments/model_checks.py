"""Checks of the experiments' models against their data (shapes, sizes).

Models come from the one registry, :func:`jaxkd.models.create`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import models


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
