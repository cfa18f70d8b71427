"""Reading one step back, checking it as it is read.

Private module of :mod:`jaxkd.checkpoint`.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, NamedTuple

from etils import epath
import jax
import orbax.checkpoint as ocp

from jaxkd.checkpoint import _integrity
from jaxkd.checkpoint._integrity import CorruptCheckpointError
from jaxkd.checkpoint._integrity import Damage
from jaxkd.checkpoint._trees import _abstract_leaf
from jaxkd.checkpoint._trees import _check_matches
from jaxkd.checkpoint._trees import _decode_data_state
from jaxkd.checkpoint._trees import _like_target
from jaxkd.checkpoint._trees import _path_str
from jaxkd.checkpoint._trees import _student_tree
from jaxkd.state import DistillState

logger = logging.getLogger("jaxkd.checkpoint")

STATE_ITEM = "state"
EXTRA_ITEM = "extra"


class Restored(NamedTuple):
  """What :meth:`Checkpointer.restore` returns.

  Unpacks as ``state, data_state, metrics = ckpt.restore(target)``.

  Attributes:
    state: ``target`` with the saved student arrays.
    data_state: The input pipeline's position as passed to
      :meth:`Checkpointer.save` (``None`` if none was).
    metrics: The metrics saved with the step (``None`` if none were).

  .. versionadded:: 0.1.0
  """

  state: DistillState
  data_state: Any
  metrics: dict | None

  @property
  def step(self) -> int:
    """The restored step (``state.step``)."""
    return int(jax.device_get(self.state.step))


def read_extra(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """The step's JSON item (quiet; Orbax's errors propagate)."""
  with _integrity.quiet_orbax():
    return manager.restore(step, args=ocp.args.Composite(**{
        EXTRA_ITEM: ocp.args.JsonRestore()}))[EXTRA_ITEM]


def read_step(
    manager: ocp.CheckpointManager,
    target: DistillState,
    step: int,
    *,
    step_dir: epath.Path,
    what: str,
) -> Restored:
  """``(state, data_state, metrics)`` of ``step``, checked.

  In order: the file manifest (before Orbax reads anything), the JSON item
  and its checksum, the arrays' metadata against ``target`` (a mismatch is
  the caller's ``ValueError``, not damage), the arrays in their saved dtypes
  against their checksums, then the cast to ``target``'s dtypes.

  Raises:
    Damage: Saying what is wrong with the step.
    ValueError: If the saved tree is not ``target``'s.
  """
  _integrity.check_files(step_dir)
  try:
    extra = read_extra(manager, step)
    data_state = _decode_data_state(extra["data_state"])
    metrics = extra["metrics"]
    checksums = extra.get("checksums")
  except Exception as e:  # Missing, torn or edited JSON.
    raise Damage("extra/metadata is unreadable"
                 f" ({_integrity.first_line(e)})") from None
  if checksums is not None and checksums.get("extra") != (
      _integrity.json_digest({"data_state": extra["data_state"],
                              "metrics": metrics})):
    raise Damage("extra/metadata does not match its checksum")
  try:
    with _integrity.quiet_orbax():
      metadata = manager.item_metadata(step)[STATE_ITEM]
  except Exception as e:
    raise Damage("the arrays' metadata is unreadable"
                 f" ({_integrity.first_line(e)})") from None
  if metadata is None:
    raise Damage("state/_METADATA is missing or unreadable")
  target_tree = _student_tree(target)
  abstract = jax.tree.map(_abstract_leaf, target_tree)
  _check_matches(metadata, abstract, what=what)
  # Read in the saved dtypes (the checksums are of them), cast after.
  saved_dtypes = {
      _path_str(path): getattr(leaf, "dtype", None)
      for path, leaf in jax.tree_util.tree_flatten_with_path(metadata)[0]}
  as_saved = jax.tree_util.tree_map_with_path(
      lambda path, a: jax.ShapeDtypeStruct(
          a.shape, saved_dtypes.get(_path_str(path)) or a.dtype,
          sharding=a.sharding),
      abstract)
  try:
    with _integrity.quiet_orbax():
      arrays = manager.restore(step, args=ocp.args.Composite(**{
          STATE_ITEM: ocp.args.StandardRestore(as_saved)}))[STATE_ITEM]
  except Exception as e:
    raise Damage("Orbax could not read the arrays"
                 f" ({_integrity.first_line(e)})") from None
  if checksums is not None:
    _integrity.check_tree(arrays, checksums["leaves"])
  arrays = jax.tree.map(
      lambda x, a: x if x.dtype == a.dtype else x.astype(a.dtype),
      arrays, abstract)
  state = target.replace(**_like_target(target_tree, arrays))
  return Restored(state, data_state, metrics)


def read_newest_intact(
    manager: ocp.CheckpointManager,
    target: DistillState,
    steps: list[int],
    *,
    directory: epath.Path,
    forget: Callable[[int], Any],
) -> Restored:
  """The newest intact one of ``steps``; damaged ones are renamed aside.

  Each damaged step directory becomes ``<step>.corrupt-<n>`` (no file is
  deleted), with one warning; ``forget(step)`` drops what the caller knows
  of it.

  Raises:
    CorruptCheckpointError: If no step is intact (listing what is wrong
      with each).
  """
  damaged = []
  for candidate in reversed(steps):
    step_dir = directory / str(candidate)
    try:
      return read_step(manager, target, candidate, step_dir=step_dir,
                       what=f"Checkpoint step {candidate} in {directory}")
    except Damage as e:
      moved = _integrity.quarantine(step_dir)
      manager.reload()
      forget(candidate)
      damaged.append(f"step {candidate}: {e} (moved to {moved.name})")
      logger.warning(
          "Checkpoint step %d in %s is damaged: %s; renamed it to %s"
          " (files kept)%s.", candidate, step_dir, e, moved.name,
          "; trying the previous step" if candidate != steps[0] else "")
  raise CorruptCheckpointError(
      f"No intact checkpoint in {directory}: " + "; ".join(damaged)
      + ". The damaged steps were renamed aside, not deleted; a new run"
        " in this directory starts from scratch.")
