"""Writing one step: what goes into it, its file manifest, its failures.

Private module of :mod:`jaxkd.checkpoint`.
"""

from __future__ import annotations

import errno as errno_lib
import logging
from collections.abc import Iterable
from typing import Any

from etils import epath
import jax

from jaxkd.checkpoint import _integrity
from jaxkd.checkpoint._guards import CheckpointWriteError
from jaxkd.checkpoint._trees import PyTree
from jaxkd.checkpoint._trees import _student_tree
from jaxkd.checkpoint._trees import _to_savable
from jaxkd.state import DistillState

logger = logging.getLogger("jaxkd.checkpoint")

# 2: the extra item holds checksums (format 1 steps restore unchecked).
EXTRA_FORMAT = 2


def step_payload(
    state: DistillState, metrics_json: Any, encoded_data_state: Any
) -> tuple[PyTree, dict[str, Any]]:
  """``(arrays, extra)`` of one step: the student's tree and the JSON item.

  The JSON item holds the data state, the metrics and the checksums of
  both and of every array (computed here, from one host copy).
  """
  tree = _to_savable(_student_tree(state))
  extra = {
      "format": EXTRA_FORMAT,
      "data_state": encoded_data_state,
      "metrics": metrics_json,
      "checksums": {
          "algorithm": _integrity.ALGORITHM,
          "leaves": _integrity.tree_digests(tree),
          "extra": _integrity.json_digest(
              {"data_state": encoded_data_state, "metrics": metrics_json}),
      },
  }
  return tree, extra


def write_error(
    error: BaseException, step: int | None, target: epath.Path,
    saved_steps: list[int],
) -> CheckpointWriteError:
  """One line naming the step, where it went, why, and what is still safe."""
  reason = getattr(error, "strerror", None) or _integrity.first_line(error)
  where = getattr(error, "filename", None)
  return CheckpointWriteError(
      getattr(error, "errno", None) or errno_lib.EIO,
      f"Could not write checkpoint step {step} to {target}: {reason}"
      f"{f' ({where})' if where else ''}. Nothing older was lost; saved"
      f" steps: {saved_steps}.",
  )


def seal_steps(step_dirs: Iterable[tuple[int, epath.Path]]) -> None:
  """Writes the file manifest of each finished ``(step, directory)``.

  A manifest that cannot be written is logged, not raised: the step itself
  is whole, and restore then checks it by its arrays' checksums only.
  """
  for step, step_dir in step_dirs:
    try:
      # One writer: in a multi-process run every process sees the same
      # directory, and two writers would race on the manifest's temp file.
      if step_dir.exists() and jax.process_index() == 0:
        _integrity.seal(step_dir)
    except OSError as e:
      logger.warning(
          "Could not write the file manifest of checkpoint step %d in %s"
          " (%s); restore checks it by its arrays' checksums only.",
          step, step_dir, e.strerror or e)
