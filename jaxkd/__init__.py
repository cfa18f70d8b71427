"""jaxkd: knowledge distillation for JAX and Flax.

Modules: ``losses`` (pure loss functions), ``schedules``, ``adaptors``,
``models`` (the model contract and bundled architectures), ``teachers``
(stacked teachers and how they run), ``objective`` (terms of a distillation
objective), ``sweep`` (vmapped hyper-parameter sweeps). The engine's entry
points are re-exported here and nowhere else.
"""

# First, before anything can start a JAX backend: the fast XLA:CPU default
# (see jaxkd/_cpu_flags.py; JAXKD_NO_CPU_FLAGS=1 opts out).
from jaxkd import _cpu_flags

_cpu_flags.apply_default_cpu_flags()

import importlib.metadata  # pylint: disable=g-import-not-at-top,g-bad-import-order

from jaxkd import adaptors as adaptors
from jaxkd import losses as losses
from jaxkd import models as models
from jaxkd import objective as objective
from jaxkd import schedules as schedules
from jaxkd import sweep as sweep
from jaxkd import teachers as teachers
from jaxkd.state import DistillState as DistillState
from jaxkd.train_step import Distillation as Distillation
from jaxkd.train_step import Views as Views
from jaxkd.train_step import make_eval_step as make_eval_step
from jaxkd.train_step import make_train_step as make_train_step

try:
  __version__ = importlib.metadata.version("jaxkd")
except importlib.metadata.PackageNotFoundError:  # Imported from a source tree.
  __version__ = "0.0.0+unknown"
