"""Distillation methods built on the one engine.

* ``adversarial``: :class:`~jaxkd.methods.adversarial.AdversarialTerm`, an
  objective term with a discriminator trained by the term's ``update`` hook;
* ``mutual``: deep mutual learning as a :class:`jaxkd.Distillation` whose
  student is a group of peers;
* ``data_free``: a generator trained against the teachers, and the engine's
  own step distilling the student on what it makes;
* ``lm``: language-model distillation: token-normalised objective terms
  (next-token cross-entropy, per-token divergences, the fused loss, sparse
  cached teachers) and sequence-level and on-policy (GKD) data.

Each is imported on first use (``jaxkd.methods.mutual``).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["adversarial", "data_free", "lm", "mutual"]


def __getattr__(name: str) -> Any:
  if name in __all__:
    return importlib.import_module(f"jaxkd.methods.{name}")
  raise AttributeError(f"module 'jaxkd.methods' has no attribute {name!r}")
