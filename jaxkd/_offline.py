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


def has_cached_teacher(batch) -> bool:
  """Whether the batch carries cached teacher logits (full or top-k)."""
  return "teacher_logits" in batch or "teacher_topk_logits" in batch


def cached_teacher_logits(batch, num_classes: int) -> jax.Array | None:
  """The batch's cached teacher logits ``[K, B, C]`` (``None`` if none).

  ``"teacher_logits"`` ``[B, C]`` gets a teacher axis of 1; top-k entries
  are expanded by :func:`expand_top_k`. The logits come out under
  ``stop_gradient``.
  """
  if "teacher_logits" in batch:
    logits = jnp.asarray(batch["teacher_logits"])
    if logits.ndim == 2:
      logits = logits[None]
  elif "teacher_topk_logits" in batch:
    logits = expand_top_k(
        batch["teacher_topk_logits"], batch["teacher_topk_indices"],
        num_classes)
  else:
    return None
  return jax.lax.stop_gradient(logits)
