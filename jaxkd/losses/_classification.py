r"""Cross-entropy with integer or soft labels, and the label checks it shares.

Integer labels are checked at trace time when they are concrete (shape,
dtype, range); labels that are traced cannot be inspected, so an
out-of-range one makes its example's loss ``nan`` instead of a silent 0 (a
one-hot of an out-of-range index is all zeros). Labels of rows that ``where``
masks out are ignored, so padded rows may carry any label (for example -1).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.losses import validation as v

Array = jax.Array
ArrayLike = Any


def check_class_indices(
    labels: ArrayLike,
    *,
    num_classes: int,
    per_example_shape: tuple[int, ...],
    logits_shape: tuple[int, ...],
    where: Array | None,
) -> Array:
  """Checks integer ``labels`` of the per-example shape; returns them.

  Raises ``ValueError`` for a wrong shape and, when ``labels`` (and
  ``where``, if given) are concrete, for values outside
  ``[0, num_classes)`` in the rows ``where`` keeps.
  """
  # Read the concrete value first: under jit, jnp.asarray of a constant may
  # already be a tracer.
  concrete = v.concrete_value(labels)
  labels = jnp.asarray(labels)
  if tuple(labels.shape) != tuple(per_example_shape):
    hint = ""
    if labels.shape == tuple(per_example_shape) + (1,):
      hint = " Drop the trailing axis, e.g. `labels[..., 0]`."
    raise ValueError(
        "Integer `labels` must have the per-example shape"
        f" {tuple(per_example_shape)} (the logits' shape"
        f" {tuple(logits_shape)} without the class axis), got shape"
        f" {tuple(labels.shape)}.{hint}"
    )
  concrete_where = None if where is None else v.concrete_value(where)
  if concrete is not None and (where is None or concrete_where is not None):
    checked = (
        concrete if where is None
        else concrete[np.broadcast_to(concrete_where, concrete.shape)]
    )
    bad = (checked < 0) | (checked >= num_classes)
    if np.any(bad):
      raise ValueError(
          f"`labels` must lie in [0, {num_classes}) (the number of classes),"
          f" got {checked[bad].ravel()[:5].tolist()}."
      )
  return labels


def label_targets(
    labels: ArrayLike,
    logits_shape: tuple[int, ...],
    dtype: Any,
    *,
    axis: int,
    where: Array | None,
) -> tuple[Array, Array | None]:
  """Target distributions ``[..., C]`` (class axis ``axis``) from ``labels``.

  Returns ``(targets, valid)``: ``valid`` is ``None`` for soft labels and,
  for integer labels, the per-example boolean "the label lies in
  ``[0, C)``", false only for traced out-of-range labels (concrete ones
  raise).
  """
  raw_labels = labels
  concrete = v.concrete_value(labels)
  labels = jnp.asarray(labels)
  num_classes = logits_shape[axis]
  if jnp.issubdtype(labels.dtype, jnp.integer):
    per_example_shape = logits_shape[:axis] + logits_shape[axis + 1 :]
    labels = check_class_indices(
        raw_labels, num_classes=num_classes, per_example_shape=per_example_shape,
        logits_shape=logits_shape, where=where,
    )
    valid = (labels >= 0) & (labels < num_classes)
    class_ids = jax.lax.broadcasted_iota(jnp.int32, logits_shape, axis)
    one_hot = class_ids == jnp.expand_dims(labels.astype(jnp.int32), axis)
    return one_hot.astype(dtype), valid
  if jnp.issubdtype(labels.dtype, jnp.floating):
    if tuple(labels.shape) != tuple(logits_shape):
      raise ValueError(
          "One-hot or soft `labels` must have the shape of the logits"
          f" {tuple(logits_shape)}, got {tuple(labels.shape)}. Integer"
          " class indices have the logits' shape without the class axis."
      )
    if concrete is not None and np.any(concrete < 0):
      raise ValueError(
          "Soft `labels` must be probabilities (>= 0), got minimum"
          f" {np.nanmin(concrete)}."
      )
    targets = labels.astype(dtype)
    if where is not None:
      # Masked rows may hold anything (nan padding): keep it out of both
      # passes.
      targets = jnp.where(
          jnp.expand_dims(where, axis), targets, jnp.zeros((), dtype)
      )
    return targets, None
  raise TypeError(
      "`labels` must be integer class indices or floating one-hot/soft"
      f" labels, got dtype {labels.dtype}."
  )


def cross_entropy_from_targets(
    log_probs: Array, targets: Array, axis: int
) -> Array:
  """``-sum_c y_c log q_c`` with ``0 log 0 = 0`` (the ``-inf`` guard).

  A class with target 0 contributes exactly 0 even where ``log q = -inf``
  (a ``-inf`` logit), in the value and in the gradient; a positive target on
  a ``-inf`` logit gives ``inf`` (the true cross-entropy); ``nan`` in either
  propagates.
  """
  used = targets != 0  # nan stays in
  zero = jnp.zeros((), log_probs.dtype)
  safe_log_probs = jnp.where(used, log_probs, zero)
  return -jnp.sum(jnp.where(used, targets * safe_log_probs, zero), axis=axis)


def smooth(targets: Array, label_smoothing: ArrayLike, axis: int) -> Array:
  """``(1 - eps) y + eps / C``: every class gets ``eps / C``."""
  num_classes = targets.shape[axis]
  smoothing = jnp.asarray(label_smoothing).astype(targets.dtype)
  return (1 - smoothing) * targets + smoothing / num_classes


@functools.partial(jax.jit, static_argnames=("axis",))
def _cross_entropy_core(
    logits: Array,
    targets: Array,
    valid: Array | None,
    label_smoothing: ArrayLike,
    axis: int,
) -> Array:
  targets = smooth(targets, label_smoothing, axis)
  loss = cross_entropy_from_targets(
      jax.nn.log_softmax(logits, axis=axis), targets, axis
  )
  if valid is not None:
    loss = jnp.where(valid, loss, jnp.full((), jnp.nan, loss.dtype))
  return loss


def prepare_logits(
    name: str, logits: ArrayLike, axis: int, where: ArrayLike | None
) -> tuple[Array, int, Array | None]:
  """Checks one logit array and its mask; returns them cast and masked.

  ``(logits, axis, where)``: the logits in the compute dtype with the
  masked-out examples zeroed, ``axis`` non-negative, ``where`` broadcast to
  the per-example shape.
  """
  v.check_floating(name, logits)
  v.check_min_rank(name, logits, 1)
  axis = v.normalize_axis(name, logits, axis)
  (logits,) = v.as_compute_dtype(logits)
  where = v.example_where(where, logits, axis)
  return v.zero_masked_examples(logits, where, axis), axis, where


def cross_entropy_loss(
    logits: Array,
    labels: ArrayLike,
    *,
    label_smoothing: ArrayLike,
    axis: int,
    where: Array | None,
) -> Array:
  """The cross-entropy of checked, cast logits (``where`` not applied)."""
  targets, valid = label_targets(
      labels, tuple(logits.shape), logits.dtype, axis=axis, where=where
  )
  return _cross_entropy_core(logits, targets, valid, label_smoothing, axis)


def cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    label_smoothing: ArrayLike = 0.0,
    axis: int = -1,
    where: ArrayLike | None = None,
) -> Array:
  r"""Softmax cross-entropy with integer or soft labels and label smoothing.

  .. math::
    H(y, q) = -\sum_c y_c \log q_c, \quad
    q = \mathrm{softmax}(z), \quad
    y = (1 - \epsilon)\, \mathrm{onehot}(\ell) + \epsilon / C

  for integer labels :math:`\ell` (or :math:`y = (1 - \epsilon)\, y_{soft}
  + \epsilon / C` for soft labels). Computed from ``log_softmax`` in float32
  (or float64) whatever the input dtype, never ``log(softmax)``.

  The ``-inf`` guard: a class whose logit is ``-inf`` and whose target is 0
  contributes exactly 0 (value and gradient), so padded classes are free; a
  positive target on a ``-inf`` logit gives ``inf``, the true value. Label
  smoothing spreads :math:`\epsilon / C` over *all* ``C`` classes, so with
  ``-inf`` (padded) classes and :math:`\epsilon > 0` the loss is ``inf``;
  slice the padding off first (or pass soft labels that are 0 there).

  Integer labels outside ``[0, C)`` raise ``ValueError`` when they are
  concrete; traced ones give ``nan`` for their example (never the silent 0
  of an all-zero one-hot). ``nan`` in the logits or labels gives ``nan``.

  Args:
    logits: Floating logits of shape ``[..., num_classes]`` (class axis
      ``axis``).
    labels: Integer class indices of the per-example shape ``[...]`` (the
      logits' shape without ``axis``; ``[B, 1]`` for logits ``[B, C]`` is an
      error), or non-negative soft (or one-hot) labels of the logits' shape.
      Labels of rows masked out by ``where`` are ignored.
    label_smoothing: :math:`\epsilon \in [0, 1]`; a traced value outside it
      gives ``nan``.
    axis: The class axis.
    where: Optional boolean mask broadcastable to the per-example shape;
      masked-out examples give 0 and no gradient.

  Returns:
    The per-example cross-entropy, shape ``[...]``; float32 for bfloat16 and
    float16 inputs.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses
    >>> logits = jnp.array([[2.0, 0.0, -jnp.inf], [0.0, 0.0, 0.0]])
    >>> print(losses.cross_entropy(logits, jnp.array([0, 2])).round(4))
    [0.1269 1.0986]

  References:
    Szegedy, Vanhoucke, Ioffe, Shlens and Wojna, `Rethinking the Inception
    Architecture for Computer Vision <https://arxiv.org/abs/1512.00567>`_,
    2016 (label smoothing).

  .. seealso:: :func:`distillation_loss`, :func:`soft_cross_entropy`.

  .. versionadded:: 0.1.0
  """
  smoothing_valid = v.check_in_unit_interval("label_smoothing", label_smoothing)
  logits, axis, where = prepare_logits("logits", logits, axis, where)
  loss = cross_entropy_loss(
      logits, labels, label_smoothing=label_smoothing, axis=axis, where=where
  )
  return v.nan_unless(smoothing_valid, v.apply_where(loss, where))
