"""Building blocks shared by the bundled models.

The bundled models re-implement PyTorch reference architectures, so their
initialisers and BatchNorm settings follow PyTorch:

* :data:`kaiming_normal_fan_out` is ``torch.nn.init.kaiming_normal_(w,
  mode="fan_out", nonlinearity="relu")``: a normal of variance
  ``2 / (kh * kw * out_channels)`` (the "He" init that the CIFAR references
  write as ``normal_(0, sqrt(2 / n))``).
* :data:`torch_default_kernel_init` and :func:`torch_default_bias_init` are
  PyTorch's default ``Conv2d``/``Linear`` initialisation
  (``kaiming_uniform_(a=sqrt(5))``): uniform on ``±1 / sqrt(fan_in)`` for the
  kernel and the bias alike.
* :func:`batch_norm` has PyTorch's defaults: running statistics updated with
  momentum ``0.1`` (Flax ``momentum=0.9``) and ``epsilon=1e-5``.

Parameters are always created in float32; ``dtype`` is the compute dtype.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# fan_out counts kh * kw * out_channels, as PyTorch does, also for grouped
# (depthwise) convolutions: Flax's kernel shape is (kh, kw, in / groups, out).
kaiming_normal_fan_out = nn.initializers.variance_scaling(
    2.0, "fan_out", "normal"
)
# Uniform on ±sqrt(3 * scale / fan_in) = ±1 / sqrt(fan_in) for scale = 1/3.
torch_default_kernel_init = nn.initializers.variance_scaling(
    1.0 / 3.0, "fan_in", "uniform"
)


def torch_default_bias_init(fan_in: int) -> nn.initializers.Initializer:
  """PyTorch's default bias init: uniform on ``±1 / sqrt(fan_in)``."""
  bound = 1.0 / fan_in**0.5

  def init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def torch_default_dense(
    features: int, x: jax.Array, *, dtype: Dtype, name: str
) -> nn.Dense:
  """An ``nn.Dense`` initialised like ``torch.nn.Linear`` for input ``x``."""
  return nn.Dense(
      features,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=torch_default_kernel_init,
      bias_init=torch_default_bias_init(x.shape[-1]),
      name=name,
  )


def conv(
    features: int,
    kernel_size: int,
    *,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    use_bias: bool = False,
    kernel_init: nn.initializers.Initializer = kaiming_normal_fan_out,
    dtype: Dtype,
    name: str,
) -> nn.Conv:
  """A square ``nn.Conv`` with PyTorch's symmetric integer padding.

  Explicit symmetric padding (not ``"SAME"``) keeps the sampling grid of a
  strided PyTorch convolution: with stride 2, ``"SAME"`` would pad only at the
  bottom/right and shift every output by one input pixel.
  """
  return nn.Conv(
      features,
      (kernel_size, kernel_size),
      strides=(stride, stride),
      padding=((padding, padding), (padding, padding)),
      feature_group_count=groups,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=kernel_init,
      bias_init=nn.initializers.zeros,
      name=name,
  )


class Float32BatchNorm(nn.BatchNorm):
  """``nn.BatchNorm`` computed in float32, output cast to ``output_dtype``.

  Normalising in float32 is the usual mixed-precision practice, and it keeps
  the statistics float32 (Flax's own ``dtype=bfloat16`` path would subtract a
  float32 mean from a bfloat16 input, which strict dtype promotion rejects).
  """

  output_dtype: Dtype = jnp.float32

  def __call__(self, x, use_running_average=None, *, mask=None):
    y = super().__call__(
        x.astype(jnp.float32), use_running_average, mask=mask
    )
    return y.astype(self.output_dtype)


def batch_norm(*, train: bool, dtype: Dtype, name: str) -> nn.BatchNorm:
  """BatchNorm with PyTorch's defaults; float32 scale, bias and statistics.

  Deviation from PyTorch: Flax updates the running variance with the biased
  batch variance where PyTorch uses the unbiased one (a factor
  ``n / (n - 1)`` on the update, ``n`` = batch * height * width).
  """
  return Float32BatchNorm(
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      scale_init=nn.initializers.ones,
      bias_init=nn.initializers.zeros,
      output_dtype=dtype,
      name=name,
  )


class Float32LayerNorm(nn.LayerNorm):
  """``nn.LayerNorm`` computed in float32, output cast to ``output_dtype``."""

  output_dtype: Dtype = jnp.float32

  def __call__(self, x, *, mask=None):
    return super().__call__(x.astype(jnp.float32), mask=mask).astype(
        self.output_dtype
    )


def layer_norm(*, epsilon: float, dtype: Dtype, name: str) -> nn.LayerNorm:
  """LayerNorm in float32 with float32 scale and bias."""
  return Float32LayerNorm(
      epsilon=epsilon,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      output_dtype=dtype,
      name=name,
  )


def global_average_pool(x: jax.Array) -> jax.Array:
  """Mean over the spatial axes of an NHWC array: ``[B, H, W, C] -> [B, C]``."""
  return jnp.mean(x, axis=(1, 2))


def check_image(name: str, x: jax.Array) -> None:
  """Raises ``ValueError`` unless ``x`` is a rank-4 NHWC batch."""
  if x.ndim != 4:
    raise ValueError(
        f"{name} expects NHWC images of rank 4 [batch, height, width,"
        f" channels], got shape {tuple(x.shape)}."
    )


def to_compute_dtype(x: Any, dtype: Dtype) -> jax.Array:
  """Casts the model input to the compute dtype."""
  return jnp.asarray(x).astype(dtype)


def to_float32_logits(logits: jax.Array) -> jax.Array:
  """Logits leave every model in float32, whatever the compute dtype."""
  return logits.astype(jnp.float32)
