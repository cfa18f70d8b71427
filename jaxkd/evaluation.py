"""Evaluation of a distillation state: metric sums per batch, and their means.

:func:`eval_sums` computes one batch's metrics as *sums* with a ``count``
(examples, or valid next-token targets for language models), so that
batches of any size, padded batches (``"mask"``) and data shards add up
exactly; :func:`summarize` adds sums and divides by the count once.
:func:`make_eval_step` jits :func:`eval_sums`; :func:`evaluate` runs it
over an iterable of batches and returns the means.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp

from jaxkd import lm
from jaxkd._metrics import evaluation_metrics
from jaxkd._metrics import example_weights
from jaxkd._metrics import summarize
from jaxkd._metrics import token_evaluation_metrics
from jaxkd.state import DistillState

if TYPE_CHECKING:
  from jaxkd.train_step import Distillation

__all__ = [
    "eval_sums",
    "evaluate",
    "evaluation_metrics",
    "make_eval_step",
    "summarize",
    "token_evaluation_metrics",
]

Batch = Mapping[str, Any]


def eval_sums(
    distillation: Distillation, state: DistillState, batch: Batch
) -> dict[str, jax.Array]:
  """One batch's metric sums, unjitted (the body of :func:`make_eval_step`).

  The student and the teachers run in evaluation mode (``train=False``).
  Keys: ``count``, ``accuracy``, ``loss`` (nats), ``teacher_agreement``,
  ``kl_to_teachers``, ``teacher_accuracy`` (``[K]``) and
  ``<term>/<metric>`` for the objective's terms, each summed over the
  counted examples (tokens).
  """
  outputs, _ = distillation._outputs(  # pylint: disable=protected-access
      state.params, state, batch, key=jax.random.key(0), train=False
  )
  if distillation.token_inputs:
    targets = lm.next_token_targets(
        jnp.asarray(batch[distillation.inputs]),
        distillation.token_mask(batch),
    )
    sums = token_evaluation_metrics(outputs, targets)
    weights = targets.mask.astype(jnp.float32)
  else:
    sums = evaluation_metrics(outputs, batch.get("mask"))
    weights = example_weights(outputs.student_logits, batch.get("mask"))
  for term in distillation.objective:
    for key, value in term.evaluation_sums(outputs, weights).items():
      sums[f"{term.name}/{key}"] = value
  return sums


def make_eval_step(
    distillation: Distillation,
) -> Callable[[DistillState, Batch], dict]:
  """The jitted ``(state, batch) -> metric sums`` of one batch.

  Sums with a ``count`` (:func:`eval_sums`), so that batches and data
  shards add up exactly; :func:`summarize` divides them, :func:`evaluate`
  does both over an iterable of batches.
  """
  return jax.jit(lambda state, batch: eval_sums(distillation, state, batch))


def evaluate(
    distillation: Distillation,
    state: DistillState,
    batches: Iterable[Batch],
    *,
    eval_step: Callable[[DistillState, Batch], dict] | None = None,
) -> dict[str, float]:
  """Means of the evaluation metrics over ``batches`` (one pass).

  Runs the jitted eval step (``eval_step``, default
  :func:`make_eval_step`'s; pass one to reuse its compilation across calls)
  on every batch and divides the summed metrics by the number of counted
  examples (tokens for language models) once, with :func:`summarize`:
  padded batches (``"mask"``) and batches of different sizes weigh by what
  they count, not by batch. Keys as :func:`eval_sums`'s, ``count`` aside
  (``teacher_accuracy`` becomes one entry per teacher).

  Returns:
    ``{}`` if nothing was counted.
  """
  if eval_step is None:
    eval_step = make_eval_step(distillation)
  return summarize([eval_step(state, batch) for batch in batches])
