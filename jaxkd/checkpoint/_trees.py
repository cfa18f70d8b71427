"""Trees and JSON: what a checkpoint holds and how a target is described.

Private helpers of :mod:`jaxkd.checkpoint`.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath
import jax
import numpy as np

from jaxkd.state import DistillState

PyTree = Any

# The fields of a DistillState that a checkpoint holds. `teachers` are saved
# apart (save_teachers) and `hparams` are configuration: the driver sets them
# (from its schedules) on the freshly built state a run resumes into.
STATE_FIELDS = ("step", "params", "model_state", "opt_state", "rng")


def _as_path(directory: os.PathLike[str] | str) -> epath.Path:
  text = os.fspath(directory)
  if "://" not in text:
    text = os.path.abspath(text)
  return epath.Path(text)


def _key_name(key: Any) -> str:
  """One path entry as a string, whatever the container type.

  Orbax's metadata turns named tuples (optimiser states) into dicts and tuples
  into lists, so paths are compared on names and indices alone.
  """
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _path_str(path: Sequence[Any]) -> str:
  return "/".join(_key_name(k) for k in path) or "<root>"


def _is_key_array(leaf: Any) -> bool:
  dtype = getattr(leaf, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(
      dtype, jax.dtypes.prng_key
  )


def _default_sharding() -> jax.sharding.Sharding:
  return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _abstract_leaf(leaf: Any) -> jax.ShapeDtypeStruct:
  """Shape, dtype and sharding Orbax restores a leaf into.

  Typed PRNG keys are stored as their ``uint32`` key data (see
  :func:`_to_savable`). A leaf without a sharding (an ``eval_shape`` output,
  a NumPy array) is restored onto the first local device.
  """
  sharding = getattr(leaf, "sharding", None)
  if _is_key_array(leaf):
    data = jax.eval_shape(jax.random.key_data, leaf)
    shape, dtype = data.shape, data.dtype
  elif isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
    shape, dtype = leaf.shape, leaf.dtype
  else:
    array = np.asarray(leaf)
    shape, dtype = array.shape, array.dtype
  if sharding is None:
    sharding = _default_sharding()
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _to_savable(tree: PyTree) -> PyTree:
  """Typed PRNG keys become their key data; every other leaf is unchanged."""
  return jax.tree.map(
      lambda x: jax.random.key_data(x) if _is_key_array(x) else x, tree
  )


def _like_target(target: PyTree, restored: PyTree) -> PyTree:
  """Wraps restored key data back into keys where the target has keys."""

  def leaf(t, r):
    if not _is_key_array(t):
      return r
    if isinstance(t, jax.Array):
      impl = jax.random.key_impl(t)
    else:
      # An abstract key (``jax.eval_shape``): JAX has no public accessor for
      # the implementation of a key dtype.
      impl = t.dtype._impl  # pylint: disable=protected-access
    return jax.random.wrap_key_data(r, impl=impl)

  return jax.tree.map(leaf, target, restored)


def _student_tree(state: DistillState) -> dict[str, PyTree]:
  return {field: getattr(state, field) for field in STATE_FIELDS}


def _check_matches(
    saved_metadata: PyTree, abstract: PyTree, *, what: str
) -> None:
  """Raises unless the saved leaves have the target's paths and shapes.

  Dtypes may differ: restored arrays are cast to the target's dtypes.
  """
  if saved_metadata is None:
    raise ValueError(
        f"{what} is damaged: the arrays' metadata (_METADATA) is missing or"
        " unreadable."
    )
  saved = {
      _path_str(path): tuple(getattr(leaf, "shape", ()) or ())
      for path, leaf in jax.tree_util.tree_flatten_with_path(saved_metadata)[0]
  }
  wanted = {
      _path_str(path): tuple(leaf.shape)
      for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]
  }
  detail = None
  for path, shape in wanted.items():
    if path not in saved:
      detail = (
          f"the target's leaf {path} (shape {shape}) is missing from the"
          " checkpoint"
      )
      break
    if saved[path] != shape:
      detail = (
          f"leaf {path} has shape {saved[path]} in the checkpoint but shape"
          f" {shape} in the target"
      )
      break
  if detail is None:
    extra = [p for p in saved if p not in wanted]
    if extra:
      detail = (
          f"the checkpoint has a leaf {extra[0]} (shape {saved[extra[0]]})"
          " that the target lacks"
      )
  if detail is not None:
    raise ValueError(
        f"{what} does not match the target: {detail}. Was it saved from"
        " another model or objective?"
    )


def _json_default(value: Any) -> Any:
  """Arrays and NumPy scalars as Python numbers and lists."""
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    return np.asarray(jax.device_get(value)).tolist()
  raise TypeError(
      f"Object of type {type(value).__name__} is not JSON serializable."
  )


def _to_json(value: Any, *, name: str) -> Any:
  """``value`` as plain JSON types, or a TypeError naming ``name``."""
  try:
    return json.loads(json.dumps(value, default=_json_default))
  except (TypeError, ValueError) as e:
    raise TypeError(
        f"`{name}` must be JSON-serializable (dicts, lists, strings, numbers,"
        f" arrays), got {type(value).__name__}: {e}"
    ) from None


def _metrics_to_json(metrics: Mapping[str, Any] | None) -> dict | None:
  if metrics is None:
    return None
  if not isinstance(metrics, Mapping):
    raise TypeError(
        f"`metrics` must be a mapping of names to values, got"
        f" {type(metrics).__name__}."
    )
  return _to_json(dict(metrics), name="metrics")


def _encode_data_state(data_state: Any) -> dict:
  """Bytes (a grain iterator's state) are stored as base64 text."""
  if isinstance(data_state, (bytes, bytearray)):
    return {
        "kind": "bytes",
        "value": base64.b64encode(bytes(data_state)).decode("ascii"),
    }
  return {"kind": "json", "value": _to_json(data_state, name="data_state")}


def _decode_data_state(encoded: Mapping[str, Any]) -> Any:
  if encoded["kind"] == "bytes":
    return base64.b64decode(encoded["value"])
  return encoded["value"]


def _metric_value(metrics: Any, name: str) -> float | None:
  """The finite scalar ``metrics[name]``, or None."""
  if not isinstance(metrics, Mapping) or name not in metrics:
    return None
  try:
    value = float(metrics[name])
  except (TypeError, ValueError):
    return None
  return value if np.isfinite(value) else None


def _best_index(
    metrics_list: Sequence[Any], name: str, mode: str
) -> int | None:
  """Index of the best value of ``name`` (the latest among ties)."""
  best, best_value = None, None
  sign = 1.0 if mode == "max" else -1.0
  for index, metrics in enumerate(metrics_list):
    value = _metric_value(metrics, name)
    if value is None:
      continue
    if best_value is None or sign * value >= sign * best_value:
      best, best_value = index, value
  return best
