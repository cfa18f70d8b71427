"""The body of the compiled step: gradients, accumulation and the update.

:func:`train_step` is what :func:`jaxkd.train_step.make_train_step` jits. It
takes the :class:`~jaxkd.train_step.Distillation` (read for its objective,
optimiser and policies, not imported here) and returns ``(state,
metrics)``. Private module of :mod:`jaxkd`.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import optax

from jaxkd import batch_checks
from jaxkd._metrics import prediction_metrics
from jaxkd._metrics import token_prediction_metrics
from jaxkd.objective import StepOutputs
from jaxkd.state import DistillState

Batch = Mapping[str, jax.Array]

# Cached per-token entries of token batches: batch axis 0 (not a teacher axis).
_TOKEN_CACHE_KEYS = ("teacher_topk_log_probs", "teacher_topk_indices")


def split_micro_batches(batch: Batch, steps: int) -> dict[str, jax.Array]:
  """Every entry ``[..., B, ...]`` as ``[steps, ..., B / steps, ...]``.

  Micro-batch i takes examples i, i + steps, i + 2 steps, ...: with the batch
  sharded over devices, every device keeps its own examples and no example
  moves between devices. Cached teacher outputs ``[K, B, ...]`` are split
  along their batch axis 1.
  """
  token_cache = "teacher_topk_log_probs" in batch
  return {
      name: _split(
          x, steps,
          stacked=name.startswith("teacher_") and not (
              token_cache and name in _TOKEN_CACHE_KEYS))
      for name, x in batch.items()
  }


def _split(x, steps: int, *, stacked: bool) -> jax.Array:
  x = jnp.asarray(x)
  batch_axis = 1 if stacked and x.ndim >= 3 else 0
  if stacked and x.ndim == 2:
    x = x[None]
    batch_axis = 1
  size = x.shape[batch_axis]
  if size % steps:
    raise ValueError(
        f"The batch size {size} is not divisible by"
        f" `accumulation_steps`={steps}."
    )
  shape = x.shape[:batch_axis] + (size // steps, steps) + x.shape[
      batch_axis + 1 :
  ]
  return jnp.moveaxis(x.reshape(shape), batch_axis + 1, 0)


def loss_and_grads(distillation, state: DistillState, batch: Batch, key):
  """``(loss, grads, model_state, metrics, outputs)``, accumulated over
  ``distillation.accumulation_steps`` micro-batches."""
  steps = int(distillation.accumulation_steps)
  # Token terms divide by the whole batch's count (taken before the split):
  # every micro-batch's value is steps * sum_m / count, so the mean over
  # micro-batches (below) is sum / count, exactly the unaccumulated loss.
  normalizers = (
      distillation.token_normalizers(batch, steps) if steps > 1 else None
  )
  grad_fn = jax.value_and_grad(
      lambda p, s, b, k: distillation.objective_value(
          p, s, b, key=k, normalizers=normalizers
      ),
      has_aux=True,
  )
  if steps == 1:
    (loss, (model_state, metrics, outputs)), grads = grad_fn(
        state.params, state, batch, key
    )
    metrics = {**metrics, **_prediction_metrics(distillation, outputs)}
    return loss, grads, model_state, metrics, outputs

  micro = split_micro_batches(batch, steps)

  def body(carry, inputs):
    model_state, grad_sum, loss_sum = carry
    micro_batch, micro_key = inputs
    micro_state = state.replace(model_state=model_state)
    (loss, (model_state, metrics, outputs)), grads = grad_fn(
        state.params, micro_state, micro_batch, micro_key
    )
    grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
    metrics = {**metrics, **_prediction_metrics(distillation, outputs)}
    return (model_state, grad_sum, loss_sum + loss), (metrics, outputs)

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  (model_state, grad_sum, loss_sum), (metrics, outputs) = jax.lax.scan(
      body,
      (state.model_state, zeros, jnp.zeros((), jnp.float32)),
      (micro, jax.random.split(key, steps)),
  )
  grads = jax.tree.map(lambda g: g / steps, grad_sum)
  metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
  # Terms' update hooks see the last micro-batch.
  outputs = jax.tree.map(lambda o: o[-1], outputs)
  return loss_sum / steps, grads, model_state, metrics, outputs


def train_step(distillation, state: DistillState, batch: Batch):
  """One update: ``(state, batch) -> (state, metrics)``, not jitted.

  The state changes only where the batch is clean (``jaxkd.batch_checks``)
  and, under ``nonfinite="skip"``, the loss and gradient are finite; the
  step counter advances either way.
  """
  key = jax.random.fold_in(
      jax.random.wrap_key_data(state.rng), state.step
  )
  loss, grads, model_state, metrics, outputs = loss_and_grads(
      distillation, state, batch, key)
  # Optax's adam family mixes dtypes in its bias correction; standard
  # promotion is scoped to the update alone.
  with jax.numpy_dtype_promotion("standard"):
    updates, opt_state = distillation.optimizer.update(
        grads, state.opt_state, state.params
    )
    params = optax.apply_updates(state.params, updates)
  outputs = jax.lax.stop_gradient(outputs)
  term_states = dict(model_state["terms"])
  for term, term_key in zip(
      distillation.objective, jax.random.split(
          jax.random.fold_in(key, 1), len(distillation.objective)
      )
  ):
    term_states[term.name], term_metrics = term.update(
        term_states[term.name], outputs, term_key
    )
    metrics = {
        **metrics,
        **{f"{term.name}/{k}": v for k, v in term_metrics.items()},
    }
  model_state = {**model_state, "terms": term_states}
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  # Bad data (labels out of range, NaN inputs or cached teacher outputs)
  # never updates the state, whatever the non-finite policy.
  faults = batch_checks.batch_faults(
      batch, num_classes=outputs.student_logits.shape[-1]
  )
  clean = jnp.logical_not(
      jnp.any(jnp.stack([jnp.zeros((), jnp.int32), *faults.values()]))
  )
  apply = clean & finite if distillation.nonfinite == "skip" else clean
  new_state = state.replace(
      step=state.step + 1,
      params=params,
      model_state=model_state,
      opt_state=opt_state,
  )
  # The teachers pass through untouched (and unbatched under a sweep).
  new_state = jax.tree.map(
      lambda new, old: jnp.where(apply, new, old),
      new_state.replace(teachers=()),
      state.replace(step=state.step + 1, teachers=()),
  ).replace(teachers=state.teachers)
  metrics = dict(metrics)
  metrics.update(faults)
  metrics.update(
      loss=loss,
      grad_norm=grad_norm,
      nonfinite=jnp.logical_not(finite).astype(jnp.int32),
      bad_batch=jnp.logical_not(clean).astype(jnp.int32),
  )
  return new_state, metrics

def _prediction_metrics(distillation, outputs: StepOutputs) -> dict:
  if distillation.token_inputs:
    return token_prediction_metrics(
        outputs, outputs.batch[distillation.inputs],
        distillation.token_mask(outputs.batch))
  return prediction_metrics(outputs)
