"""What data-free distillation generates and reads from the teacher.

:class:`Generator` maps noise to images; :func:`record_batchnorm` runs a
linen teacher while recording the input and the running statistics of every
``nn.BatchNorm`` call, for DeepInversion's feature-statistics loss
(:func:`batchnorm_statistics_sum`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd import losses

__all__ = [
    "BatchNormRecord",
    "Generator",
    "batchnorm_statistics_sum",
    "record_batchnorm",
]

_OUTPUTS = ("sigmoid", "tanh", "linear")


class Generator(nn.Module):
  """A small DCGAN-style generator: noise ``[B, D]`` to images ``[B, H, W, C]``.

  Dense to a half-resolution map, BatchNorm, nearest-neighbour upsampling,
  3x3 convolution, BatchNorm, leaky ReLU, a 3x3 convolution to ``C``
  channels, and the output non-linearity. BatchNorm runs in float32.

  Attributes:
    image_shape: ``(H, W, C)`` of one image.
    width: Channels of the hidden maps.
    output: ``"sigmoid"`` (images in ``[0, 1]``), ``"tanh"`` (``[-1, 1]``)
      or ``"linear"``.
  """

  image_shape: Sequence[int]
  width: int = 64
  output: str = "sigmoid"

  @nn.compact
  def __call__(self, noise: jax.Array, train: bool) -> jax.Array:
    if self.output not in _OUTPUTS:
      raise ValueError(
          f"`output` must be one of {_OUTPUTS}, got {self.output!r}."
      )
    height, width, channels = self.image_shape
    batch = noise.shape[0]
    low_h, low_w = math.ceil(height / 2), math.ceil(width / 2)

    def bn(h):
      return nn.BatchNorm(use_running_average=not train, momentum=0.9)(h)

    h = nn.Dense(low_h * low_w * self.width)(noise.astype(jnp.float32))
    h = bn(h.reshape(batch, low_h, low_w, self.width))
    h = jax.image.resize(
        h, (batch, 2 * low_h, 2 * low_w, self.width), "nearest"
    )
    h = nn.leaky_relu(bn(nn.Conv(self.width, (3, 3))(h)), 0.2)
    h = nn.Conv(channels, (3, 3))(h)[:, :height, :width]
    if self.output == "sigmoid":
      return nn.sigmoid(h)
    if self.output == "tanh":
      return jnp.tanh(h)
    return h


# ---------------------------------------------------------------------------
# Recording the teacher's batch-normalisation layers.
# ---------------------------------------------------------------------------


class BatchNormRecord(NamedTuple):
  """One call of an ``nn.BatchNorm`` layer.

  Attributes:
    path: The module's path, e.g. ``"BatchNorm_0"`` or ``"stage1/bn"``.
    inputs: The array the layer normalised.
    mean: Its running mean (``batch_stats["mean"]``).
    var: Its running variance.
    axis: The feature axis of ``inputs``.
  """

  path: str
  inputs: jax.Array
  mean: jax.Array
  var: jax.Array
  axis: int


def record_batchnorm(
    fn: Callable[..., Any], *args, **kwargs
) -> tuple[Any, list[BatchNormRecord]]:
  """Calls ``fn(*args, **kwargs)``, recording every linen BatchNorm call.

  ``fn`` typically applies a linen module (``Model.apply`` of a model made
  by ``from_linen``). Calls of ``nn.BatchNorm`` are intercepted with
  ``flax.linen.intercept_methods``; their inputs are recorded as they were
  traced, so gradients flow through them.

  Args:
    fn: The function to run.
    *args: Its positional arguments.
    **kwargs: Its keyword arguments.

  Returns:
    ``(fn's result, records)``, one :class:`BatchNormRecord` per call, in
    call order.

  Raises:
    ValueError: For a BatchNorm normalising over several feature axes.
  """
  records = []

  def interceptor(next_fun, call_args, call_kwargs, context):
    out = next_fun(*call_args, **call_kwargs)
    module = context.module
    if isinstance(module, nn.BatchNorm) and context.method_name == "__call__":
      x = call_args[0] if call_args else call_kwargs["x"]
      axis = module.axis
      if isinstance(axis, (tuple, list)):
        if len(axis) != 1:
          raise ValueError(
              f"BatchNorm {'/'.join(module.path)!r} normalises over the"
              f" feature axes {axis}; only one feature axis is supported."
          )
        axis = axis[0]
      records.append(BatchNormRecord(
          path="/".join(str(p) for p in module.path),
          inputs=x,
          mean=module.get_variable("batch_stats", "mean"),
          var=module.get_variable("batch_stats", "var"),
          axis=int(axis),
      ))
    return out

  with nn.intercept_methods(interceptor):
    out = fn(*args, **kwargs)
  return out, records


def batchnorm_statistics_sum(records: Sequence[BatchNormRecord]) -> jax.Array:
  """DeepInversion's feature loss summed over recorded BatchNorm layers."""
  total = jnp.zeros((), jnp.float32)
  for record in records:
    total = total + losses.batchnorm_statistics_loss(
        record.inputs, record.mean, record.var, axis=record.axis
    ).astype(jnp.float32)
  return total
