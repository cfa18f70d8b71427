"""The engine's extension point: what a term sees (:class:`StepOutputs`) and is
(:class:`Term`)."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

from flax import struct
import jax
import jax.numpy as jnp

from jaxkd._hyper import Hyper
from jaxkd._hyper import ScheduleOrValue
from jaxkd._hyper import check_hyperparameter
from jaxkd._hyper import is_valid
from jaxkd._hyper import resolve

PyTree = Any


def require_labels(name: str, outputs: "StepOutputs") -> jax.Array:
  """The step's labels, or a ``ValueError`` naming the term that needs them."""
  if outputs.labels is None:
    raise ValueError(f"Term {name!r} needs labels in the batch.")
  return outputs.labels


class StepOutputs(struct.PyTreeNode):
  """What a term sees of one step: both models' outputs and the batch.

  ``teacher_logits`` has shape ``[K, B, C]`` (``None`` without teachers);
  ``teacher_features`` maps names to ``[K, B, ...]``; ``labels`` are integer
  ``[B]`` or soft ``[B, C]`` (after mixup). For token inputs the logits are
  ``[B, L, V]`` and ``[K, B, L, V]`` and ``batch`` holds the batch's arrays
  (``"tokens"``, ``"mask"``, cached teacher entries).
  """

  student_logits: jax.Array
  student_features: Mapping[str, jax.Array]
  teacher_logits: jax.Array | None
  teacher_features: Mapping[str, jax.Array]
  labels: jax.Array | None
  step: jax.Array
  hparams: Mapping[str, jax.Array]
  train: bool = struct.field(pytree_node=False)
  # The (micro-)batch's arrays for terms that read more than the logits
  # (the tokens and masks of token terms); empty for image inputs.
  batch: Mapping[str, jax.Array] = struct.field(default_factory=dict)

  def resolve(self, value: ScheduleOrValue | Hyper) -> jax.Array:
    """A term's weight or temperature at this step."""
    return resolve(value, self.step, self.hparams)


def mean_loss(loss: jax.Array) -> jax.Array:
  """Per-example losses are averaged; batch-level scalars pass through."""
  return jnp.mean(loss.astype(jnp.float32))


def accepts(fn: Callable[..., Any], name: str) -> bool:
  try:
    parameters = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False
  return name in parameters or any(
      p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
  )


class Term:
  """Base class of objective terms.

  A term has a ``name`` (unique in its objective, the key of its parameters,
  state and metric) and a ``weight``. ``init`` returns its trainable
  parameters and state from abstract shapes of the outputs; ``loss`` returns
  the term's scalar loss and its new state.
  """

  name: str
  weight: ScheduleOrValue
  needs_teacher: bool = True

  def __post_init__(self):
    for name, (value, kind) in self.hyperparameters().items():
      check_hyperparameter(f"term {self.name!r}", name, value, kind)

  def hyperparameters(self) -> dict[str, tuple[ScheduleOrValue, str]]:
    """``{name: (value, kind)}`` of the weights and temperatures to check.

    ``kind`` is ``"weight"`` (finite, ``>= 0``) or ``"temperature"``
    (finite, ``> 0``). Subclasses with more add theirs to the base's.
    """
    return {"weight": (self.weight, "weight")}

  def invalid_hyperparameters(
      self, outputs: StepOutputs
  ) -> dict[str, jax.Array]:
    """``{name: flag}``: which (traced) hyper-parameters are unusable now.

    Constants and schedules were checked when the term was built; a
    :class:`Hyper` or traced value is checked here, at every step (the
    engine then makes the loss NaN and names the failure in its metrics).
    """
    return {
        name: jnp.logical_not(is_valid(outputs.resolve(given), kind))
        for name, (given, kind) in self.hyperparameters().items()
        if given is not None
    }

  def evaluation_sums(
      self, outputs: StepOutputs, weights: jax.Array
  ) -> Mapping[str, jax.Array]:
    """Sums over an evaluation batch that this term adds (default none).

    ``weights`` ``[B]`` are the examples' mask as floats. The eval step
    reports them as ``"{name}/{key}"``; ``summarize`` divides by the count.
    """
    del outputs, weights
    return {}

  def init(
      self, key: jax.Array, outputs: StepOutputs
  ) -> tuple[PyTree, PyTree]:
    del key, outputs
    return {}, {}

  def loss(
      self, params: PyTree, state: PyTree, outputs: StepOutputs
  ) -> tuple[jax.Array, PyTree]:
    raise NotImplementedError

  def token_count(self, batch: Mapping[str, jax.Array]) -> jax.Array | None:
    """How many units (tokens) the loss averages over in ``batch``.

    ``None`` (the default) marks a term whose ``loss`` is a mean over
    examples. A token-normalised term returns a float32 scalar computed from
    the batch alone (its masks), and implements :meth:`loss_sum`.
    """
    del batch
    return None

  def loss_sum(
      self, params: PyTree, state: PyTree, outputs: StepOutputs
  ) -> tuple[tuple[jax.Array, jax.Array], PyTree]:
    """``((sum, count), state)`` of a token-normalised term.

    ``loss`` is then ``sum / max(1, count)``; under gradient accumulation
    the engine divides the sum by the global batch's count instead.
    """
    raise NotImplementedError(
        f"Term {self.name!r} has no `loss_sum` (it is not token-normalised)."
    )

  def update(
      self, state: PyTree, outputs: StepOutputs, key: jax.Array
  ) -> tuple[PyTree, Mapping[str, jax.Array]]:
    """Runs after the student's update, on outputs without gradient.

    A term with a model of its own (a discriminator) trains it here, with
    its own optimiser whose state lives in the term's state. Returns the new
    term state and metrics. The default does nothing.
    """
    del outputs, key
    return state, {}
