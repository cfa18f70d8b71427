"""Checks of a training batch inside the compiled step: bad data is named.

A batch is bad when any of its examples has

* an integer label outside ``[0, num_classes)`` (label ``10`` of 10 classes,
  ``-1``, ``1000``): its cross-entropy would silently be 0; the same for
  tokens and cached top-k indices outside the vocabulary;
* a NaN or infinite input (``"image"`` or another floating input);
* a NaN or ``+inf`` in cached teacher outputs (``"teacher_logits"``,
  ``"teacher_topk_logits"``; ``-inf`` marks a class of probability zero and
  is allowed), or a soft label that is not a probability in ``[0, 1]``.

:func:`batch_faults` returns one int32 flag per checked field,
``{"bad/<field>": 0 or 1}``; the engine reports them in the step's metrics
and leaves the state untouched when any is set (the training loop then stops
naming the step and the field, or skips and counts, as configured).
Everything is computed on device, inside the step: no host round trip.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["INDEX_KEYS", "TEACHER_OUTPUT_KEYS", "batch_faults", "first_fault"]

# Cached teacher outputs: -inf is a class of probability zero, NaN/+inf bad.
TEACHER_OUTPUT_KEYS = ("teacher_logits", "teacher_topk_logits",
                       "teacher_topk_log_probs")
# Integer arrays that index the classes (the vocabulary of a language model).
INDEX_KEYS = ("teacher_topk_indices", "tokens")


def _flag(bad: jax.Array) -> jax.Array:
  return jnp.any(bad).astype(jnp.int32)


def batch_faults(
    batch: Mapping[str, Any],
    *,
    num_classes: int,
    label_key: str = "label",
    skip: tuple[str, ...] = ("mask",),
) -> dict[str, jax.Array]:
  """One flag per field of ``batch``: 1 when the field holds bad values.

  Args:
    batch: The step's batch (arrays).
    num_classes: The number of classes ``C`` the integer labels index.
    label_key: The key of the labels.
    skip: Keys that are not checked (boolean masks).

  Returns:
    ``{"bad/<key>": int32 scalar}`` for every checked key.
  """
  faults = {}
  for key, value in batch.items():
    if key in skip or value is None:
      continue
    x = jnp.asarray(value)
    if key == label_key and jnp.issubdtype(x.dtype, jnp.integer):
      faults[f"bad/{key}"] = _flag((x < 0) | (x >= num_classes))
    elif key == label_key and jnp.issubdtype(x.dtype, jnp.floating):
      faults[f"bad/{key}"] = _flag(~jnp.isfinite(x) | (x < 0) | (x > 1))
    elif key in TEACHER_OUTPUT_KEYS:
      faults[f"bad/{key}"] = _flag(jnp.isnan(x) | (x == jnp.inf))
    elif key in INDEX_KEYS and jnp.issubdtype(x.dtype, jnp.integer):
      faults[f"bad/{key}"] = _flag((x < 0) | (x >= num_classes))
    elif jnp.issubdtype(x.dtype, jnp.floating):
      faults[f"bad/{key}"] = _flag(~jnp.isfinite(x))
  return faults


def first_fault(metrics: Mapping[str, Any]) -> str | None:
  """The first field flagged in host ``metrics``, or ``None``."""
  for key in sorted(metrics):
    if key.startswith("bad/") and int(jax.device_get(metrics[key])) > 0:
      return key.removeprefix("bad/")
  return None
