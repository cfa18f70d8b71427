"""Adaptors: learned projections of student features to the teacher's width.

A feature-distillation loss compares a student feature with a teacher feature
of the same shape. When the student is narrower (fewer channels or a smaller
embedding), a small adaptor maps its features to the teacher's width first:
a 1x1 convolution for ``[batch, height, width, channels]`` maps (the FitNets
regressor) or a dense layer for embeddings. The adaptor is trained jointly
with the student, by the same loss, but its parameters are held separately
from the student's so that the student's checkpoint and architecture stay
unchanged; it is discarded after training.

The modules are ``flax.linen`` modules::

  adaptor = adaptors.adaptor_for(student_feature.shape, teacher_feature.shape)
  variables = adaptor.init(key, student_feature, train=False)
  projected, updates = adaptor.apply(
      variables, student_feature, train=True, mutable=["batch_stats"])

``mutable=["batch_stats"]`` is needed only with batch normalization; an
adaptor without it returns no ``batch_stats``.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "ConvAdaptor",
    "LinearAdaptor",
    "adaptor_for",
]

Array = jax.Array
Initializer = Any  # ``jax.nn.initializers.Initializer``.
Shape = Sequence[int]


def _check_features(module: nn.Module) -> None:
  features = module.features
  if (
      isinstance(features, bool)
      or not isinstance(features, int)
      or features < 1
  ):
    raise ValueError(
        f"`features` of {type(module).__name__} must be a positive int, got"
        f" {features!r}."
    )


def _compute_dtype(module: nn.Module) -> jnp.dtype:
  """``module.dtype`` if set, else the parameters' dtype, at least float32."""
  if module.dtype is not None:
    return jnp.dtype(module.dtype)
  wide = jnp.dtype(module.param_dtype).itemsize > 4
  return jnp.dtype(jnp.float64 if wide else jnp.float32)


def _checked_input(module: nn.Module, x: Any) -> Array:
  """``x`` as an array after checking ``module.features`` and ``x``'s dtype."""
  _check_features(module)
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(
        f"The input of {type(module).__name__} must be a floating array, got"
        f" dtype {x.dtype}."
    )
  return x


class ConvAdaptor(nn.Module):
  r"""1x1 convolution (and optional batch norm) from student to teacher width.

  Maps an NHWC feature map ``[batch, height, width, C_s]`` to
  ``[batch, height, width, features]`` by the same linear map of the channels
  at every position,

  .. math::
    y_{bhwo} = \sum_c x_{bhwc} K_{0,0,c,o} + \beta_o,

  optionally followed by batch normalization over ``(batch, height, width)``.
  This is the convolutional regressor of FitNets, applied to the student's
  hint layer before the hint (L2) loss.

  The kernel ``K`` has shape ``[1, 1, C_s, features]`` and is drawn by
  ``kernel_init``, by default LeCun normal (variance :math:`1 / C_s`, Flax's
  default for convolutions), so unit-variance student features give outputs
  of roughly unit variance; the bias starts at zero. With
  ``use_batch_norm=True`` the bias is redundant (batch norm removes the
  per-channel mean and has its own offset): set ``use_bias=False``.

  Attributes:
    features: Number of output channels: the teacher's width ``C_t``.
    use_batch_norm: Whether to normalize the projection with
      ``nn.BatchNorm``; its running statistics live in the ``"batch_stats"``
      collection.
    use_bias: Whether the convolution adds a bias.
    kernel_init: Initializer of the ``[1, 1, C_s, features]`` kernel.
    bias_init: Initializer of the ``[features]`` bias.
    momentum: Batch norm's running-average momentum.
    epsilon: Batch norm's variance offset.
    dtype: Computation and output dtype; ``None`` (default) means the
      parameters' dtype, at least float32. The input is cast to it, so
      bfloat16 features are projected in float32.
    param_dtype: Dtype of the parameters (float32; float64 for float64
      computation).

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from jaxkd import adaptors
    >>> adaptor = adaptors.ConvAdaptor(features=8)
    >>> student_features = jnp.ones((2, 4, 4, 3))
    >>> variables = adaptor.init(jax.random.key(0), student_features)
    >>> print(jax.tree.map(jnp.shape, variables["params"]))
    {'conv': {'bias': (8,), 'kernel': (1, 1, 3, 8)}}
    >>> print(adaptor.apply(variables, student_features).shape)
    (2, 4, 4, 8)

  References:
    Romero, Ballas, Kahou, Chassang, Gatta and Bengio, `FitNets: Hints for
    Thin Deep Nets <https://arxiv.org/abs/1412.6550>`_, 2015.

  .. versionadded:: 0.1.0
  """

  features: int
  use_batch_norm: bool = False
  use_bias: bool = True
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool | None = None) -> Array:
    """Projects ``x``.

    Args:
      x: Student features of shape ``[batch, height, width, C_s]``.
      train: With batch norm, ``True`` normalizes by the batch's statistics
        and updates the running ones (call ``apply`` with
        ``mutable=["batch_stats"]``); ``False`` uses the running statistics.
        Required when ``use_batch_norm``; ignored otherwise.

    Returns:
      The projection, shape ``[batch, height, width, features]``.
    """
    x = _checked_input(self, x)
    if x.ndim != 4:
      raise ValueError(
          "ConvAdaptor expects NHWC features of shape [batch, height, width,"
          f" channels], got shape {tuple(x.shape)}; use LinearAdaptor for"
          " embeddings."
      )
    if self.use_batch_norm and train is None:
      raise ValueError(
          "`train` must be given (True or False) when `use_batch_norm` is set:"
          " it chooses batch or running statistics."
      )
    dtype = _compute_dtype(self)
    # An explicit cast: Flax would otherwise mix the input's and the
    # parameters' dtypes, which strict dtype promotion refuses.
    x = x.astype(dtype)
    y = nn.Conv(
        self.features,
        kernel_size=(1, 1),
        use_bias=self.use_bias,
        kernel_init=self.kernel_init,
        bias_init=self.bias_init,
        dtype=dtype,
        param_dtype=self.param_dtype,
        name="conv",
    )(x)
    if self.use_batch_norm:
      y = nn.BatchNorm(
          use_running_average=not train,
          momentum=self.momentum,
          epsilon=self.epsilon,
          dtype=dtype,
          param_dtype=self.param_dtype,
          # Running statistics in float32, or float64 for float64 parameters.
          force_float32_reductions=dtype != jnp.float64,
          name="batch_norm",
      )(y)
    return y


class LinearAdaptor(nn.Module):
  r"""Dense projection of embeddings from student to teacher width.

  Maps ``[..., D_s]`` to ``[..., features]``:

  .. math::
    y_{\dots o} = \sum_d x_{\dots d} W_{do} + b_o .

  The kernel ``W`` has shape ``[D_s, features]`` and is drawn by
  ``kernel_init`` (LeCun normal by default, variance :math:`1 / D_s`); the
  bias starts at zero. The same layer serves token features
  ``[batch, tokens, D_s]``.

  Attributes:
    features: Output width: the teacher's embedding size ``D_t``.
    use_bias: Whether to add a bias.
    kernel_init: Initializer of the ``[D_s, features]`` kernel.
    bias_init: Initializer of the ``[features]`` bias.
    dtype: Computation and output dtype; ``None`` (default) means the
      parameters' dtype, at least float32. The input is cast to it, so
      bfloat16 features are projected in float32.
    param_dtype: Dtype of the parameters (float32; float64 for float64
      computation).

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from jaxkd import adaptors
    >>> adaptor = adaptors.LinearAdaptor(features=16)
    >>> embeddings = jnp.ones((2, 5))
    >>> variables = adaptor.init(jax.random.key(0), embeddings)
    >>> print(jax.tree.map(jnp.shape, variables["params"]))
    {'dense': {'bias': (16,), 'kernel': (5, 16)}}
    >>> print(adaptor.apply(variables, embeddings).shape)
    (2, 16)

  References:
    Romero, Ballas, Kahou, Chassang, Gatta and Bengio, `FitNets: Hints for
    Thin Deep Nets <https://arxiv.org/abs/1412.6550>`_, 2015.

  .. versionadded:: 0.1.0
  """

  features: int
  use_bias: bool = True
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool | None = None) -> Array:
    """Projects ``x``.

    Args:
      x: Student features of shape ``[..., D_s]``.
      train: Ignored; accepted so that every adaptor is called the same way.

    Returns:
      The projection, shape ``[..., features]``.
    """
    del train  # No batch statistics.
    x = _checked_input(self, x)
    if x.ndim < 1:
      raise ValueError(
          "LinearAdaptor expects features of shape [..., D_s], got a scalar."
      )
    dtype = _compute_dtype(self)
    x = x.astype(dtype)  # Explicit, as in ConvAdaptor.
    return nn.Dense(
        self.features,
        use_bias=self.use_bias,
        kernel_init=self.kernel_init,
        bias_init=self.bias_init,
        dtype=dtype,
        param_dtype=self.param_dtype,
        name="dense",
    )(x)


def _as_shape(name: str, shape: Any) -> tuple[int, ...]:
  """A shape given as a sequence of ints or as anything with ``.shape``."""
  shape = getattr(shape, "shape", shape)
  try:
    dims = tuple(operator.index(d) for d in shape)
  except TypeError:
    raise TypeError(
        f"`{name}` must be a shape (a sequence of ints) or an array, got"
        f" {shape!r}."
    ) from None
  if any(d < 0 for d in dims):
    raise ValueError(f"`{name}` must hold non-negative sizes, got {dims}.")
  return dims


def adaptor_for(
    student_shape: Shape | Any,
    teacher_shape: Shape | Any,
    *,
    use_batch_norm: bool = False,
) -> ConvAdaptor | LinearAdaptor:
  """The adaptor that maps student features of one shape to the teacher's.

  Both shapes include the batch axis and have the channel (width) axis last;
  every other axis must agree, since an adaptor changes only the width:

  * rank 4, ``[batch, height, width, C_s]`` and ``[batch, height, width,
    C_t]``: a :class:`ConvAdaptor` with ``features=C_t`` (and batch norm if
    ``use_batch_norm``);
  * rank 2, ``[batch, D_s]`` and ``[batch, D_t]``, or rank 3 token features
    ``[batch, tokens, D_s]``: a :class:`LinearAdaptor` with ``features=D_t``.

  An adaptor is returned even when the widths already agree (a learned
  projection can still help); skip it in that case if you want none.

  Args:
    student_shape: Shape of the student feature, or the array itself (or a
      ``jax.ShapeDtypeStruct``).
    teacher_shape: Shape of the teacher feature, or the array itself.
    use_batch_norm: Add batch normalization after the projection (rank-4
      features only).

  Returns:
    An unbound adaptor module; ``init`` it on a student feature.

  Raises:
    ValueError: The ranks differ, the rank is not 2, 3 or 4, the axes other
      than the last differ (resize or pool one feature first), or
      ``use_batch_norm`` is set for features of rank 2 or 3.

  Examples:
    >>> from jaxkd import adaptors
    >>> adaptor = adaptors.adaptor_for((8, 7, 7, 64), (8, 7, 7, 256))
    >>> print(type(adaptor).__name__, adaptor.features)
    ConvAdaptor 256
    >>> adaptor = adaptors.adaptor_for((8, 384), (8, 768))
    >>> print(type(adaptor).__name__, adaptor.features)
    LinearAdaptor 768

  .. versionadded:: 0.1.0
  """
  student = _as_shape("student_shape", student_shape)
  teacher = _as_shape("teacher_shape", teacher_shape)
  if len(student) != len(teacher):
    raise ValueError(
        f"`student_shape` {student} and `teacher_shape` {teacher} have"
        " different ranks; flatten or pool one feature so that both have the"
        " same layout."
    )
  if len(student) not in (2, 3, 4):
    raise ValueError(
        f"`student_shape` {student} and `teacher_shape` {teacher} must have"
        " rank 4 ([batch, height, width, channels]), 2 ([batch, features])"
        " or 3 ([batch, tokens, features])."
    )
  if student[:-1] != teacher[:-1]:
    what = "spatial dimensions" if len(student) == 4 else "leading dimensions"
    raise ValueError(
        f"`student_shape` {student} and `teacher_shape` {teacher} differ in"
        f" their {what}; an adaptor changes only the last (channel) axis:"
        " resize or pool one feature map first."
    )
  if len(student) == 4:
    return ConvAdaptor(features=teacher[-1], use_batch_norm=use_batch_norm)
  if use_batch_norm:
    raise ValueError(
        "`use_batch_norm` applies to rank-4 feature maps only; got"
        f" `student_shape` {student} and `teacher_shape` {teacher}."
    )
  return LinearAdaptor(features=teacher[-1])
