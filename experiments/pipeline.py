"""The pipeline, method-comparison and temperature-sweep modes.

* :func:`run_methods` with ``mode="pipeline"`` (``--mode=pipeline``): for
  each of
  ``config.pipeline.seeds`` seeds, the teacher, the baseline student (labels
  only) and one student per method of ``config.pipeline.methods``; then the
  parameter count and inference latency of each model, and the result table
  (test accuracy, mean ± standard deviation over the seeds, at the best and
  at the last epoch).
* :func:`run_methods` with ``mode="compare"``: the same for every method of
  ``config.compare.methods``, over ``config.compare.seeds`` seeds.
* :func:`run_sweep` (``--mode=sweep``): one vmapped run of N students that
  differ only in the temperature (``jaxkd.sweep``), with a plot of accuracy
  against temperature.

Each writes ``<results_dir>/<name>.md`` (the table, the exact command, the
date, the machine and the versions) and ``<name>.json``, plus copies in the
workdir. ``tools/results_readme.py`` renders the README's results section
from these files.
"""

from __future__ import annotations

import os
import pathlib
import time
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from experiments import loop as loop_lib
from experiments import data_free as data_free_run
from experiments import methods as methods_lib
from experiments import report
from experiments import train as train_lib
from experiments import writers
from jaxkd import objective
from jaxkd import sharding
from jaxkd import sweep as sweep_lib
from jaxkd.evaluation import summarize


def _latencies(ctx, models: Mapping[str, tuple[Any, Any, Any]]) -> dict:
  config = ctx.config
  return {
      name: train_lib.measure_latency(
          model, params, state, ctx.data.image_shape,
          batch_size=config.pipeline.latency_batch_size,
          repeats=config.pipeline.latency_repeats)
      for name, (model, params, state) in models.items()
  }


def _train_methods(ctx, methods: Sequence[str], seeds: Sequence[int]):
  """Teachers, baseline and ``methods`` for every seed; the runs' results
  by row key and a trained copy of each architecture (for latency)."""
  config = ctx.config
  runs: dict[str, list[dict]] = {}
  trained: dict[str, tuple[Any, Any, Any]] = {}
  for seed in seeds:
    per_method = train_lib.teachers_for(ctx, seed, methods)
    teacher_sets = {id(t): t for t in per_method.values() if t is not None}
    for teachers in teacher_sets.values():
      if teachers.born_again:
        continue  # The baseline row.
      for index, result in enumerate(teachers.results):
        key = "teacher" if index == 0 else f"teacher_{index}"
        runs.setdefault(key, []).append(result)
      if teachers.model_name not in trained:
        params, state = jax.tree.map(
            lambda x: np.asarray(x)[0],
            (teachers.variables.params, teachers.variables.state))
        trained[teachers.model_name] = (teachers.group.model, params, state)
    for method in methods:
      result, state = train_lib.train_student(ctx, seed, method,
                                              per_method[method])
      runs.setdefault(method, []).append(result)
      if config.student.model not in trained:
        trained[config.student.model] = (
            ctx.model(config.student.model), state.params["student"],
            state.model_state["student"])
  return runs, trained


def _data_free_samples(ctx, methods: Sequence[str],
                       runs: Mapping[str, list[dict]], name: str,
                       results_dir) -> str:
  """What the data-free students' generators made: a table and a picture
  (seed 0) written beside the results; "" without data-free methods."""
  lines, panels, images = [], {}, 0
  for method in methods:
    generated = [r["generated"] for r in runs.get(method, [])
                 if "generated" in r]
    if not generated:
      continue
    images = generated[0]["images"]
    loaded = data_free_run.load_samples(ctx.workdir / "seed_0" / method)
    if loaded is not None:
      panels[method] = loaded
    seeds = len(generated)
    balance = report.mean_std([g["class_balance"] for g in generated])
    confidence = report.mean_std([g["teacher_confidence"] for g in generated])
    fmt = lambda ms: (f"{ms[0]:.3f}" if seeds < 2
                      else f"{ms[0]:.3f} ± {ms[1]:.3f}")
    histogram = " ".join(str(n) for n in generated[0]["class_histogram"])
    lines.append(f"| {method} | {fmt(balance)} | {fmt(confidence)} |"
                 f" {histogram} |")
  if not lines:
    return ""
  picture = f"{name}_samples.png"
  for directory in [ctx.workdir] + (
      [pathlib.Path(results_dir)] if results_dir is not None else []):
    if panels:
      data_free_run.save_samples(directory / picture, panels)
  text = [
      "What the generators make, as the teacher sees"
      f" {images} fresh generated images at the end of training: class"
      " balance (entropy of the teacher's mean prediction / log C; 1 ="
      " uniform over the classes), the teacher's mean top probability, and"
      " how many images the teacher puts in each class (seed 0):",
      "",
      "| method | class balance | teacher confidence | class histogram"
      " (seed 0) |",
      "|---|---|---|---|",
      *lines,
  ]
  if panels:
    text += ["", f"![Generated images by the teacher's class]({picture})"]
  return "\n".join(text)


def _context(config, workdir, mode, context) -> train_lib.Context:
  train_lib.validate(config, mode)
  workdir = pathlib.Path(workdir)
  if context is not None and (context.config is not config
                              or context.workdir != workdir):
    raise ValueError("`context` was made for another config or workdir.")
  workdir.mkdir(parents=True, exist_ok=True)
  writers.dump_json(workdir / "config.json", config.to_dict())
  return context or train_lib.Context.create(config, workdir)


def _student_methods(methods: Sequence[str]) -> list[str]:
  return ["baseline"] + [m for m in methods if m != "baseline"]


def run_methods(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike[str],
    *,
    mode: str,
    command: str = "",
    results_dir: str | os.PathLike[str] | None = None,
    context: train_lib.Context | None = None,
) -> dict[str, Any]:
  """``--mode=pipeline`` or ``--mode=compare``; returns the table's data.

  ``context`` (of this config and workdir) reuses the steps it has
  compiled; by default a new one is made.
  """
  start = time.perf_counter()
  ctx = _context(config, workdir, mode, context)
  workdir = ctx.workdir
  sub = config.pipeline if mode == "pipeline" else config.compare
  methods = _student_methods(sub.methods)
  seeds = list(range(sub.seeds))
  train_lib.preflight(ctx, methods)
  runs, trained = _train_methods(ctx, methods, seeds)
  latency = _latencies(ctx, trained)
  rows = report.result_rows(config, runs, latency)
  gaps = report.method_gaps(rows)
  wall = time.perf_counter() - start
  name = config.name if mode == "pipeline" else f"{config.name}_compare"
  data = ctx.data
  summary = (
      f"Data set `{data.spec.name}` (train split `{data.train_split}`,"
      f" {data.num_train} examples; test split `{data.test_split}`),"
      f" {config.num_epochs} student epochs of {data.steps_per_epoch} steps"
      f" (batch {config.batch_size}), teacher"
      f" {train_lib.teacher_epochs(config)} epochs;"
      f" {len(seeds)} seeds ({', '.join(map(str, seeds))}). Test accuracy is"
      " the mean ± sample standard deviation over the seeds; 'best epoch'"
      " picks each run's best epoch on the test set itself (optimistic),"
      " 'last epoch' is the honest number. Latency: median of"
      f" {config.pipeline.latency_repeats} jitted forward passes of a batch"
      f" of {config.pipeline.latency_batch_size} on {jax.default_backend()},"
      " warm-up excluded.")
  gap_text = report.render_gaps(gaps)
  if gap_text:
    gap_text = ("Distilled students against the baseline (same seeds, same"
                " initialisation and data order), last epoch; '2 std' uses the"
                " larger of the two rows' standard deviations:\n\n" + gap_text)
  reading = report.render_reading(rows, gaps, config)
  samples = _data_free_samples(ctx, methods, runs, name, results_dir)
  notes = config.pipeline.notes if mode == "pipeline" else ""
  report.write_results(
      name, title=name, summary=summary,
      table=report.render_table(rows, config.pipeline.latency_batch_size),
      extra_sections=[gap_text, reading, samples, notes],
      payload={"mode": mode, "rows": rows, "gaps": gaps,
               "config": config.to_dict()},
      command=command, wall_time_s=wall, results_dir=results_dir,
      workdir=workdir)
  return {"rows": rows, "gaps": gaps, "wall_time_s": wall}


def run_sweep(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike[str],
    *,
    command: str = "",
    results_dir: str | os.PathLike[str] | None = None,
    context: train_lib.Context | None = None,
) -> dict[str, Any]:
  """``--mode=sweep``: N students, one per temperature, in one vmapped run."""
  start = time.perf_counter()
  ctx = _context(config, workdir, "sweep", context)
  workdir = ctx.workdir
  method = config.sweep.method
  temperatures = [float(t) for t in config.sweep.temperatures]
  labels = [f"T={t:g}" for t in temperatures]
  seed = config.seed
  train_lib.preflight(ctx, [method], temperature=objective.Hyper("temperature"))
  teachers = train_lib.teachers_for(ctx, seed, [method])[method]
  spe = ctx.data.steps_per_epoch
  plan = methods_lib.build(method, config, steps_per_epoch=spe,
                           temperature=objective.Hyper("temperature"))
  if plan.num_teachers and teachers is not None:
    teachers = teachers.take(plan.num_teachers)
  elif not plan.num_teachers:
    teachers = None
  distillation = train_lib.student_distillation(ctx, method, plan)
  extra = None
  offline = teachers is not None and train_lib.uses_cached_logits(ctx, plan)
  if offline:
    extra = {"teacher_logits": train_lib.teacher_logits_on_train(
        ctx, teachers.group, teachers.variables)}
  sample = ctx.data.sample_batch(extra)
  states = sweep_lib.init_sweep(
      distillation, jax.random.key(seed), sample,
      () if teachers is None else (teachers.variables,),
      hparams={"temperature": temperatures})
  if ctx.mesh is not None:
    states = jax.device_put(states, sharding.replicated(ctx.mesh))
  step = sweep_lib.make_sweep_step(distillation)
  eval_step = sweep_lib.make_sweep_eval_step(distillation)

  def evaluate(states):
    sums = jax.device_get([eval_step(states, ctx.put(b))
                           for b in ctx.data.eval_batches()])
    out = {}
    for i in range(len(temperatures)):
      summary = summarize([{k: v[i] for k, v in s.items()} for s in sums])
      for k, v in summary.items():
        if np.ndim(v) == 0:
          out.setdefault(f"test/{k}", []).append(v)
    return {k: np.asarray(v) for k, v in out.items()}

  def finite(metrics):
    return bool(np.all(np.asarray(metrics["nonfinite"]) == 0)
                and np.all(np.isfinite(metrics["loss"])))

  run_dir = workdir / f"seed_{seed}" / f"sweep_{method}"
  train_lib.save_config(ctx, run_dir, {
      "role": "sweep", "method": method, "temperatures": temperatures,
      "offline_teacher_logits": offline, "seed": seed})
  loop = loop_lib.Loop(
      name=f"seed {seed} {method} sweep over T", run_dir=run_dir,
      step=step, batches=ctx.data.train_iterator(seed, extra=extra),
      evaluate=evaluate, num_epochs=config.num_epochs,
      batch_size=config.batch_size, finite=finite, labels=labels)
  states, history = loop_lib.run_loop(ctx, loop, states)
  rows = []
  for t, label in zip(temperatures, labels):
    key = f"test/accuracy[{label}]"
    values = [h[key] for h in history]
    best = int(np.argmax(values))
    rows.append({"temperature": t, "last_accuracy": values[-1],
                 "best_accuracy": values[best],
                 "best_epoch": history[best]["epoch"]})
  _plot_sweep(run_dir / "accuracy_vs_temperature.png", rows,
              title=f"{config.name}: {method}, seed {seed}",
              split=ctx.data.test_split)
  wall = time.perf_counter() - start
  name = f"{config.name}_sweep"
  split = ctx.data.test_split
  table = "\n".join(
      [f"| temperature | accuracy on `{split}`, last epoch (%) |"
       f" accuracy on `{split}`, best epoch (%) | best epoch |",
       "|---:|---:|---:|---:|"]
      + [f"| {r['temperature']:g} | {100 * r['last_accuracy']:.2f} |"
         f" {100 * r['best_accuracy']:.2f} | {r['best_epoch']} |"
         for r in rows])
  summary = (
      f"Method `{method}` ({report.method_detail(config, method)}; the temperature"
      f" varies), student `{config.student.model}`, teacher"
      f" `{config.teacher.model}`, data `{ctx.data.spec.name}` (train"
      f" `{ctx.data.train_split}`, evaluated on `{ctx.data.test_split}`),"
      f" seed {seed}, {config.num_epochs} epochs: {len(temperatures)}"
      " students trained together by one vmapped step (`jaxkd.sweep`).")
  png = workdir / f"{name}.png"
  _plot_sweep(png, rows, title=f"{config.name}: {method}",
              split=ctx.data.test_split)
  if results_dir is not None:
    pathlib.Path(results_dir).mkdir(parents=True, exist_ok=True)
    _plot_sweep(pathlib.Path(results_dir) / f"{name}.png", rows,
                title=f"{config.name}: {method}", split=ctx.data.test_split)
  report.write_results(
      name, title=name, summary=summary, table=table,
      extra_sections=[f"![accuracy against temperature]({name}.png)"],
      payload={"mode": "sweep", "rows": rows, "config": config.to_dict()},
      command=command, wall_time_s=wall, results_dir=results_dir,
      workdir=workdir)
  return {"rows": rows, "wall_time_s": wall}


def _plot_sweep(path: pathlib.Path, rows: Sequence[dict], *, title: str,
                split: str):
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  temperatures = [r["temperature"] for r in rows]
  fig, ax = plt.subplots(figsize=(5, 3.4))
  ax.plot(temperatures, [100 * r["last_accuracy"] for r in rows],
          marker="o", label="last epoch")
  ax.plot(temperatures, [100 * r["best_accuracy"] for r in rows],
          marker=".", linestyle="--", label="best epoch")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("temperature")
  ax.set_ylabel(f"accuracy on {split} (%)")
  ax.set_title(title, fontsize=9)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
