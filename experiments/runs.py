"""One run of the distillation engine: its first state, loop and result.

What a teacher's run (:mod:`experiments.teacher_runs`) and a student's run
(:mod:`experiments.train`) share: the initial state as one compiled
program, the evaluation over the test split, the ``experiments.loop.Loop``
of a ``Distillation`` and the results record.
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from experiments import loop as loop_lib
from experiments import model_checks
from experiments import writers
from experiments.context import Context
from jaxkd.state import DistillState
from jaxkd.train_step import Distillation
from jaxkd.evaluation import make_eval_step
from jaxkd.evaluation import summarize
from jaxkd.train_step import make_train_step


def init_state(ctx: Context, distillation: Distillation, key: jax.Array,
               sample_batch: Mapping[str, Any],
               teacher_variables: Sequence[Any] = ()) -> DistillState:
  """``distillation.init`` as one compiled program.

  Run eagerly, Flax's initialisation dispatches (and compiles) every random
  initialiser and layer on its own: hundreds of small compilations for a
  ResNet. Under ``jit`` it is one program, and the validating trace of the
  step happens all the same (at trace time, before compiling).
  """
  init = ctx.cached(("init", id(distillation)),
                    lambda: jax.jit(distillation.init))
  return init(key, dict(sample_batch), tuple(teacher_variables))


def finite(metrics: Mapping[str, Any]) -> bool:
  """Whether a step was applied: finite loss, no skipped or bad batch."""
  flag = np.asarray(metrics.get("nonfinite", 0))
  bad = np.asarray(metrics.get("bad_batch", 0))
  loss = np.asarray(metrics.get("loss", 0.0))
  return (not np.any(flag > 0) and not np.any(bad > 0)
          and bool(np.all(np.isfinite(loss))))


def evaluator(ctx: Context, eval_step) -> Callable[[Any], dict]:
  """``state -> {"test/<metric>": value}`` over the whole test split."""
  def evaluate(state):
    sums = [eval_step(state, ctx.put(b)) for b in ctx.data.eval_batches()]
    summary = summarize(jax.device_get(sums))
    return {f"test/{k}": v for k, v in summary.items()}
  return evaluate


def save_config(ctx: Context, run_dir: pathlib.Path,
                resolved: Mapping[str, Any]) -> None:
  """Writes ``<run_dir>/config.json``: the config and what it resolved to."""
  run_dir.mkdir(parents=True, exist_ok=True)
  writers.dump_json(run_dir / "config.json", {
      "config": ctx.config.to_dict(),
      "resolved": dict(resolved),
  })


def host_map(fn: Callable[..., np.ndarray], *trees: Any) -> Any:
  """``fn`` on the host copies of the leaves (slicing and stacking small
  trees on the device would compile one program per leaf shape)."""
  return jax.tree.map(
      lambda *xs: jax.device_put(fn(*[np.asarray(x) for x in xs])), *trees)


def state_pair(state: DistillState):
  """The student's ``(params, model_state)``."""
  return state.params["student"], state.model_state["student"]


def distillation_loop(ctx, *, name, run_dir, distillation, state, batches,
                      num_epochs, labels=None, checkpoints=True,
                      step=None, eval_step=None) -> loop_lib.Loop:
  """The loop of a ``Distillation``'s (cached) train and eval steps."""
  del state  # The loop is given the state when it runs.
  step = step or ctx.cached(("train_step", id(distillation)),
                            lambda: make_train_step(distillation))
  eval_step = eval_step or ctx.cached(("eval_step", id(distillation)),
                                      lambda: make_eval_step(distillation))
  return loop_lib.Loop(
      name=name, run_dir=run_dir, step=step, batches=batches,
      evaluate=evaluator(ctx, eval_step), num_epochs=num_epochs,
      batch_size=ctx.data.batch_size, finite=finite, labels=labels,
      to_checkpoint=(lambda s: s) if checkpoints else None,
      from_checkpoint=(lambda _, restored: restored) if checkpoints else None,
  )


def run_result(*, role, name, method, model_name, seed, params,
               history) -> dict:
  """A run's ``results.json`` record: who, what, and its history's summary."""
  return {"role": role, "run": name, "method": method, "model": model_name,
          "seed": seed, "params": model_checks.count_params(params),
          **loop_lib.summarize_history(history)}
