"""Cross-entropy with integer or soft labels: the one the engine uses."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.losses import _validation

__all__ = ["cross_entropy"]


def _labels_shape_error(labels: Any, logits: jax.Array) -> ValueError:
  return ValueError(
      "`labels` must be integer class indices of shape"
      f" {tuple(logits.shape[:-1])} or soft labels of shape"
      f" {tuple(logits.shape)} for logits of shape {tuple(logits.shape)};"
      f" got shape {tuple(np.shape(labels))}."
  )


def cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    label_smoothing: float = 0.0,
    where: jax.Array | None = None,
) -> jax.Array:
  r"""Cross-entropy of logits with integer or soft labels, per example.

  .. math::
    \ell = -\sum_c q_c \log \mathrm{softmax}(z)_c, \qquad
    q = (1 - \varepsilon)\, y + \varepsilon / C

  with :math:`y` the one-hot (integer labels) or given soft labels and
  :math:`\varepsilon` the label smoothing. A class of logit ``-inf`` whose
  target is exactly 0 contributes 0 (not ``0 * -inf = NaN``), so padded
  classes are exact; a ``-inf`` logit with a positive target gives ``+inf``.

  Args:
    logits: ``[..., C]`` floating logits (computed in float32; float64 stays
      float64).
    labels: Integer ``[...]`` in ``[0, C)`` or soft ``[..., C]``.
    label_smoothing: :math:`\varepsilon` in ``[0, 1]``.
    where: Optional boolean ``[...]``; masked examples give 0.

  Returns:
    ``[...]`` per-example losses. Integer labels outside ``[0, C)`` raise a
    ``ValueError`` when they are known at trace time and give NaN for those
    examples when traced.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses
    >>> print(losses.cross_entropy(jnp.array([[0.0, 0.0]]),
    ...                            jnp.array([1])).round(4))
    [0.6931]
  """
  _validation.check_floating("logits", logits)
  _validation.check_in_unit_interval("label_smoothing", label_smoothing)
  dtype = jnp.float64 if logits.dtype == jnp.float64 else jnp.float32
  logits = jnp.asarray(logits, dtype)
  num_classes = logits.shape[-1]
  labels = jnp.asarray(labels) if not isinstance(labels, jax.Array) else labels
  if jnp.issubdtype(labels.dtype, jnp.integer):
    if labels.shape != logits.shape[:-1]:
      raise _labels_shape_error(labels, logits)
    concrete = _validation.concrete_value(labels)
    if concrete is not None and concrete.size and (
        concrete.min() < 0 or concrete.max() >= num_classes
    ):
      bad = concrete[(concrete < 0) | (concrete >= num_classes)]
      raise ValueError(
          f"`labels` must lie in [0, {num_classes}) for {num_classes}"
          f" classes; got {bad.ravel()[:5].tolist()}."
      )
    in_range = (labels >= 0) & (labels < num_classes)
    targets = jax.nn.one_hot(labels, num_classes, dtype=dtype)
  else:
    _validation.check_floating("labels", labels)
    if labels.shape != logits.shape:
      raise _labels_shape_error(labels, logits)
    in_range = jnp.ones(logits.shape[:-1], jnp.bool_)
    targets = labels.astype(dtype)
  targets = (1.0 - label_smoothing) * targets + label_smoothing / num_classes
  log_p = jax.nn.log_softmax(logits, axis=-1)
  # 0 * -inf is NaN; a zero target takes nothing from its class.
  terms = jnp.where(targets == 0, 0.0, targets * log_p)
  loss = -jnp.sum(terms, axis=-1)
  loss = jnp.where(in_range, loss, jnp.nan)
  if where is not None:
    where = jnp.asarray(where, jnp.bool_)
    if where.shape != loss.shape:
      raise ValueError(
          f"`where` must have the per-example shape {tuple(loss.shape)}, got"
          f" {tuple(where.shape)}."
      )
    loss = jnp.where(where, loss, 0.0)
  return loss
