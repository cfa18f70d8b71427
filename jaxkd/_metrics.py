"""What the engine reports: step metrics, evaluation sums and their summary.

The training step reports means over its batch (:func:`prediction_metrics`,
:func:`token_prediction_metrics`). The evaluation step reports *sums* with a
``count`` (:func:`evaluation_metrics`, :func:`token_evaluation_metrics`), so
that batches of any size, padded batches and data shards add up exactly;
:func:`summarize` adds them and divides by the count once.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxkd import lm
from jaxkd import losses
from jaxkd import objective as objective_lib


def prediction_metrics(outputs: objective_lib.StepOutputs) -> dict:
  metrics = {}
  predictions = jnp.argmax(outputs.student_logits, axis=-1)
  labels = outputs.labels
  if labels is not None:
    if not jnp.issubdtype(labels.dtype, jnp.integer):
      labels = jnp.argmax(labels, axis=-1)
    metrics["accuracy"] = jnp.mean(predictions == labels)
  if outputs.teacher_logits is not None:
    ensemble = jnp.argmax(
        losses.ensemble_log_soft_targets(outputs.teacher_logits), axis=-1
    )
    metrics["teacher_agreement"] = jnp.mean(predictions == ensemble)
  return metrics


def _as_float(x: jax.Array) -> jax.Array:
  return x.astype(jnp.float32)


def token_prediction_metrics(
    outputs: objective_lib.StepOutputs, tokens: jax.Array,
    mask: jax.Array | None,
) -> dict:
  """Next-token accuracy and agreement with the teachers, valid tokens."""
  targets = lm.next_token_targets(jnp.asarray(tokens), mask)
  predictions = jnp.argmax(
      lm.next_token_logits(outputs.student_logits), axis=-1)
  metrics = {"accuracy": lm.token_mean(
      _as_float(predictions == targets.targets), targets.mask)}
  if outputs.teacher_logits is not None:
    ensemble = jnp.argmax(losses.ensemble_log_soft_targets(
        outputs.teacher_logits[..., :-1, :]), axis=-1)
    metrics["teacher_agreement"] = lm.token_mean(
        _as_float(predictions == ensemble), targets.mask)
  return metrics


def token_evaluation_metrics(
    outputs: objective_lib.StepOutputs, targets: lm.NextTokenTargets
) -> dict[str, jax.Array]:
  """Sums over a token batch of next-token loss, accuracy and agreement.

  ``count`` is the number of valid next-token predictions
  (``targets.mask``); ``loss`` sums the student's negative log-likelihood
  in nats (divide by ``log 2`` for bits per token), ``teacher_loss`` the
  teachers' (``[K]``), ``kl_to_teachers`` the KL from the student to the
  teachers' mixture. :func:`summarize` divides every sum by the count.
  """
  weights = targets.mask.astype(jnp.float32)
  logits = lm.next_token_logits(outputs.student_logits).astype(jnp.float32)
  labels = targets.targets
  metrics = {"count": jnp.sum(weights)}
  predictions = jnp.argmax(logits, axis=-1)
  metrics["correct"] = jnp.sum(weights * _as_float(predictions == labels))
  metrics["loss"] = jnp.sum(weights * losses.cross_entropy(
      logits, labels, where=targets.mask))
  if outputs.teacher_logits is not None:
    teacher_logits = outputs.teacher_logits[..., :-1, :].astype(jnp.float32)
    log_mixture = losses.ensemble_log_soft_targets(teacher_logits)
    metrics["teacher_agreement"] = jnp.sum(
        weights * _as_float(predictions == jnp.argmax(log_mixture, -1)))
    metrics["kl_to_teachers"] = jnp.sum(
        weights * losses.kl_divergence(logits, log_mixture))
    per_teacher = jax.vmap(
        lambda t: losses.cross_entropy(t, labels, where=targets.mask)
    )(teacher_logits)
    metrics["teacher_loss"] = jnp.sum(weights[None] * per_teacher, (1, 2))
    metrics["teacher_correct"] = jnp.sum(weights[None] * _as_float(
        jnp.argmax(teacher_logits, -1) == labels[None]), (1, 2))
  return metrics


def example_weights(logits: jax.Array, mask: jax.Array | None) -> jax.Array:
  if mask is None:
    return jnp.ones(logits.shape[:1], jnp.float32)
  return jnp.asarray(mask).astype(jnp.float32)


def evaluation_metrics(
    outputs: objective_lib.StepOutputs, mask: jax.Array | None = None
) -> dict[str, jax.Array]:
  """Sums over a batch of accuracy, loss, agreement and KL, with a count.

  Sums (not means) let a loop add batches of any size, padded batches
  included (``mask``), and divide by ``count`` at the end.
  """
  logits = outputs.student_logits.astype(jnp.float32)
  weights = example_weights(logits, mask)
  metrics = {"count": jnp.sum(weights)}
  predictions = jnp.argmax(logits, axis=-1)
  if outputs.labels is not None:
    labels = outputs.labels
    metrics["correct"] = jnp.sum(weights * _as_float(predictions == labels))
    metrics["loss"] = jnp.sum(
        weights
        * optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    )
  if outputs.teacher_logits is not None:
    teacher_logits = outputs.teacher_logits.astype(jnp.float32)
    log_ensemble = losses.ensemble_log_soft_targets(teacher_logits)
    metrics["teacher_agreement"] = jnp.sum(
        weights * _as_float(predictions == jnp.argmax(log_ensemble, axis=-1))
    )
    metrics["kl_to_teachers"] = jnp.sum(
        weights * losses.kl_divergence(logits, log_ensemble)
    )
    if outputs.labels is not None:
      teacher_correct = jnp.argmax(teacher_logits, -1) == labels[None]
      metrics["teacher_correct"] = jnp.sum(
          weights[None] * _as_float(teacher_correct), axis=-1
      )
  return metrics


def summarize(metric_sums: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """Adds per-batch sums from the eval step and divides by the count."""
  total: dict[str, np.ndarray] = {}
  for sums in metric_sums:
    for name, value in sums.items():
      total[name] = total.get(name, 0) + np.asarray(value, np.float64)
  count = float(total.pop("count", 0.0))
  if count == 0:
    return {}
  out = {}
  for name, value in total.items():
    key = {"correct": "accuracy", "teacher_correct": "teacher_accuracy"}.get(
        name, name
    )
    value = value / count
    out[key] = value.tolist() if np.ndim(value) else float(value)
  return out
