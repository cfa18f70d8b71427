r"""Runs an experiment config: train one student, the pipeline, a comparison
of methods or a temperature sweep.

  python -m experiments.main --config=experiments/configs/mnist5k_default.py \
      --mode=pipeline --workdir=/tmp/kd/mnist5k

Modes: ``train`` (``experiments.train.train_and_evaluate``), ``pipeline``,
``compare`` and ``sweep`` (``experiments.pipeline``). Any config field can be
overridden: ``--config.num_epochs=5``; ``--config=...py:runlocal`` shrinks a
config to about a minute. This file is intentionally short: the logic lives
in libraries that the tests import.
"""

from __future__ import annotations

import logging
import shlex
import sys

from jaxkd import cpu  # pylint: disable=g-bad-import-order

# First, before anything starts a JAX backend: the measured XLA:CPU default
# (JAXKD_NO_CPU_FLAGS=1 opts out; see jaxkd/cpu.py).
cpu.use_fast_cpu_defaults()

# pylint: disable=g-import-not-at-top,g-bad-import-order
from absl import app
from absl import flags
from ml_collections import config_flags

from experiments import pipeline
from experiments import train
# pylint: enable=g-import-not-at-top,g-bad-import-order

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to an experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, logs and teachers.")
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "pipeline", "compare", "sweep"],
    "What to run.")
_RESULTS_DIR = flags.DEFINE_string(
    "results_dir", str(pipeline.DEFAULT_RESULTS_DIR),
    "Where pipeline/compare/sweep write <config name>.md and .json.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Checked here rather than with flags.mark_flags_as_required, whose
  # validators would fire in any program that imports this module and
  # parses its own flags.
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError("--config and --workdir are required.")
  for name in ("absl", "jax"):
    logging.getLogger(name).setLevel(logging.WARNING)
  config, workdir, mode = _CONFIG.value, _WORKDIR.value, _MODE.value
  command = "python -m experiments.main " + " ".join(
      shlex.quote(a) for a in sys.argv[1:])
  if mode == "train":
    result = train.train_and_evaluate(config, workdir)
    print({k: v for k, v in result.items() if k not in ("last", "teachers")})
  elif mode == "sweep":
    pipeline.run_sweep(config, workdir, command=command,
                       results_dir=_RESULTS_DIR.value)
  else:
    pipeline.run_methods(config, workdir, mode=mode, command=command,
                         results_dir=_RESULTS_DIR.value)


if __name__ == "__main__":
  app.run(main)
