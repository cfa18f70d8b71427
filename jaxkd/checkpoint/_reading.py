"""Reading one step back, checking it as it is read.

Private module of :mod:`jaxkd.checkpoint`.
"""

from __future__ import annotations

from typing import Any

from etils import epath
import jax
import orbax.checkpoint as ocp

from jaxkd.checkpoint import _integrity
from jaxkd.checkpoint._integrity import Damage
from jaxkd.checkpoint._trees import _abstract_leaf
from jaxkd.checkpoint._trees import _check_matches
from jaxkd.checkpoint._trees import _decode_data_state
from jaxkd.checkpoint._trees import _like_target
from jaxkd.checkpoint._trees import _path_str
from jaxkd.checkpoint._trees import _student_tree
from jaxkd.state import DistillState

STATE_ITEM = "state"
EXTRA_ITEM = "extra"


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
) -> tuple[DistillState, Any, dict | None]:
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
  return state, data_state, metrics
