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

_OUTPUTS = ("sigmoid", "tanh", "linear", "normalized")


class Generator(nn.Module):
  """A small DCGAN-style generator: noise ``[B, D]`` to images ``[B, H, W, C]``.

  Dense to a map of ``H / 2^u x W / 2^u`` (``u = upsamplings``), BatchNorm,
  then ``u`` times: nearest-neighbour upsampling by 2, 3x3 convolution,
  BatchNorm, leaky ReLU (slope 0.2); the channels halve at the last stage
  when ``u > 1``, as in DAFL's generator. A 3x3 convolution to ``C``
  channels and the output non-linearity end it. BatchNorm runs in float32.

  Attributes:
    image_shape: ``(H, W, C)`` of one image.
    width: Channels of the hidden maps.
    output: ``"sigmoid"`` (images in ``[0, 1]``), ``"tanh"`` (``[-1, 1]``),
      ``"linear"``, or ``"normalized"``: ``tanh`` followed by a BatchNorm
      without scale and bias, so that each channel of the batch has mean 0
      and variance 1, like images standardised with the data set's mean and
      standard deviation (DAFL, Chen et al. 2019).
    upsamplings: ``u >= 1``, the number of upsampling stages (DAFL: 2).
  """

  image_shape: Sequence[int]
  width: int = 64
  output: str = "sigmoid"
  upsamplings: int = 1

  @nn.compact
  def __call__(self, noise: jax.Array, train: bool) -> jax.Array:
    if self.output not in _OUTPUTS:
      raise ValueError(
          f"`output` must be one of {_OUTPUTS}, got {self.output!r}."
      )
    if not isinstance(self.upsamplings, int) or self.upsamplings < 1:
      raise ValueError(
          f"`upsamplings` must be an int >= 1, got {self.upsamplings!r}."
      )
    height, width, channels = self.image_shape
    batch = noise.shape[0]
    scale = 2**self.upsamplings
    low_h, low_w = math.ceil(height / scale), math.ceil(width / scale)

    def bn(h, **kwargs):
      return nn.BatchNorm(
          use_running_average=not train, momentum=0.9, **kwargs
      )(h)

    h = nn.Dense(low_h * low_w * self.width)(noise.astype(jnp.float32))
    h = bn(h.reshape(batch, low_h, low_w, self.width))
    for stage in range(self.upsamplings):
      last = stage == self.upsamplings - 1
      features = self.width // 2 if last and self.upsamplings > 1 else (
          self.width)
      h = jax.image.resize(
          h, (batch, 2 * h.shape[1], 2 * h.shape[2], h.shape[3]), "nearest"
      )
      h = nn.leaky_relu(bn(nn.Conv(features, (3, 3))(h)), 0.2)
    h = nn.Conv(channels, (3, 3))(h)[:, :height, :width]
    if self.output == "sigmoid":
      return nn.sigmoid(h)
    if self.output == "tanh":
      return jnp.tanh(h)
    if self.output == "normalized":
      return bn(jnp.tanh(h), use_scale=False, use_bias=False)
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
  # A BatchNorm subclass whose __call__ calls super().__call__ (the bundled
  # models' float32 BatchNorm) is intercepted twice: record the outer call.
  active = set()

  def interceptor(next_fun, call_args, call_kwargs, context):
    module = context.module
    if id(module) in active:
      return next_fun(*call_args, **call_kwargs)
    active.add(id(module))
    try:
      out = next_fun(*call_args, **call_kwargs)
    finally:
      active.discard(id(module))
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
