r"""The LM experiment's command line.

  python -m experiments.lm --config=experiments/configs/lm_stdlib.py \
      --workdir=runs/lm_stdlib [--publish]

``--config=...py:runlocal`` is the seconds-long smoke test the tests run;
``--publish`` also writes ``experiments/results/lm_stdlib.{md,json,png}``
(refused for ``:runlocal``).
"""

from __future__ import annotations

import shlex
import sys

from jaxkd import cpu  # pylint: disable=g-bad-import-order

cpu.use_fast_cpu_defaults()

# pylint: disable=g-import-not-at-top,g-bad-import-order
from absl import app
from absl import flags
from ml_collections import config_flags

from experiments.lm import report
from experiments.lm import runner
# pylint: enable=g-import-not-at-top,g-bad-import-order

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to the LM experiment config.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
_PUBLISH = flags.DEFINE_bool(
    "publish", False, "Also write experiments/results/lm_stdlib.*.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError("--config and --workdir are required.")
  if _PUBLISH.value and _CONFIG.value.runlocal:
    raise app.UsageError("A :runlocal run is a smoke test, never published.")
  command = "python -m experiments.lm " + " ".join(
      shlex.quote(a) for a in sys.argv[1:])
  result = runner.run(_CONFIG.value, _WORKDIR.value, command=command,
                      publish=_PUBLISH.value)
  print(report.render_markdown(result))


if __name__ == "__main__":
  app.run(main)
