"""The teachers of the experiments: trained on the labels, or loaded.

:func:`get_teachers` loads ``config.teacher.load`` (and measures each
teacher's test accuracy) or trains the teachers of a seed, each in its own
run directory, and saves them for the next run.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import loop as loop_lib
from experiments import model_checks
from experiments import runs
from experiments import writers
from experiments.context import _views
from experiments.context import Context
from experiments.settings import make_optimizer
from jaxkd import checkpoint as checkpoint_lib
from jaxkd import objective
from jaxkd import teachers as teachers_lib
from jaxkd.state import DistillState
from jaxkd.train_step import Distillation
from jaxkd.evaluation import make_eval_step


@dataclasses.dataclass
class Teachers:
  """A teacher group and its stacked variables, with their runs' results."""

  group: teachers_lib.TeacherGroup
  variables: teachers_lib.TeacherVariables
  results: list[dict]
  model_name: str
  born_again: bool = False  # the baseline student serves as the teacher

  def take(self, count: int) -> Teachers:
    """The first ``count`` teachers."""
    if count == teachers_lib.num_stacked(self.variables.params):
      return self
    variables = runs.host_map(lambda x: x[:count], self.variables)
    return dataclasses.replace(self, variables=variables,
                               results=self.results[:count])


def teacher_epochs(config) -> int:
  return config.teacher.num_epochs if config.teacher.num_epochs >= 0 else (
      config.num_epochs)


def teacher_logits_on_train(ctx: Context, group: teachers_lib.TeacherGroup,
                    variables: teachers_lib.TeacherVariables) -> np.ndarray:
  """The teachers' logits on the in-memory training split, ``[K, N, C]``."""
  images, _ = ctx.data.train_arrays()
  forward = ctx.cached(("teacher_forward", id(group)), lambda: jax.jit(
      lambda v, x: teachers_lib.apply_teachers(group, v, x).logits))
  size = ctx.data.eval_batch_size
  out = []
  for start in range(0, len(images), size):
    chunk = images[start:start + size]
    pad = size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:],
                                              chunk.dtype)])
    logits = np.asarray(forward(variables, ctx.put({"x": chunk})["x"]))
    out.append(logits[:, :size - pad])
  return np.concatenate(out, axis=1)


def train_teacher(ctx: Context, seed: int, index: int,
                  run_dir: pathlib.Path) -> tuple[DistillState, dict]:
  """Trains teacher ``index`` of ``seed`` on the labels."""
  config = ctx.config
  model_name = config.teacher.model
  epochs = teacher_epochs(config)
  spe = ctx.data.steps_per_epoch
  distillation = ctx.cached(("teacher", model_name), lambda: Distillation(
      student=ctx.model(model_name),
      objective=[objective.LabelTerm()],
      optimizer=make_optimizer(config.teacher.optimizer,
                               steps_per_epoch=spe, num_epochs=epochs),
      views=_views(config.teacher.shift_pixels),
      nonfinite="skip"))
  run_seed = seed + 1000 * index
  state = ctx.place(runs.init_state(ctx, distillation, jax.random.key(run_seed),
                                ctx.data.sample_batch()))
  name = f"seed {seed} teacher {index} ({model_name})"
  runs.save_config(ctx, run_dir, {"role": "teacher", "seed": run_seed,
                              "model": model_name, "num_epochs": epochs,
                              "steps_per_epoch": spe})
  loop = runs.distillation_loop(
      ctx, name=name, run_dir=run_dir, distillation=distillation,
      state=state, batches=ctx.data.train_iterator(run_seed),
      num_epochs=epochs)
  loop.config = loop_lib.teacher_config(config.to_dict())
  state, history = loop_lib.run_loop(ctx, loop, state)
  result = runs.run_result(role="teacher", name=name, method="labels",
                       model_name=model_name, seed=seed,
                       params=state.params["student"], history=history)
  writers.dump_json(run_dir / "results.json", result)
  return state, result


def evaluate_teachers(ctx: Context, group: teachers_lib.TeacherGroup,
                      variables: teachers_lib.TeacherVariables
                      ) -> list[float]:
  """Each teacher's accuracy on the test split: the eval step's
  ``teacher_accuracy``, with the first teacher standing in as the student
  (so nothing is initialised)."""
  distillation = ctx.cached(("teacher_eval", id(group)), lambda: Distillation(
      student=group.model, objective=[objective.LabelTerm()],
      optimizer=optax.identity(), teachers=[group]))
  eval_step = ctx.cached(("eval_step", id(distillation)),
                         lambda: make_eval_step(distillation))
  first, first_state = runs.host_map(lambda x: x[0],
                                 (variables.params, variables.state))
  state = DistillState(
      step=jnp.zeros((), jnp.int32),
      params={"student": first, "terms": {}},
      model_state={"student": first_state, "terms": {}},
      opt_state=None, rng=jax.random.key_data(jax.random.key(0)),
      teachers=(variables,))
  accuracy = runs.evaluator(ctx, eval_step)(state)["test/teacher_accuracy"]
  return [float(a) for a in np.atleast_1d(accuracy)]


def teacher_name(seed: int) -> str:
  return f"teacher_seed{seed}"


def get_teachers(ctx: Context, seed: int, num_teachers: int) -> Teachers:
  """Loads ``config.teacher.load``, or trains ``num_teachers`` teachers of
  ``seed`` (resuming their runs) and saves them under
  ``<workdir>/teachers/teacher_seed<seed>``."""
  config = ctx.config
  model_name = config.teacher.model
  group = ctx.group(model_name)
  if config.teacher.load:
    directory = config.teacher.load_dir or ctx.workdir
    variables = checkpoint_lib.load_teachers(directory, config.teacher.load)
    first, first_state = runs.host_map(lambda x: x[0],
                                   (variables.params, variables.state))
    model_checks.check_input_shape(
        group.model, ctx.data.image_shape, params=first, state=first_state,
        where=(f"Teachers {config.teacher.load!r} loaded from {directory}"
               f" on data set {ctx.data.spec.name!r}"))
    count = teachers_lib.num_stacked(variables.params)
    if count < num_teachers:
      raise ValueError(
          f"Teachers {config.teacher.load!r} hold {count} teachers; the"
          f" methods need {num_teachers}.")
    accuracies = evaluate_teachers(ctx, group, variables)
    results = [{"role": "teacher", "run": f"loaded {config.teacher.load}",
                "method": "labels", "model": model_name, "seed": seed,
                "params": model_checks.count_params(first),
                "best_accuracy": accuracy, "last_accuracy": accuracy,
                "best_epoch": 0, "epochs": 0, "steps": 0}
               for accuracy in accuracies]
    return Teachers(group, variables, results, model_name)
  states, results = [], []
  for index in range(num_teachers):
    state, result = train_teacher(
        ctx, seed, index, ctx.workdir / f"seed_{seed}" / f"teacher_{index}")
    states.append(state)
    results.append(result)
  stack = lambda *xs: np.stack(xs)
  variables = teachers_lib.TeacherVariables(
      params=runs.host_map(stack, *[s.params["student"] for s in states]),
      state=runs.host_map(stack, *[s.model_state["student"] for s in states]))
  checkpoint_lib.save_teachers(ctx.workdir, teacher_name(seed), variables,
                               overwrite=True)
  return Teachers(group, variables, results, model_name)
