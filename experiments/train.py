"""The experiments' trainer: teachers, students, logs and checkpoints.

:func:`train_and_evaluate` is ``--mode=train``: it trains (or loads) the
teachers a config's ``method`` needs, then the student, and returns the
student's results. The pieces are public for ``experiments/pipeline.py``:

* :func:`validate`: every check that needs no data and no compilation
  (method, model and optimiser names, the mode's fields);
* :class:`Context`: the data, the models and the compiled steps shared by
  every run of one process (the N seeds of a pipeline reuse the steps
  compiled for the first);
* :func:`preflight`: every method's step traced on abstract values, so
  that a method that cannot run fails before anything is trained;
* :func:`get_teachers`, :func:`train_student`: one run each, in its own
  directory, driven by ``experiments.loop.run_loop`` (which resumes exactly
  from the run's latest checkpoint);
* :func:`measure_latency`.

The teachers' runs live in :mod:`experiments.teacher_runs` and what every
run shares (first state, loop, results) in :mod:`experiments.runs`; their
public names are re-exported here.

Each run directory holds ``config.json`` (the resolved config),
``metrics.jsonl`` (train metrics every ``log_every_steps`` and one line per
epoch with the test metrics), ``tensorboard/`` (event files),
``curves.png``, ``results.json`` and ``checkpoints/`` (Orbax).
"""

from __future__ import annotations

import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import loop as loop_lib
from experiments import methods as methods_lib
from experiments import runs
from experiments import writers
from jaxkd import measure
from jaxkd import objective
from jaxkd import teachers as teachers_lib
from jaxkd.models import Model
from jaxkd.state import DistillState
from jaxkd.train_step import Distillation

# Re-exported: experiments/pipeline.py and the tests use them as train.*.
from experiments.context import Context  # pylint: disable=g-bad-import-order
from experiments.context import _views  # pylint: disable=g-bad-import-order
from experiments.settings import describe_config  # pylint: disable=g-bad-import-order
from experiments.settings import make_optimizer  # pylint: disable=g-bad-import-order
from experiments.settings import validate  # pylint: disable=g-bad-import-order
from experiments.runs import init_state  # pylint: disable=g-bad-import-order
from experiments.runs import save_config  # pylint: disable=g-bad-import-order
from experiments.teacher_runs import evaluate_teachers  # pylint: disable=g-bad-import-order
from experiments.teacher_runs import get_teachers  # pylint: disable=g-bad-import-order
from experiments.teacher_runs import teacher_epochs  # pylint: disable=g-bad-import-order
from experiments.teacher_runs import teacher_logits_on_train  # pylint: disable=g-bad-import-order
from experiments.teacher_runs import teacher_name  # pylint: disable=g-bad-import-order
from experiments.teacher_runs import Teachers  # pylint: disable=g-bad-import-order
from experiments.teacher_runs import train_teacher  # pylint: disable=g-bad-import-order

# ---------------------------------------------------------------------------
# Students.
# ---------------------------------------------------------------------------


def born_again_teacher(ctx: Context, seed: int) -> Teachers:
  """The student's own architecture trained on labels: the baseline run."""
  result, state = train_student(ctx, seed, "baseline", None)
  params, model_state = runs.state_pair(state)
  group = ctx.born_again_group()
  variables = teachers_lib.TeacherVariables(
      params=runs.host_map(lambda x: x[None], params),
      state=runs.host_map(lambda x: x[None], model_state))
  return Teachers(group, variables, [result], ctx.config.student.model,
                  born_again=True)


def student_distillation(ctx: Context, method: str,
                         plan: methods_lib.Plan) -> Distillation:
  """The (cached) ``Distillation`` of a method's student."""
  config = ctx.config
  spe = ctx.data.steps_per_epoch
  group = ctx.group_for(plan)
  # The terms' reprs tell a sweep's Hyper temperature from a fixed one.
  key = ("student", method, tuple(map(repr, plan.objective)), id(group))

  def build():
    return Distillation(
        student=ctx.model(config.student.model),
        objective=plan.objective,
        optimizer=make_optimizer(config.optimizer, steps_per_epoch=spe,
                                 num_epochs=config.num_epochs),
        teachers=() if group is None else (group,),
        views=_views(config.student.shift_pixels, plan.views),
        nonfinite="skip")
  return ctx.cached(key, build)


def _abstract_teachers(ctx: Context, group: teachers_lib.TeacherGroup,
                       count: int) -> teachers_lib.TeacherVariables:
  images = jax.ShapeDtypeStruct((1,) + ctx.data.image_shape, jnp.float32)
  params, state = jax.eval_shape(group.model.init, jax.random.key(0), images)
  stack = lambda tree: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct((count,) + x.shape, x.dtype), tree)
  return teachers_lib.TeacherVariables(stack(params), stack(state))


def preflight(ctx: Context, methods: Sequence[str], *,
              temperature: Any = None) -> None:
  """Traces each method's initialisation and step on abstract values.

  Nothing runs and nothing is compiled: a method that cannot work with these
  models (a feature the student lacks, a loss that needs spatial maps, a
  teacher without BatchNorm for DeepInversion) is reported before the first
  run starts, not after hours of training the ones before it.

  Raises:
    ValueError: Naming the method, the models and the cause.
  """
  config = ctx.config
  spe = ctx.data.steps_per_epoch
  sample = ctx.data.sample_batch()
  for method in methods:
    plan = methods_lib.build(method, config, steps_per_epoch=spe,
                             temperature=temperature)
    group = ctx.group_for(plan)
    count = max(plan.num_teachers, 1)
    variables = (None if group is None
                 else _abstract_teachers(ctx, group, count))
    hparams = ({temperature.name: 1.0}
               if isinstance(temperature, objective.Hyper) else None)
    try:
      if plan.data_free:
        from experiments import data_free  # pylint: disable=g-import-not-at-top
        dfd = data_free.spec(ctx, group, plan.settings)
        jax.eval_shape(
            lambda v, d=dfd: d.init(jax.random.key(0), v,
                                    ctx.data.image_shape), variables)
      else:
        distillation = student_distillation(ctx, method, plan)
        jax.eval_shape(
            lambda s, v, d=distillation: d.init(
                jax.random.key(0), s, () if v is None else (v,),
                hparams=hparams), sample, variables)
    except (ValueError, TypeError) as error:
      teacher = "" if group is None else (
          f" and teacher {group.model.name!r}")
      raise ValueError(
          f"Method {method!r} cannot run with student"
          f" {config.student.model!r}{teacher} on"
          f" {ctx.data.spec.name!r}: {error}"
      ) from error


def uses_cached_logits(ctx: Context, plan: methods_lib.Plan) -> bool:
  """Whether cached teacher logits give exactly the online step."""
  config = ctx.config
  return bool(config.offline_teacher and ctx.data.in_memory
              and plan.logits_only and not config.student.shift_pixels)


def train_student(
    ctx: Context,
    seed: int,
    method: str,
    teachers: Teachers | None,
    *,
    run_dir: pathlib.Path | None = None,
) -> tuple[dict, DistillState]:
  """Trains the student of ``seed`` with ``method``; returns its results
  and final state (for ``data_free`` a ``DistillState`` view of it)."""
  config = ctx.config
  spe = ctx.data.steps_per_epoch
  plan = methods_lib.build(method, config, steps_per_epoch=spe)
  run_dir = run_dir or ctx.workdir / f"seed_{seed}" / method
  if plan.num_teachers and teachers is None:
    raise ValueError(f"Method {method!r} needs teachers.")
  if teachers is not None and plan.num_teachers:
    teachers = teachers.take(plan.num_teachers)
  if plan.data_free:
    # The data-free runner builds on this module's pieces.
    from experiments import data_free  # pylint: disable=g-import-not-at-top
    return data_free.train(ctx, seed, method, plan.settings, teachers,
                           run_dir)
  if not plan.num_teachers:
    teachers = None
  distillation = student_distillation(ctx, method, plan)
  extra = None
  offline = teachers is not None and uses_cached_logits(ctx, plan)
  if offline:
    extra = {"teacher_logits": teacher_logits_on_train(ctx, teachers.group,
                                               teachers.variables)}
  sample = ctx.data.sample_batch(extra)
  # The state holds its own copy of the teachers (the step donates it).
  state = init_state(
      ctx, distillation, jax.random.key(seed), sample,
      () if teachers is None else (teachers.variables,))
  state = ctx.place(state)
  name = f"seed {seed} {method} ({config.student.model})"
  save_config(ctx, run_dir, {
      "role": "student", "method": method, "seed": seed,
      "model": config.student.model, "steps_per_epoch": spe,
      "offline_teacher_logits": offline,
      "teachers": None if teachers is None else [
          r.get("run") for r in teachers.results],
      "objective": [repr(t) for t in plan.objective]})
  loop = runs.distillation_loop(
      ctx, name=name, run_dir=run_dir, distillation=distillation,
      state=state, batches=ctx.data.train_iterator(seed, extra=extra),
      num_epochs=config.num_epochs)
  state, history = loop_lib.run_loop(ctx, loop, state)
  result = runs.run_result(role="student", name=name, method=method,
                       model_name=config.student.model, seed=seed,
                       params=state.params["student"], history=history)
  result["offline_teacher_logits"] = offline
  writers.dump_json(run_dir / "results.json", result)
  return result, state


# ---------------------------------------------------------------------------
# Latency, and the train mode.
# ---------------------------------------------------------------------------


def measure_latency(
    model: Model,
    params: Any,
    model_state: Any,
    image_shape: Sequence[int],
    *,
    batch_size: int,
    repeats: int,
    warmup: int = 3,
) -> dict[str, float]:
  """Inference time of one batch on the default device, in milliseconds.

  The forward pass (``train=False``) is jitted; ``warmup`` calls (the first
  compiles) are not timed; each timed call ends with ``block_until_ready``.
  Returns the median and the 10th and 90th percentiles.
  """
  forward = jax.jit(
      lambda p, s, x: model.apply(p, s, x, train=False, rng=None)[0])
  images, params, model_state = jax.device_put(
      (np.zeros((batch_size,) + tuple(image_shape), np.float32), params,
       model_state))
  times = 1e3 * np.asarray(measure.time_calls(
      lambda: forward(params, model_state, images).block_until_ready(),
      steps=repeats, warmup=warmup))
  return {"median_ms": float(np.median(times)),
          "p10_ms": float(np.percentile(times, 10)),
          "p90_ms": float(np.percentile(times, 90)),
          "batch_size": int(batch_size), "repeats": int(repeats)}


def teachers_for(ctx: Context, seed: int, methods: Sequence[str]
                 ) -> dict[str, Teachers | None]:
  """The teachers each method of ``methods`` uses, built once per seed."""
  config = ctx.config
  plans = {m: methods_lib.build(m, config,
                                steps_per_epoch=ctx.data.steps_per_epoch)
           for m in methods}
  needed = max([p.num_teachers for p in plans.values()
                if not p.teacher_is_student] + [0])
  if any(p.data_free for p in plans.values()):
    needed = max(needed, 1)
  shared = get_teachers(ctx, seed, needed) if needed else None
  out = {}
  for method, plan in plans.items():
    if plan.teacher_is_student:
      out[method] = born_again_teacher(ctx, seed)
    elif plan.num_teachers or plan.data_free:
      out[method] = shared
    else:
      out[method] = None
  return out


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str | pathlib.Path) -> dict[str, Any]:
  """``--mode=train``: the teachers, then the student of ``config.method``.

  Returns:
    The student's results (``best_accuracy``, ``best_epoch``,
    ``last_accuracy``, ``params``, ...) with the teachers' under
    ``"teachers"``; also written to ``<workdir>/results.json``.
  """
  validate(config, "train")
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  ctx = Context.create(config, workdir)
  if methods_lib.needs_teacher(config.method, config) and not (
      config.teacher.load):
    # Teachers are trained first: check the student's method before that.
    preflight(ctx, [config.method])
  writers.dump_json(workdir / "config.json", config.to_dict())
  teachers = teachers_for(ctx, config.seed, [config.method])[config.method]
  result, _ = train_student(ctx, config.seed, config.method, teachers)
  result["teachers"] = [] if teachers is None else teachers.results
  writers.dump_json(workdir / "results.json", result)
  return result
