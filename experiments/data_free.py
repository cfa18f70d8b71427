"""Data-free students: the run of ``jaxkd.methods.data_free`` and what it made.

:func:`train` trains one student from generated images only (the training
split is never read: the loop's batches are empty and the generator makes
every image), evaluates it on the real test split each epoch, and records
what the generator ended with (:func:`generated_summary`): the teacher's
class histogram, its confidence and the class balance over a fixed set of
generated images, and a picture of them grouped by the class the teacher
gives them (``samples.png`` in the run's directory).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
import optax

from experiments import loop as loop_lib
from experiments import runs
from experiments import teacher_runs
from experiments import writers
from experiments.context import Context
from experiments.settings import make_optimizer
from jaxkd import teachers as teachers_lib
from jaxkd import losses
from jaxkd.methods import data_free as data_free_lib
from jaxkd.state import DistillState
from jaxkd.evaluation import make_eval_step

# Images of the fixed set that describes a trained generator.
NUM_SUMMARY_IMAGES = 1000
# Columns of the samples picture (images per class).
SAMPLES_PER_CLASS = 8


def steps_per_epoch(ctx: Context, cfg: ml_collections.ConfigDict) -> int:
  """Generator steps per epoch: ``cfg.steps_per_epoch`` or the real data's."""
  return cfg.steps_per_epoch or ctx.data.steps_per_epoch


def spec(ctx: Context, group: teachers_lib.TeacherGroup,
         cfg: ml_collections.ConfigDict
         ) -> data_free_lib.DataFreeDistillation:
  """The :class:`DataFreeDistillation` of the settings ``cfg``."""
  config = ctx.config
  spe = steps_per_epoch(ctx, cfg)
  student_optimizer = (config.optimizer if cfg.optimizer is None
                       else cfg.optimizer)

  def build():
    return data_free_lib.DataFreeDistillation(
        ctx.model(config.student.model), group,
        data_free_lib.Generator(image_shape=ctx.data.image_shape,
                                width=cfg.generator_width,
                                output=cfg.generator_output,
                                upsamplings=cfg.generator_upsamplings),
        # The schedule spans the data-free run's own steps.
        make_optimizer(student_optimizer, steps_per_epoch=spe,
                       num_epochs=config.num_epochs),
        optax.adam(cfg.generator_learning_rate),
        noise_dim=cfg.noise_dim, batch_size=cfg.batch_size,
        temperature=cfg.temperature, bn_weight=cfg.bn_weight,
        one_hot_weight=cfg.one_hot_weight,
        activation_weight=cfg.activation_weight,
        entropy_weight=cfg.entropy_weight,
        adversarial_weight=cfg.adversarial_weight)
  return ctx.cached(("data_free", id(group), repr(sorted(cfg.items()))),
                    build)


def train(ctx: Context, seed: int, method: str,
          cfg: ml_collections.ConfigDict, teachers: teacher_runs.Teachers,
          run_dir: pathlib.Path) -> tuple[dict, DistillState]:
  """Trains the data-free student of ``seed``; returns results and state."""
  config = ctx.config
  spe = steps_per_epoch(ctx, cfg)
  dfd = spec(ctx, teachers.group, cfg)

  def build():
    return (data_free_lib.make_data_free_step(dfd),
            make_eval_step(dfd.distillation))

  step, eval_step = ctx.cached(("data_free_steps", id(dfd)), build)
  init = ctx.cached(("data_free_init", id(dfd)), lambda: jax.jit(
      dfd.init, static_argnums=2))
  state = init(jax.random.key(seed), teachers.variables,
               tuple(ctx.data.image_shape))
  evaluate = runs.evaluator(ctx, eval_step)

  def finite(metrics):
    return bool(np.isfinite(metrics["loss"])
                and np.isfinite(metrics["generator_loss"]))

  def no_data():
    while True:
      yield None

  name = f"seed {seed} {method} ({config.student.model})"
  runs.save_config(ctx, run_dir, {
      "role": "student", "method": method, "seed": seed,
      "model": config.student.model, "steps_per_epoch": spe,
      "data_free": cfg.to_dict()})
  loop = loop_lib.Loop(
      name=name, run_dir=run_dir, step=lambda s, _: step(s),
      batches=no_data(), evaluate=evaluate,
      num_epochs=config.num_epochs, batch_size=cfg.batch_size,
      finite=finite, to_checkpoint=lambda s: s,
      from_checkpoint=lambda _, restored: restored, steps_per_epoch=spe)
  state, history = loop_lib.run_loop(ctx, loop, state)
  result = runs.run_result(
      role="student", name=name, method=method,
      model_name=config.student.model, seed=seed,
      params=state.student_params, history=history)
  summary, grid = generated_summary(ctx, dfd, state, seed=seed)
  result["generated"] = summary
  np.save(run_dir / "samples.npy", grid)
  save_samples(run_dir / "samples.png", {f"{method}, seed {seed}": (
      grid, summary)})
  writers.dump_json(run_dir / "results.json", result)
  return result, state


def generated_summary(
    ctx: Context, dfd: data_free_lib.DataFreeDistillation,
    state: DistillState, *, seed: int,
) -> tuple[dict[str, Any], np.ndarray]:
  """What the trained generator makes, as the teachers see it.

  Draws :data:`NUM_SUMMARY_IMAGES` images (the generator's running
  BatchNorm statistics, as at test time), labels them with the teachers'
  ensemble and returns ``(summary, grid)``: the class histogram, the
  balance (entropy of the mean prediction / log C), the mean top
  probability, and ``grid [C, SAMPLES_PER_CLASS, H, W, channels]`` of the
  most confident images of each class in pixel space (``[0, 1]``; missing
  classes stay black).
  """
  noise = jax.random.normal(
      jax.random.fold_in(jax.random.key(seed), 7),
      (NUM_SUMMARY_IMAGES, dfd.noise_dim))
  forward = ctx.cached(("data_free_summary", id(dfd)), lambda: jax.jit(
      lambda s, z: _label(dfd, s, z)))
  images, log_probs = jax.device_get(forward(state, noise))
  images, log_probs = np.asarray(images), np.asarray(log_probs)
  probs = np.exp(log_probs)
  num_classes = probs.shape[-1]
  labels = probs.argmax(-1)
  confidence = probs.max(-1)
  mean = probs.mean(0)
  balance = float(-np.sum(mean * np.log(np.maximum(mean, 1e-30)))
                  / np.log(num_classes))
  spec_ = ctx.data.spec
  pixels = np.clip(images * np.asarray(spec_.std) + np.asarray(spec_.mean),
                   0.0, 1.0)
  grid = np.zeros((num_classes, SAMPLES_PER_CLASS) + pixels.shape[1:],
                  np.float32)
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    members = members[np.argsort(-confidence[members])][:SAMPLES_PER_CLASS]
    grid[c, :len(members)] = pixels[members]
  summary = {
      "images": NUM_SUMMARY_IMAGES,
      "class_histogram": np.bincount(labels, minlength=num_classes).tolist(),
      "class_balance": balance,
      "teacher_confidence": float(confidence.mean()),
      "pixel_mean": float(pixels.mean()),
  }
  return summary, grid


def _label(dfd, state, noise):
  images = dfd.generate(state, noise)
  logits, _, _, _ = dfd.teacher_forward(state.teachers[0], images)
  ensemble = losses.ensemble_log_soft_targets(logits)
  return images, ensemble


def save_samples(path: pathlib.Path,
                 panels: Mapping[str, tuple[np.ndarray, Mapping[str, Any]]]
                 ) -> None:
  """Grids of :func:`generated_summary` as one PNG, a panel per title.

  Each panel has a row per class (the teacher's label, with how many of the
  summary's images got it) and the most confident images in the columns.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  grids = list(panels.values())
  rows, cols = grids[0][0].shape[:2]
  fig, axes = plt.subplots(
      rows, (cols + 1) * len(grids) - 1,
      figsize=(((cols + 1) * len(grids)) * 0.55, rows * 0.6 + 0.9),
      squeeze=False)
  for p, (title, (grid, summary)) in enumerate(panels.items()):
    first = p * (cols + 1)
    for r in range(rows):
      for c in range(cols):
        ax = axes[r, first + c]
        image = grid[r, c]
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image,
                  cmap="gray", vmin=0.0, vmax=1.0)
        ax.set_xticks([])
        ax.set_yticks([])
        if c == 0:
          ax.set_ylabel(f"{r} ({summary['class_histogram'][r]})",
                        rotation=0, labelpad=14, fontsize=6, va="center")
      if p:
        axes[r, first - 1].axis("off")
    axes[0, first].set_title(
        f"{title}: balance {summary['class_balance']:.2f}, confidence"
        f" {summary['teacher_confidence']:.2f}", fontsize=7, loc="left")
  fig.subplots_adjust(left=0.08, right=0.99, bottom=0.01, top=0.9,
                      wspace=0.05, hspace=0.05)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=80)
  plt.close(fig)


def load_samples(run_dir: pathlib.Path
                 ) -> tuple[np.ndarray, dict[str, Any]] | None:
  """The grid and summary :func:`train` saved in ``run_dir``, if any."""
  grid, results = run_dir / "samples.npy", run_dir / "results.json"
  if not (grid.exists() and results.exists()):
    return None
  return np.load(grid), json.loads(results.read_text())["generated"]
