"""Cached teacher outputs for offline distillation: batch entries in, logits out."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def expand_top_k(
    top_logits: jax.Array, top_indices: jax.Array, num_classes: int
) -> jax.Array:
  """Full teacher logits from cached top-k entries; the rest are ``-inf``.

  Args:
    top_logits: ``[..., k]`` floating logits.
    top_indices: ``[..., k]`` integer class indices.
    num_classes: The number of classes ``C``.

  Returns:
    ``[..., C]`` logits, ``-inf`` outside the cached classes.
  """
  top_logits = jnp.asarray(top_logits, jnp.float32)
  full = jnp.full(top_logits.shape[:-1] + (num_classes,), -jnp.inf)
  one_hot = jax.nn.one_hot(top_indices, num_classes, dtype=jnp.bool_)
  # Each cached class sets its own entry; the rest stay -inf.
  values = jnp.where(one_hot, top_logits[..., None], -jnp.inf)
  return jnp.maximum(full, jnp.max(values, axis=-2))


def cache_teacher_outputs(
    logits: jax.Array, *, top_k: int | None = None
) -> dict[str, jax.Array]:
  """The batch entries for offline distillation from teacher logits.

  Args:
    logits: ``[K, B, C]`` or ``[B, C]`` teacher logits.
    top_k: Keep only the ``top_k`` largest logits per example (and their
      indices); ``None`` keeps all.

  Returns:
    ``{"teacher_logits": ...}`` or ``{"teacher_topk_logits": ...,
    "teacher_topk_indices": ...}`` to merge into the batch.
  """
  logits = jnp.asarray(logits)
  if top_k is None:
    return {"teacher_logits": logits}
  if not 0 < top_k <= logits.shape[-1]:
    raise ValueError(
        f"`top_k` must lie in [1, {logits.shape[-1]}], got {top_k}."
    )
  values, indices = jax.lax.top_k(logits, top_k)
  return {"teacher_topk_logits": values, "teacher_topk_indices": indices}
