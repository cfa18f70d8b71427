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

import contextlib
import logging
import pathlib
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
from experiments import report
from experiments import train
# pylint: enable=g-import-not-at-top,g-bad-import-order

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to an experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, logs and teachers.")
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "pipeline", "compare", "sweep"],
    "What to run.")
_PUBLISH = flags.DEFINE_bool(
    "publish", False,
    "Also write the pipeline/compare/sweep tables to experiments/results/"
    " (the committed results the README shows). Without it, every output"
    " stays under --workdir. Refused for :runlocal configs.")
_LIST_CONFIG = flags.DEFINE_bool(
    "list_config", False,
    "Print every field of --config with its value and exit.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Checked here rather than with flags.mark_flags_as_required, whose
  # validators would fire in any program that imports this module and
  # parses its own flags.
  if _CONFIG.value is not None and _LIST_CONFIG.value:
    print(train.describe_config(_CONFIG.value))
    return
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError("--config and --workdir are required.")
  for name in ("absl", "jax"):
    logging.getLogger(name).setLevel(logging.WARNING)
  config, workdir, mode = _CONFIG.value, _WORKDIR.value, _MODE.value
  command = "python -m experiments.main " + " ".join(
      shlex.quote(a) for a in sys.argv[1:])
  results_dir = None
  if _PUBLISH.value:
    if config.get("runlocal", False):
      raise app.UsageError(
          "--publish writes the committed results of the real config; a"
          " :runlocal run is a smoke test and is never published.")
    results_dir = report.DEFAULT_RESULTS_DIR
  with _data_for(config):
    _run(config, workdir, mode, command, results_dir)
  size = sum(f.stat().st_size for f in pathlib.Path(workdir).rglob("*")
             if f.is_file())
  print(f"Wrote {size / 1e6:.1f} MB under {workdir} (checkpoints: the last"
        f" {config.max_checkpoints} and the best of each run, TensorBoard"
        " events, metrics.jsonl, curves)"
        + ("; results published to experiments/results/."
           if results_dir is not None else "."))


def _data_for(config):
  """Mock TFDS data for a :runlocal config of a data set not on disk."""
  if not config.get("mock_data", 0):
    return contextlib.nullcontext()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  print(f"MOCK DATA: {config.dataset} is replaced by {config.mock_data}"
        " random examples (tfds.testing.mock_data); a smoke test, not a"
        " result.")
  return tfds.testing.mock_data(
      num_examples=int(config.mock_data),
      policy=tfds.testing.MockPolicy.USE_CODE)


def _run(config, workdir, mode, command, results_dir):
  if mode == "train":
    result = train.train_and_evaluate(config, workdir)
    print({k: v for k, v in result.items() if k not in ("last", "teachers")})
  elif mode == "sweep":
    pipeline.run_sweep(config, workdir, command=command,
                       results_dir=results_dir)
  else:
    pipeline.run_methods(config, workdir, mode=mode, command=command,
                         results_dir=results_dir)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a mistyped config field in one line."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as error:
    override = next((a for a in argv[1:] if a.startswith("--config.")), "")
    names = [a.split("=", 1)[0] for a in argv[1:]
             if a.startswith("--config.")]
    hint = " ".join(str(error).encode().decode("unicode_escape").replace(
        "'", " ").split())
    print(
        f"experiments.main: unknown config field in {', '.join(names) or override}:"
        f" {hint} (--list_config prints every field).",
        file=sys.stderr,
    )
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
