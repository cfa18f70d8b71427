"""An experiment config checked and turned into library objects.

:func:`validate` runs every check that needs no data and no compilation
(method, model and optimiser names, the mode's fields);
:func:`describe_config` lists every field (``--list_config``);
:func:`make_optimizer` builds the Optax optimiser from optax's own
schedules.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import ml_collections
import optax

from experiments import methods as methods_lib
from jaxkd import models

NONFINITE_MODES = ("stop", "skip")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "piecewise", "cosine")

# ---------------------------------------------------------------------------
# Checks before any data is read or anything is compiled.
# ---------------------------------------------------------------------------


def describe_config(config: ml_collections.ConfigDict) -> str:
  """Every field of ``config`` as ``--config.<path>=<value>`` lines."""
  lines = []

  def walk(prefix: str, node: Any) -> None:
    for key in sorted(node.keys()):
      value = node[key]
      if isinstance(value, ml_collections.ConfigDict):
        walk(f"{prefix}{key}.", value)
      else:
        lines.append(f"--config.{prefix}{key}={value!r}")

  walk("", config)
  return "\n".join(lines)


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ValueError(
        f"`{name}` must be one of {', '.join(map(repr, choices))}; got"
        f" {value!r}."
    )


def _check_optimizer(name: str, cfg: ml_collections.ConfigDict) -> None:
  _check_choice(f"{name}.name", cfg.name, OPTIMIZERS)
  _check_choice(f"{name}.schedule", cfg.schedule, SCHEDULES)
  if cfg.learning_rate <= 0:
    raise ValueError(
        f"`{name}.learning_rate` must be > 0, got {cfg.learning_rate}.")


def validate(config: ml_collections.ConfigDict, mode: str = "train") -> None:
  """Raises ValueError on a bad method, model or optimiser name.

  Needs no data and compiles nothing; :func:`Context.create` then checks the
  data set, the splits and that the models take its images.
  """
  names = {"train": [config.method], "pipeline": list(config.pipeline.methods),
           "compare": list(config.compare.methods),
           "sweep": [config.sweep.method]}
  if mode not in names:
    raise ValueError(f"Unknown mode {mode!r}; modes: {', '.join(names)}.")
  for name in names[mode]:
    methods_lib.check_method(name, config)
    methods_lib.build(name, config, steps_per_epoch=1)  # checks sub-config
  if mode == "sweep" and config.sweep.method not in (
      methods_lib.TEMPERATURE_METHODS):
    raise ValueError(
        f"`sweep.method` must have a temperature: one of"
        f" {', '.join(methods_lib.TEMPERATURE_METHODS)}; got"
        f" {config.sweep.method!r}."
    )
  if mode == "sweep" and not config.sweep.temperatures:
    raise ValueError("`sweep.temperatures` is empty.")
  if mode == "sweep" and any(t <= 0 for t in config.sweep.temperatures):
    raise ValueError(
        f"`sweep.temperatures` must be > 0, got {config.sweep.temperatures}.")
  models.check_name(config.student.model)
  models.check_name(config.teacher.model)
  _check_choice("nonfinite", config.nonfinite, NONFINITE_MODES)
  _check_optimizer("optimizer", config.optimizer)
  _check_optimizer("teacher.optimizer", config.teacher.optimizer)
  for name in ("num_epochs", "batch_size", "eval_batch_size",
               "log_every_steps", "checkpoint_every_epochs",
               "max_checkpoints"):
    if config[name] < 1:
      raise ValueError(f"`{name}` must be >= 1, got {config[name]}.")
  if config.steps_per_epoch < 0:
    raise ValueError(
        f"`steps_per_epoch` must be >= 0, got {config.steps_per_epoch}.")
  if config.teacher.num_teachers < 1:
    raise ValueError("`teacher.num_teachers` must be >= 1.")
  for name in ("pipeline", "compare"):
    if config[name].seeds < 1:
      raise ValueError(
          f"`{name}.seeds` must be >= 1, got {config[name].seeds}.")


# ---------------------------------------------------------------------------
# Optimisers.
# ---------------------------------------------------------------------------


def kernel_mask(params: Any) -> Any:
  """``True`` on the ``kernel`` leaves (convolutions and dense layers)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def learning_rate_schedule(
    cfg: ml_collections.ConfigDict, *, steps_per_epoch: int, num_epochs: int
) -> optax.Schedule:
  """The step -> learning rate function of an optimiser sub-config."""
  total = max(1, num_epochs * steps_per_epoch)
  warmup = int(cfg.warmup_epochs * steps_per_epoch)
  if cfg.schedule == "constant":
    main = optax.constant_schedule(cfg.learning_rate)
  elif cfg.schedule == "piecewise":
    main = optax.piecewise_constant_schedule(
        cfg.learning_rate,
        {max(1, int(e * steps_per_epoch) - warmup): cfg.decay_factor
         for e in cfg.decay_epochs})
  else:
    main = optax.cosine_decay_schedule(cfg.learning_rate,
                                       max(1, total - warmup))
  if warmup <= 0:
    return main
  return optax.join_schedules(
      [optax.linear_schedule(0.0, cfg.learning_rate, warmup), main],
      [warmup])


def make_optimizer(
    cfg: ml_collections.ConfigDict, *, steps_per_epoch: int, num_epochs: int
) -> optax.GradientTransformation:
  """SGD with momentum, Adam or AdamW, weight decay on kernels only."""
  schedule = learning_rate_schedule(cfg, steps_per_epoch=steps_per_epoch,
                                    num_epochs=num_epochs)
  parts = []
  if cfg.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  if cfg.name == "adamw":
    parts.append(optax.adamw(schedule, weight_decay=cfg.weight_decay,
                             mask=kernel_mask))
    return optax.chain(*parts)
  if cfg.weight_decay > 0:
    # Coupled L2 (PyTorch's `weight_decay`): added to the gradient first.
    parts.append(optax.add_decayed_weights(cfg.weight_decay,
                                           mask=kernel_mask))
  if cfg.name == "sgd":
    parts.append(optax.sgd(schedule, momentum=cfg.momentum or None,
                           nesterov=cfg.nesterov))
  else:
    parts.append(optax.adam(schedule))
  return optax.chain(*parts)
