"""jaxkd: knowledge distillation for JAX and Flax.

Modules, each imported on first use (``import jaxkd.losses`` imports jax and
nothing heavier; no import changes the environment):

* ``losses``: pure loss functions of arrays;
* ``lm``: what language models need around them (token means, next-token
  alignment, the fused vocabulary-tiled loss, the teacher cache, a sampler);
* ``schedules``: what optax's schedules lack (adaptive weights, grids);
* ``models``: the model contract and the bundled architectures;
* ``objective``: the terms of a distillation objective;
* ``teachers``: stacked teachers and how they run;
* ``engine`` entry points, re-exported here: :class:`Distillation`,
  :class:`DistillState`, :func:`make_train_step` (``train_step``), and
  :func:`make_eval_step`, :func:`evaluate`, :func:`summarize`
  (``evaluation``);
* ``methods``: distillation methods built on the engine (adversarial,
  mutual, data-free);
* ``sharding``, ``distributed`` (multi-process runs whose survivors exit
  cleanly when a peer dies), ``checkpoint``, ``data``, ``sweep``,
  ``folding``, ``adaptors``, ``cpu``, ``measure``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any

_SUBMODULES = (
    "adaptors",
    "batch_checks",
    "checkpoint",
    "cpu",
    "data",
    "distributed",
    "evaluation",
    "folding",
    "lm",
    "losses",
    "measure",
    "methods",
    "models",
    "objective",
    "schedules",
    "sharding",
    "state",
    "sweep",
    "teachers",
    "train_step",
)

# Public name -> the module that defines it.
_ENGINE = {
    "Distillation": "jaxkd.train_step",
    "Views": "jaxkd.train_step",
    "make_train_step": "jaxkd.train_step",
    "make_eval_step": "jaxkd.evaluation",
    "evaluate": "jaxkd.evaluation",
    "summarize": "jaxkd.evaluation",
    "DistillState": "jaxkd.state",
}

__all__ = sorted(_SUBMODULES + tuple(_ENGINE))

try:
  __version__ = importlib.metadata.version("jaxkd")
except importlib.metadata.PackageNotFoundError:  # Imported from a source tree.
  __version__ = "0.0.0+unknown"


def __getattr__(name: str) -> Any:
  if name in _SUBMODULES:
    return importlib.import_module(f"jaxkd.{name}")
  if name in _ENGINE:
    return getattr(importlib.import_module(_ENGINE[name]), name)
  raise AttributeError(f"module 'jaxkd' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
