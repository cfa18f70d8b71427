"""Losses for data-free distillation: training a generator against the teacher.

Without the training set, a generator (or directly optimised inputs) makes
images on which the teacher behaves as it does on real data; the student is
then distilled on them. DeepInversion (Yin et al., 2020) matches the batch
statistics stored in the teacher's batch-normalisation layers; DAFL (Chen et
al., 2019) asks for confident teacher outputs, strong activations and classes
that are balanced over the batch. All of these are functions of the
teacher's activations and differentiate into the generated inputs.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxkd.losses import _classification
from jaxkd.losses import _soft_target
from jaxkd.losses import validation as v

Array = jax.Array
ArrayLike = Any


def _safe_l2_norm(x: Array) -> Array:
  """``||x||_2`` over all elements, with gradient 0 (not nan) at ``x = 0``.

  The double ``where`` keeps ``sqrt``'s infinite slope at 0 out of the
  backward pass: at an exact match the (sub)gradient is taken as 0.
  """
  squared = jnp.sum(x * x)
  nonzero = squared != 0  # nan stays nan
  safe = jnp.where(nonzero, squared, jnp.ones((), x.dtype))
  return jnp.where(nonzero, jnp.sqrt(safe), jnp.zeros((), x.dtype))


def batchnorm_statistics_loss(
    features: ArrayLike,
    running_mean: ArrayLike,
    running_var: ArrayLike,
    *,
    axis: int = -1,
) -> Array:
  r"""DeepInversion feature-statistics loss for one batch-norm layer.

  The batch mean and (biased) variance of ``features`` over every axis but
  the channel axis are compared with the layer's running statistics:

  .. math::
    \mathcal{R}_{feature} = \lVert \mu(x) - \mu_{BN} \rVert_2
      + \lVert \sigma^2(x) - \sigma^2_{BN} \rVert_2

  The norms are plain (not squared) L2 norms, as in the paper and its
  reference implementation (``torch.norm(var - running_var, 2) +
  torch.norm(mean - running_mean, 2)``, with ``var(unbiased=False)``); the
  full DeepInversion loss sums this term over the teacher's batch-norm
  layers (the inputs of each). At an exact match, where the norm is not
  differentiable, the gradient is 0.

  This is a **batch-level** loss: it returns a scalar.

  Args:
    features: Floating activations entering a batch-norm layer, shape
      ``[..., channels]`` (NHWC; channel axis ``axis``, at least two
      dimensions).
    running_mean: The layer's running mean, shape ``[channels]``.
    running_var: The layer's running variance, shape ``[channels]``.
    axis: The channel axis of ``features``.

  Returns:
    A scalar (float32 for 16-bit inputs).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses
    >>> features = jnp.array([[0.0, 1.0], [2.0, 3.0]])  # batch mean [1, 2]
    >>> loss = losses.batchnorm_statistics_loss(
    ...     features, jnp.array([1.0, 2.0]), jnp.array([1.0, 1.0]))
    >>> print(loss.round(4))  # means match; variances are [1, 1]
    0.0

  References:
    Yin, Molchanov, Li, Alvarez, Mallya, Hoiem, Jha and Kautz, `Dreaming to
    Distill: Data-free Knowledge Transfer via DeepInversion
    <https://arxiv.org/abs/1912.08795>`_, 2020.

  .. versionadded:: 0.1.0
  """
  v.check_floating("features", features)
  v.check_floating("running_mean", running_mean)
  v.check_floating("running_var", running_var)
  v.check_min_rank("features", features, 2)
  axis = v.normalize_axis("features", features, axis)
  channels = features.shape[axis]
  for name, stat in (("running_mean", running_mean),
                     ("running_var", running_var)):
    if tuple(stat.shape) != (channels,):
      raise ValueError(
          f"`{name}` must have shape ({channels},) (the channels of"
          f" `features` of shape {tuple(features.shape)} along axis {axis}),"
          f" got {tuple(stat.shape)}."
      )
  features, running_mean, running_var = v.as_compute_dtype(
      features, running_mean, running_var
  )
  reduce_axes = tuple(i for i in range(features.ndim) if i != axis)
  mean = jnp.mean(features, axis=reduce_axes, keepdims=True)
  # Two-pass biased variance: no cancellation from E[x^2] - E[x]^2.
  var = jnp.mean(jnp.square(features - mean), axis=reduce_axes)
  mean = jnp.squeeze(mean, axis=reduce_axes)
  return _safe_l2_norm(mean - running_mean) + _safe_l2_norm(var - running_var)


def dafl_one_hot_loss(
    teacher_logits: ArrayLike,
    *,
    axis: int = -1,
    where: ArrayLike | None = None,
) -> Array:
  r"""DAFL one-hot loss: cross-entropy with the teacher's own argmax.

  .. math::
    \mathcal{L}_{oh} = -\log \mathrm{softmax}(z^T)_{\hat y},
    \quad \hat y = \arg\max_c z^T_c

  Minimising it (with respect to the generated inputs) makes the teacher
  confident on them. The pseudo-label :math:`\hat y` is a constant (ties go
  to the first class, as ``argmax``); the gradient flows through the
  log-softmax only.

  Args:
    teacher_logits: Floating logits of shape ``[..., num_classes]``.
    axis: The class axis.
    where: Optional boolean mask broadcastable to the per-example shape;
      masked-out examples give 0 and no gradient.

  Returns:
    The per-example loss, shape ``[...]`` (float32 for 16-bit inputs). The
    paper's term is its batch mean.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses
    >>> logits = jnp.array([[0.0, 0.0], [3.0, 0.0]])
    >>> print(losses.dafl_one_hot_loss(logits).round(4))
    [0.6931 0.0486]

  References:
    Chen, Wang, Xu, Yang, Liu, Shi, Xu, Xu and Tian, `Data-Free Learning of
    Student Networks <https://arxiv.org/abs/1904.01186>`_, 2019.

  .. versionadded:: 0.1.0
  """
  logits, axis, where = _classification.prepare_logits(
      "teacher_logits", teacher_logits, axis, where
  )
  log_probs = jax.nn.log_softmax(logits, axis=axis)
  pseudo_label = jnp.argmax(logits, axis=axis, keepdims=True)
  loss = -jnp.take_along_axis(log_probs, pseudo_label, axis=axis)
  return v.apply_where(jnp.squeeze(loss, axis), where)


def dafl_activation_loss(features: ArrayLike) -> Array:
  r"""DAFL activation loss: minus the mean absolute pre-logit activation.

  .. math::
    \mathcal{L}_a = -\frac{1}{n d} \sum_{i=1}^{n} \lVert f^T_i \rVert_1

  for ``n`` examples of ``d`` features. The paper writes
  :math:`-\frac{1}{n}\sum_i \lVert f^T_i \rVert_1`; this function follows
  the authors' code (``-features.abs().mean()``), i.e. the paper's value
  divided by the number of features per example, so that weights tuned
  with that code carry over.

  This is a **batch-level** loss: it returns a scalar.

  Args:
    features: Floating teacher features before the classifier, any shape
      (typically ``[batch, features]``), at least one element.

  Returns:
    A scalar (float32 for 16-bit inputs).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses
    >>> features = jnp.array([[1.0, -3.0], [0.0, 2.0]])
    >>> print(losses.dafl_activation_loss(features).round(4))
    -1.5

  References:
    Chen, Wang, Xu, Yang, Liu, Shi, Xu, Xu and Tian, `Data-Free Learning of
    Student Networks <https://arxiv.org/abs/1904.01186>`_, 2019.

  .. versionadded:: 0.1.0
  """
  v.check_floating("features", features)
  if features.size == 0:
    raise ValueError(
        "`features` must hold at least one element, got shape"
        f" {tuple(features.shape)}."
    )
  (features,) = v.as_compute_dtype(features)
  return -jnp.mean(jnp.abs(features))


def dafl_information_entropy_loss(
    teacher_logits: ArrayLike, *, axis: int = -1
) -> Array:
  r"""DAFL information-entropy loss: minus the entropy of the mean prediction.

  .. math::
    \mathcal{L}_{ie} = -H(\bar p) = \sum_c \bar p_c \log \bar p_c,
    \quad \bar p = \frac{1}{n} \sum_{i=1}^{n} \mathrm{softmax}(z^T_i)

  Minimising it pushes the batch-averaged teacher prediction towards the
  uniform distribution (minimum :math:`-\log C`), i.e. generated batches
  with balanced classes. :math:`\log \bar p` is computed in log space,
  ``logsumexp`` over the batch of ``log_softmax`` minus :math:`\log n`, so
  classes of tiny probability give no ``log 0``.

  The authors' code takes the logarithm in base 10 (``torch.log10``); its
  value is this one divided by :math:`\ln 10`, which only rescales the
  term's weight.

  This is a **batch-level** loss: it returns a scalar.

  Args:
    teacher_logits: Floating logits of shape ``[..., num_classes]``; every
      axis but ``axis`` is a batch axis averaged over.
    axis: The class axis.

  Returns:
    A scalar (float32 for 16-bit inputs).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses
    >>> balanced = jnp.array([[5.0, 0.0], [0.0, 5.0]])
    >>> print(losses.dafl_information_entropy_loss(balanced).round(4))
    -0.6931

  References:
    Chen, Wang, Xu, Yang, Liu, Shi, Xu, Xu and Tian, `Data-Free Learning of
    Student Networks <https://arxiv.org/abs/1904.01186>`_, 2019.

  .. versionadded:: 0.1.0
  """
  v.check_floating("teacher_logits", teacher_logits)
  v.check_min_rank("teacher_logits", teacher_logits, 1)
  axis = v.normalize_axis("teacher_logits", teacher_logits, axis)
  if teacher_logits.size == 0:
    raise ValueError(
        "`teacher_logits` must hold at least one example and one class, got"
        f" shape {tuple(teacher_logits.shape)}."
    )
  (logits,) = v.as_compute_dtype(teacher_logits)
  log_probs = jax.nn.log_softmax(jnp.moveaxis(logits, axis, -1), axis=-1)
  log_probs = log_probs.reshape(-1, log_probs.shape[-1])
  count = log_probs.shape[0]
  # A class with probability 0 in every example (all its logits -inf) has
  # log p_bar = -inf; logsumexp's gradient there would be exp(-inf + inf) =
  # nan, so such columns go through logsumexp as zeros and are set to -inf
  # after (double where).
  possible = jnp.any(log_probs != -jnp.inf, axis=0)
  safe_log_probs = jnp.where(
      possible, log_probs, jnp.zeros((), log_probs.dtype)
  )
  log_mean = jnp.where(
      possible,
      jax.nn.logsumexp(safe_log_probs, axis=0) - math.log(count),
      -jnp.inf,
  )
  # sum p log p = -H(p); classes with p = 0 (all logits -inf) contribute 0.
  return -_soft_target.cross_entropy_from_log_probs(log_mean, log_mean, -1)
