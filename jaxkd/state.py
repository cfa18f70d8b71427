"""The train state of a distillation run."""

from __future__ import annotations

from typing import Any

from flax import struct
import jax

__all__ = [
    "DistillState",
    "own_copy",
]

PyTree = Any


class DistillState(struct.PyTreeNode):
  """Everything a distillation step reads and writes.

  Attributes:
    step: Number of updates applied so far (int32 scalar).
    params: Trainable parameters: ``{"student": ..., "terms": {name: ...}}``
      (the objective terms' adaptors and heads). Only these reach the
      optimiser.
    model_state: Mutable non-trainable state: ``{"student": ...,
      "terms": {name: ...}}`` (BatchNorm statistics, CRD queues).
    opt_state: The optimiser's state for ``params``.
    rng: PRNG key data (``uint32[2]``); step ``s`` draws from
      ``fold_in(rng, s)``, so a resumed run draws the same numbers.
    teachers: One ``jaxkd.teachers.TeacherVariables`` per teacher group.
      Never passed to the optimiser, never differentiated, and left out of
      the student's checkpoints. The state holds its own copy (see
      :func:`own_copy`): the train step donates the state, and the
      arrays a caller passed in stay valid.
    hparams: Named float32 scalars read by ``objective.Hyper`` terms
      (weights, temperatures) that vary without recompiling.
  """

  step: jax.Array
  params: PyTree
  model_state: PyTree
  opt_state: PyTree
  rng: jax.Array
  teachers: tuple[Any, ...] = ()
  hparams: dict[str, jax.Array] = struct.field(default_factory=dict)

  @property
  def student_params(self) -> PyTree:
    return self.params["student"]

  @property
  def student_state(self) -> PyTree:
    return self.model_state["student"]


def own_copy(tree: PyTree) -> PyTree:
  """``tree`` with every ``jax.Array`` leaf copied on its own devices.

  Train steps donate their state, so an array put into a state is consumed
  by the first step. States copy the teacher arrays they are given so that
  the caller's arrays survive (to evaluate the teacher, to build another
  state); the copy keeps each array's sharding. Other leaves (NumPy arrays,
  Python scalars) are transferred afresh by every call and are kept as
  they are. A copy is a transfer (``jax.device_put(..., may_alias=False)``),
  so nothing is compiled for it.
  """
  return jax.tree.map(
      lambda x: jax.device_put(x, may_alias=False)
      if isinstance(x, jax.Array) else x, tree)
