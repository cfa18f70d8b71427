"""Train N students with N hyper-parameter settings in one jitted step.

The objective reads its varied hyper-parameters through
``objective.Hyper(name)`` placeholders; :func:`init_sweep` stacks N student
states with their values on a leading axis, and :func:`make_sweep_step`
vmaps the distillation step over that axis. The teachers are shared: they
are not stacked, and without per-student input views their forward pass is
computed once for all N students. A temperature search (Hinton et al., 2015
tried several) becomes one run instead of N.

Example::

  objective = [objective.LabelTerm(weight=0.1),
               objective.LogitTerm(temperature=objective.Hyper("temperature"),
                                   weight=0.9)]
  states = sweep.init_sweep(distillation, key, batch, teacher_variables,
                            hparams={"temperature": [1.0, 2.0, 4.0, 8.0]})
  step = sweep.make_sweep_step(distillation)
  states, metrics = step(states, batch)   # metrics["loss"] has shape [4]
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from jaxkd import evaluation
from jaxkd import teachers as teachers_lib
from jaxkd.state import DistillState
from jaxkd.train_step import Batch
from jaxkd.train_step import Distillation

__all__ = [
    "init_sweep",
    "make_sweep_eval_step",
    "make_sweep_step",
    "select",
    "sweep_size",
]


def _axes(state: DistillState, axis: int | None) -> DistillState:
  """vmap axes of a sweep state: everything stacked but the teachers."""
  return DistillState(
      step=axis,
      params=axis,
      model_state=axis,
      opt_state=axis,
      rng=axis,
      teachers=None,
      hparams=axis,
  ) if state is not None else None


def init_sweep(
    distillation: Distillation,
    key: jax.Array,
    sample_batch: Batch,
    teacher_variables: Sequence[Any] = (),
    *,
    hparams: Mapping[str, Sequence[float]],
) -> DistillState:
  """N initial states, one per hyper-parameter setting, stacked.

  Args:
    distillation: The distillation; its objective reads ``hparams`` through
      ``objective.Hyper``.
    key: PRNG key; student ``i`` is initialised from ``fold_in(key, i)``.
    sample_batch: A batch of the shapes training will use.
    teacher_variables: Shared by all students (not stacked).
    hparams: ``name -> N values``; every entry must have the same length N.

  Returns:
    A :class:`DistillState` whose leaves (but the teachers) have a leading
    axis of size N.
  """
  sizes = {name: len(values) for name, values in hparams.items()}
  if not sizes or len(set(sizes.values())) != 1:
    raise ValueError(
        "`hparams` must map each name to a sequence of the same length N"
        f" >= 1, got lengths {sizes}."
    )
  (n,) = set(sizes.values())
  if n == 0:
    raise ValueError("`hparams` needs at least one setting.")
  # Validate once (one abstract trace), then build the other states cheaply.
  first = {name: values[0] for name, values in hparams.items()}
  states = [
      distillation.init(
          jax.random.fold_in(key, 0), sample_batch, teacher_variables,
          hparams=first,
      )
  ]
  # The teachers are shared: keep the first state's copy, drop the others'
  # at once (each state copies them) rather than hold N copies.
  teachers = states[0].teachers
  states[0] = states[0].replace(teachers=())
  for i in range(1, n):
    states.append(
        distillation.initial_state(
            jax.random.fold_in(key, i),
            sample_batch,
            teacher_variables,
            {name: values[i] for name, values in hparams.items()},
        ).replace(teachers=())
    )
  stacked = teachers_lib.stack_params(states, name="sweep states")
  return stacked.replace(teachers=teachers)


def sweep_size(states: DistillState) -> int:
  """The number N of students in a sweep state."""
  return int(np.shape(states.step)[0])


def make_sweep_step(
    distillation: Distillation, *, donate: bool = True
) -> Callable[[DistillState, Batch], tuple[DistillState, dict]]:
  """The jitted ``(states, batch) -> (states, metrics)`` over N students.

  Every student sees the same batch; metrics have a leading axis N.
  """

  def step(states: DistillState, batch: Batch):
    axes = _axes(states, 0)
    return jax.vmap(
        distillation._train_step,  # pylint: disable=protected-access
        in_axes=(axes, None),
        out_axes=(axes, 0),
    )(states, batch)

  return jax.jit(step, donate_argnums=(0,) if donate else ())


def make_sweep_eval_step(
    distillation: Distillation,
) -> Callable[[DistillState, Batch], dict]:
  """The jitted ``(states, batch) -> metric sums`` with a leading axis N."""

  def step(states: DistillState, batch: Batch):
    return jax.vmap(
        functools.partial(evaluation.eval_sums, distillation),
        in_axes=(_axes(states, 0), None),
    )(states, batch)

  return jax.jit(step)


def select(states: DistillState, index: int) -> DistillState:
  """Student ``index`` of a sweep as an ordinary state."""
  teachers = states.teachers
  one = jax.tree.map(lambda x: x[index], states.replace(teachers=()))
  return one.replace(teachers=teachers)


