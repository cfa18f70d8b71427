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

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
# What every image model's ``__call__(x, train)`` returns:
# ``(float32 logits [batch, num_classes], named features)``.
Outputs = tuple[jax.Array, dict[str, jax.Array]]

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


def dense(
    features: int,
    *,
    kernel_init: nn.initializers.Initializer,
    bias_init: nn.initializers.Initializer = nn.initializers.zeros,
    dtype: Dtype,
    name: str,
) -> nn.Dense:
  """An ``nn.Dense`` with float32 parameters and the given initialisers."""
  return nn.Dense(
      features,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=kernel_init,
      bias_init=bias_init,
      name=name,
  )


def torch_default_dense(
    features: int, x: jax.Array, *, dtype: Dtype, name: str
) -> nn.Dense:
  """An ``nn.Dense`` initialised like ``torch.nn.Linear`` for input ``x``."""
  return dense(
      features,
      kernel_init=torch_default_kernel_init,
      bias_init=torch_default_bias_init(x.shape[-1]),
      dtype=dtype,
      name=name,
  )


def torch_default_head(
    num_classes: int, *, dtype: Dtype, name: str
) -> Callable[[jax.Array], jax.Array]:
  """The logits of a :func:`torch_default_dense` built for its input."""

  def head(x: jax.Array) -> jax.Array:
    return torch_default_dense(num_classes, x, dtype=dtype, name=name)(x)

  return head


def small_normal_dense(features: int, *, dtype: Dtype, name: str) -> nn.Dense:
  """A classifier ``nn.Dense`` with ``N(0, 0.01^2)`` kernel and zero bias.

  The RepDistiller VGG and MobileNetV2 initialise their classifiers so.
  """
  return dense(
      features,
      kernel_init=nn.initializers.normal(0.01),
      dtype=dtype,
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


def conv_bn(
    x: jax.Array,
    features: int,
    kernel_size: int,
    *,
    train: bool,
    conv_name: str,
    bn_name: str,
    relu: bool = True,
    dtype: Dtype,
    **conv_kwargs: Any,
) -> jax.Array:
  """:func:`conv` then :func:`batch_norm`, then a ReLU unless ``relu=False``.

  The two layers are created in the calling module under ``conv_name`` and
  ``bn_name``; ``conv_kwargs`` (``stride``, ``padding``, ``groups``,
  ``use_bias``, ``kernel_init``) go to :func:`conv`.
  """
  y = conv(features, kernel_size, dtype=dtype, name=conv_name, **conv_kwargs)(x)
  y = batch_norm(train=train, dtype=dtype, name=bn_name)(y)
  return nn.relu(y) if relu else y


def bn_relu(x: jax.Array, *, train: bool, dtype: Dtype, name: str) -> jax.Array:
  """:func:`batch_norm` named ``name``, then a ReLU."""
  return nn.relu(batch_norm(train=train, dtype=dtype, name=name)(x))


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


def blocks_per_stage(model: nn.Module, depth: int, *, offset: int) -> int:
  """``n`` of a three-stage CIFAR network of depth ``6n + offset``.

  Raises ``ValueError`` naming the model unless ``depth`` is ``6n + offset``
  with ``n >= 1``.
  """
  if depth < 6 + offset or (depth - offset) % 6:
    examples = ", ".join(str(6 * n + offset) for n in (1, 2, 3))
    raise ValueError(
        f"{type(model).__name__} depth must be 6n + {offset} with n >= 1"
        f" ({examples}, ...), got {depth}."
    )
  return (depth - offset) // 6


def image_input(model: nn.Module, x: Any) -> jax.Array:
  """Checks an image model's NHWC input and casts it to ``model.dtype``."""
  check_image(type(model).__name__, x)
  return to_compute_dtype(x, model.dtype)


def to_compute_dtype(x: Any, dtype: Dtype) -> jax.Array:
  """Casts the model input to the compute dtype."""
  return jnp.asarray(x).astype(dtype)


def to_float32_logits(logits: jax.Array) -> jax.Array:
  """Logits leave every model in float32, whatever the compute dtype."""
  return logits.astype(jnp.float32)


def classify(
    embedding: jax.Array,
    features: dict[str, jax.Array],
    head: Callable[[jax.Array], jax.Array],
) -> Outputs:
  """Records ``features["embedding"]`` and returns the head's float32 logits.

  Args:
    embedding: The pooled pre-logit vectors, ``[batch, dim]``.
    features: The model's named features so far (updated in place).
    head: Maps ``embedding`` to logits ``[batch, num_classes]``.

  Returns:
    ``(logits, features)`` with float32 logits ``[batch, num_classes]``.
  """
  features["embedding"] = embedding
  return to_float32_logits(head(embedding)), features
