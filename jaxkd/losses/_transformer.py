"""Transformer feature losses: hidden states and attention distributions.

Both losses are token-level batch losses: they average over every valid token
of the batch (a padded token counts for nothing) and return a scalar, the
convention of language-model losses. A batch without a valid token gives 0
with zero gradients. bfloat16 and float16 inputs are computed in float32.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxkd.losses import validation as v
from jaxkd.losses._feature import mask_examples
from jaxkd.losses._feature import prepare_feature_pair
from jaxkd.losses._feature import safe_l2_normalize
from jaxkd.losses._soft_target import kl_from_log_probs

__all__ = ["attention_kl_loss", "hidden_state_loss"]

Array = jax.Array
ArrayLike = Any

_HIDDEN_KINDS = ("mse", "cosine")


def _token_mask(mask: ArrayLike | None, shape: tuple[int, ...]) -> Array | None:
  """Checks a boolean per-token mask and broadcasts it to ``shape``."""
  return v.broadcast_where(mask, shape, name="mask", target="token shape")


def _safe_mean(total: Array, count: Array) -> Array:
  """``total / count``, and exactly 0 (zero gradient) when ``count`` is 0."""
  positive = count > 0
  one = jnp.ones((), count.dtype)
  return jnp.where(positive, total / jnp.where(positive, count, one), 0.0)


def hidden_state_loss(
    student_hidden: ArrayLike,
    teacher_hidden: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    kind: str = "mse",
) -> Array:
  r"""Distance between student and teacher hidden states over valid tokens.

  With :math:`m_t` the token mask, :math:`n = \sum_t m_t` the number of valid
  tokens and :math:`D` the width:

  .. math::
    \text{mse:}\; \frac{1}{n D}\sum_t m_t \|s_t - h_t\|^2, \qquad
    \text{cosine:}\; \frac{1}{n}\sum_t m_t
      \Big(1 - \frac{s_t \cdot h_t}{\|s_t\|\,\|h_t\|}\Big)

  The shapes must match: project a narrower student first with a learned
  map trained alongside it (``jaxkd.adaptors.LinearAdaptor`` or a
  ``flax.linen.Dense`` to the teacher's width), as in TinyBERT. An all-zero
  vector has cosine similarity 0 (loss 1) and a finite gradient.

  Args:
    student_hidden: Floating hidden states ``[..., width]``, e.g. ``[batch,
      length, width]`` (a model's ``"block_{i}"`` or ``"final_hidden"``
      feature), already projected to the teacher's width.
    teacher_hidden: Floating hidden states of the same shape.
    mask: Optional boolean mask broadcastable to the token shape ``[...]``
      (``[batch, length]``), True for valid tokens; masked tokens give no
      value and no gradient, whatever they hold.
    kind: ``"mse"`` or ``"cosine"``.

  Returns:
    A scalar: the mean over valid tokens; float32 for 16-bit inputs.

  Raises:
    ValueError: If the shapes differ (naming both arguments), the rank is
      below 2, the mask does not broadcast or ``kind`` is unknown.
    TypeError: For non-floating inputs or a non-boolean mask.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses
    >>> student = jnp.array([[[1.0, 2.0], [0.0, 1.0], [5.0, 5.0]]])
    >>> teacher = jnp.array([[[1.0, 0.0], [0.0, 3.0], [0.0, 0.0]]])
    >>> mask = jnp.array([[True, True, False]])
    >>> print(losses.hidden_state_loss(student, teacher, mask=mask))
    2.0

  References:
    Jiao, Yin, Shang, Jiang, Chen, Li, Wang and Liu, `TinyBERT: Distilling
    BERT for Natural Language Understanding
    <https://arxiv.org/abs/1909.10351>`_, 2020.

  .. versionadded:: 0.1.0
  """
  v.check_choice("kind", kind, _HIDDEN_KINDS)
  student, teacher = prepare_feature_pair(
      "student_hidden", student_hidden, "teacher_hidden", teacher_hidden,
      advice="Project the student's hidden states to the teacher's width"
      " first (jaxkd.adaptors.LinearAdaptor or a Dense layer).",
  )
  mask = _token_mask(mask, student.shape[:-1])
  student = mask_examples(student, mask)
  teacher = mask_examples(teacher, mask)
  if kind == "mse":
    per_token = jnp.mean(jnp.square(student - teacher), axis=-1)
  else:
    cosine = jnp.sum(
        safe_l2_normalize(student, -1) * safe_l2_normalize(teacher, -1),
        axis=-1,
    )
    per_token = 1 - cosine
  if mask is None:
    return jnp.mean(per_token)
  zero = jnp.zeros((), per_token.dtype)
  total = jnp.sum(jnp.where(mask, per_token, zero))
  return _safe_mean(total, jnp.sum(mask, dtype=per_token.dtype))


def attention_kl_loss(
    student_attention: ArrayLike,
    teacher_attention: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    causal: bool = True,
) -> Array:
  r"""MiniLM attention transfer: KL between attention distributions.

  The inputs are attention LOGITS (the scaled scores
  :math:`q \cdot k / \sqrt{d}` before the softmax, e.g. a
  :class:`~jaxkd.models.TransformerLM`'s ``"attention_logits_{i}"``
  feature), not probabilities: each query row is normalised here with a
  log-softmax, so the distributions stay in log space. Disallowed keys (later
  positions when ``causal``, padded keys when ``mask`` is given) are set to
  ``-inf`` first, and ``-inf`` already in the inputs is handled exactly: a key
  with zero teacher probability contributes 0. With :math:`A = \mathrm{softmax}`
  of a row, :math:`H` heads and :math:`n` valid query positions:

  .. math::
    \mathcal{L} = \frac{1}{H n} \sum_{b, h} \sum_{q \text{ valid}}
      \mathrm{KL}\big(A^T_{b h q} \,\|\, A^S_{b h q}\big)

  Both models must have the same number of heads and the same length.

  Args:
    student_attention: Floating logits ``[batch, heads, length, length]``
      (query axis, then key axis).
    teacher_attention: Floating logits of the same shape.
    mask: Optional boolean ``[batch, length]`` mask, True for valid tokens:
      masked query rows contribute 0 (no value, no gradient, whatever they
      hold) and masked keys are removed from every valid row.
    causal: Whether keys after the query are removed (decoder models).

  Returns:
    A scalar; float32 for 16-bit inputs. A valid row whose keys are all
    ``-inf`` gives ``nan``.

  Raises:
    ValueError: For shapes that differ or are not ``[B, H, L, L]``, or a mask
      not of shape ``[B, L]``.
    TypeError: For non-floating logits or a non-boolean mask.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses
    >>> teacher = jnp.array([[[[0.0, 0.0], [0.0, 0.0]]]])
    >>> student = jnp.array([[[[0.0, 0.0], [0.0, 2.0]]]])
    >>> print(f"{losses.attention_kl_loss(student, teacher):.4f}")
    0.2169

  References:
    Wang, Wei, Dong, Bao, Yang and Zhou, `MiniLM: Deep Self-Attention
    Distillation for Task-Agnostic Compression of Pre-Trained Transformers
    <https://arxiv.org/abs/2002.10957>`_, 2020.

  .. versionadded:: 0.1.0
  """
  v.check_floating("student_attention", student_attention)
  v.check_floating("teacher_attention", teacher_attention)
  v.check_rank("student_attention", student_attention, 4)
  v.check_same_shape(
      "student_attention", student_attention, "teacher_attention",
      teacher_attention,
  )
  batch, heads, length, keys = student_attention.shape
  if keys != length:
    raise ValueError(
        "`student_attention` must be self-attention logits [batch, heads,"
        f" length, length], got shape {tuple(student_attention.shape)}."
    )
  if mask is not None:
    mask = jnp.asarray(mask)
    if mask.shape != (batch, length):
      raise ValueError(
          f"`mask` must have shape [batch, length] = {(batch, length)}, got"
          f" {tuple(mask.shape)}."
      )
  mask = _token_mask(mask, (batch, length))
  student, teacher = v.as_compute_dtype(student_attention, teacher_attention)
  allowed = jnp.ones((1, 1, length, length), jnp.bool_)
  if causal:
    allowed = jnp.tril(allowed)
  if mask is not None:
    diagonal = jnp.eye(length, dtype=jnp.bool_)[None, None]
    allowed = allowed & (mask[:, None, None, :] | diagonal)
    # A masked query row is replaced by zeros; it keeps its own key (the
    # diagonal), so it stays finite, with no nan even in the backward pass,
    # and is then discarded.
    row_valid = mask[:, None, :, None]
    zero = jnp.zeros((), student.dtype)
    student = jnp.where(row_valid, student, zero)
    teacher = jnp.where(row_valid, teacher, zero)
  student = jnp.where(allowed, student, -jnp.inf)
  teacher = jnp.where(allowed, teacher, -jnp.inf)
  per_row = kl_from_log_probs(
      jax.nn.log_softmax(teacher, axis=-1),
      jax.nn.log_softmax(student, axis=-1),
      axis=-1,
  )  # [batch, heads, length]
  if mask is None:
    return jnp.mean(per_row)
  zero = jnp.zeros((), per_row.dtype)
  total = jnp.sum(jnp.where(mask[:, None, :], per_row, zero))
  count = heads * jnp.sum(mask, dtype=per_row.dtype)
  return _safe_mean(total, count)
