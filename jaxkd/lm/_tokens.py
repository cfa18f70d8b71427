"""Per-token reductions, next-token alignment and top-k teacher targets.

A language model's distillation loss is a per-token divergence averaged over
the tokens that count: not padding, and usually not the prompt. The mean must
be taken over *all* valid tokens of the global batch, so data shards and
gradient-accumulation micro-batches each report ``(sum, count)`` and divide
only once, at the end (:func:`token_sum_and_count`); averaging per-micro-batch
means instead weights a token by the inverse of its micro-batch's size.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxkd.losses import validation as v

Array = jax.Array
ArrayLike = Any


def _masked_values(
    per_token: ArrayLike, mask: ArrayLike | None
) -> tuple[Array, Array]:
  """``per_token`` in the compute dtype with masked entries set to 0."""
  v.check_floating("per_token", per_token)
  per_token = jnp.asarray(per_token)
  per_token = per_token.astype(v.compute_dtype(per_token))
  if mask is None:
    return per_token, jnp.ones(per_token.shape, jnp.bool_)
  mask = v.check_boolean_mask("mask", mask, per_token.shape)
  # A where rather than a product: a masked nan or inf reaches neither the
  # value nor the gradient.
  zero = jnp.zeros((), per_token.dtype)
  return jnp.where(mask, per_token, zero), mask


def token_sum_and_count(
    per_token: ArrayLike, mask: ArrayLike | None = None
) -> tuple[Array, Array]:
  r"""The masked sum of a per-token loss and the number of tokens in it.

  .. math::
    S = \sum_i m_i \ell_i, \qquad n = \sum_i m_i

  Sums and counts add over data shards and gradient-accumulation
  micro-batches; divide once, with :func:`mean_from_sum_and_count`, to get
  the mean over every valid token whatever each part held.

  Args:
    per_token: Floating per-token losses of any shape ``[...]``.
    mask: Optional boolean mask of the same shape; ``False`` marks tokens that
      do not count (padding, prompt). Masked entries reach neither the sum
      nor its gradient, even when they hold ``nan``.

  Returns:
    ``(sum, count)``, two scalars in the compute dtype (float32 for 16-bit
    inputs, so the count is exact up to :math:`2^{24}` tokens).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import lm
    >>> total, count = lm.token_sum_and_count(
    ...     jnp.array([1.0, 2.0, 9.0]), jnp.array([True, True, False]))
    >>> print(total, count)
    3.0 2.0

  .. versionadded:: 0.1.0
  """
  values, mask = _masked_values(per_token, mask)
  return jnp.sum(values), jnp.sum(mask, dtype=values.dtype)


def mean_from_sum_and_count(total: ArrayLike, count: ArrayLike) -> Array:
  r"""``total / max(1, count)``: the token mean from combined parts.

  .. math::
    \bar\ell = \frac{\sum_p S_p}{\max(1, \sum_p n_p)}

  Args:
    total: The summed loss, a scalar (or any shape), e.g. the sum over
      micro-batches of :func:`token_sum_and_count`'s first output.
    count: The number of tokens, of the same shape.

  Returns:
    The mean, 0 when there is no token at all.

  .. versionadded:: 0.1.0
  """
  total = jnp.asarray(total)
  count = jnp.asarray(count).astype(total.dtype)
  return total / jnp.maximum(count, jnp.ones((), total.dtype))


def token_mean(per_token: ArrayLike, mask: ArrayLike | None = None) -> Array:
  r"""Mean of a per-token loss over the valid tokens; 0 if there are none.

  .. math::
    \bar\ell = \frac{\sum_i m_i \ell_i}{\max(1, \sum_i m_i)}

  Args:
    per_token: Floating per-token losses of any shape ``[...]``.
    mask: Optional boolean mask of the same shape (``False``: not counted).

  Returns:
    A scalar in the compute dtype (float32 for 16-bit inputs). With every
    token masked it is 0, with a zero gradient.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import lm
    >>> losses = jnp.array([[1.0, 3.0], [5.0, 0.0]])
    >>> mask = jnp.array([[True, True], [True, False]])
    >>> print(lm.token_mean(losses, mask))
    3.0

  .. versionadded:: 0.1.0
  """
  return mean_from_sum_and_count(*token_sum_and_count(per_token, mask))


class NextTokenTargets(NamedTuple):
  """The inputs, targets and mask of next-token prediction.

  Attributes:
    inputs: ``tokens[..., :-1]``, shape ``[..., L - 1]``: position ``t`` of a
      model's output predicts ``targets[..., t]``.
    targets: ``tokens[..., 1:]``, shape ``[..., L - 1]``.
    mask: Boolean, shape ``[..., L - 1]``: which predictions count.
  """

  inputs: Array
  targets: Array
  mask: Array


def next_token_targets(
    tokens: ArrayLike,
    mask: ArrayLike | None = None,
    *,
    prompt_mask: ArrayLike | None = None,
) -> NextTokenTargets:
  r"""Shifts a token sequence into next-token (input, target, mask) triples.

  The output at position :math:`t` predicts token :math:`t + 1`, so the
  targets are ``tokens[..., 1:]`` and the logits to score are those of
  positions ``0 .. L - 2`` (:func:`next_token_logits`). A prediction counts
  when both its position and its target are real tokens and the target is
  not part of the prompt:

  .. math::
    m'_t = m_t \wedge m_{t+1} \wedge \neg\, \mathrm{prompt}_{t+1}

  so the first response token, predicted from the last prompt token, is
  scored, and no prompt token is.

  Args:
    tokens: Integer token ids of shape ``[..., L]`` (time last), ``L >= 2``.
    mask: Optional boolean mask of the same shape, ``False`` at padding.
    prompt_mask: Optional boolean mask of the same shape, ``True`` at prompt
      tokens (the condition the model is not trained to reproduce).

  Returns:
    A :class:`NextTokenTargets` of arrays of shape ``[..., L - 1]``.

  Raises:
    TypeError: If ``tokens`` is not integer or a mask is not boolean.
    ValueError: If ``L < 2`` or a mask's shape differs from ``tokens``'.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import lm
    >>> tokens = jnp.array([[5, 6, 7, 8, 0]])
    >>> out = lm.next_token_targets(
    ...     tokens, tokens > 0,
    ...     prompt_mask=jnp.array([[True, True, False, False, False]]))
    >>> print(out.targets, out.mask)
    [[6 7 8 0]] [[False  True  True False]]

  .. versionadded:: 0.1.0
  """
  v.check_integer("tokens", tokens)
  tokens = jnp.asarray(tokens)
  v.check_min_rank("tokens", tokens, 1)
  if tokens.shape[-1] < 2:
    raise ValueError(
        "`tokens` needs at least 2 positions along its last (time) axis to"
        f" have a next token, got shape {tuple(tokens.shape)}."
    )
  valid = jnp.ones(tokens.shape, jnp.bool_)
  if mask is not None:
    valid = v.check_boolean_mask("mask", mask, tokens.shape)
  target_mask = valid[..., :-1] & valid[..., 1:]
  if prompt_mask is not None:
    prompt_mask = v.check_boolean_mask("prompt_mask", prompt_mask, tokens.shape)
    target_mask = target_mask & ~prompt_mask[..., 1:]
  return NextTokenTargets(tokens[..., :-1], tokens[..., 1:], target_mask)


def next_token_logits(
    outputs: ArrayLike, *, targets: ArrayLike | None = None
) -> Array:
  """Drops the last position: the outputs that have a next token to predict.

  Works for logits ``[..., L, V]`` and equally for the hidden states
  ``[..., L, H]`` that :func:`jaxkd.lm.fused_distillation_loss` takes.

  Args:
    outputs: Per-position outputs of shape ``[..., L, D]``.
    targets: Optional targets from :func:`next_token_targets`; when given,
      their shape must be ``[..., L - 1]``.

  Returns:
    ``outputs[..., :-1, :]``, shape ``[..., L - 1, D]``.

  Raises:
    ValueError: If ``outputs`` has rank < 2 or does not line up with
      ``targets``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import lm
    >>> print(lm.next_token_logits(jnp.zeros((2, 5, 11))).shape)
    (2, 4, 11)

  .. versionadded:: 0.1.0
  """
  outputs = jnp.asarray(outputs)
  v.check_min_rank("outputs", outputs, 2)
  shifted = outputs[..., :-1, :]
  if targets is not None:
    targets = jnp.asarray(targets)
    if tuple(targets.shape) != tuple(shifted.shape[:-1]):
      raise ValueError(
          f"`outputs` of shape {tuple(outputs.shape)} give predictions of"
          f" shape {tuple(shifted.shape[:-1])} after dropping the last"
          f" position, but `targets` has shape {tuple(targets.shape)}."
      )
  return shifted


def top_k_log_probs(
    teacher_logits: ArrayLike, k: int, *, temperature: ArrayLike = 1.0
) -> tuple[Array, Array]:
  r"""The teacher's ``k`` most likely tokens and their log-probabilities.

  .. math::
    \log p_v = z_v / T - \log \sum_u \exp(z_u / T), \quad
    v \in \mathrm{top}_k(z)

  The log-probabilities are normalised over the *whole* vocabulary before
  the top ``k`` are kept, so they sum (in probability) to the mass the top
  ``k`` cover, at most 1. This is what an offline teacher cache stores
  (:class:`jaxkd.lm.TeacherCacheWriter`).

  Args:
    teacher_logits: Floating logits of shape ``[..., V]``.
    k: Number of tokens kept, ``1 <= k <= V`` (a Python int).
    temperature: Softmax temperature :math:`T > 0`.

  Returns:
    ``(log_probs, indices)``: log-probabilities of shape ``[..., k]`` in
    decreasing order (float32 for 16-bit inputs) and the token ids, int32 of
    shape ``[..., k]``. Ties keep the lower id first.

  Raises:
    ValueError: If ``k`` is not in ``[1, V]`` or ``temperature <= 0``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import lm
    >>> log_probs, ids = lm.top_k_log_probs(jnp.log(jnp.array([0.1, 0.6, 0.3])), 2)
    >>> print(ids, jnp.exp(log_probs).round(3))
    [1 2] [0.6 0.3]

  .. versionadded:: 0.1.0
  """
  v.check_floating("teacher_logits", teacher_logits)
  teacher_logits = jnp.asarray(teacher_logits)
  v.check_min_rank("teacher_logits", teacher_logits, 1)
  vocab = teacher_logits.shape[-1]
  k = v.check_int("k", k)
  if k > vocab:
    raise ValueError(
        f"`k`={k} exceeds the vocabulary size {vocab} (the last axis of"
        f" `teacher_logits`, shape {tuple(teacher_logits.shape)})."
    )
  v.check_positive("temperature", temperature)
  dtype = v.compute_dtype(teacher_logits)
  temperature = jnp.asarray(temperature).astype(dtype)
  temperature = v.nan_unless(temperature > 0, temperature)
  log_probs = jax.nn.log_softmax(teacher_logits.astype(dtype) / temperature)
  values, indices = jax.lax.top_k(log_probs, k)
  return values, indices.astype(jnp.int32)
