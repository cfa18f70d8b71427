"""Checkpoints of a distillation run, on Orbax.

:class:`Checkpointer` saves the student's side of a
:class:`~jaxkd.state.DistillState` (``step``, ``params`` with the terms'
adaptors and heads, ``model_state`` with BatchNorm statistics and CRD queues,
``opt_state`` and ``rng``), the input pipeline's position and the metrics of
the step, one directory per step, through an
``orbax.checkpoint.CheckpointManager``. The teachers are not part of it: they
are frozen, usually much larger than the student, and the same for every
step, so :func:`save_teachers` writes them once and :func:`load_teachers`
reads them back by name.

Layout of ``directory``::

  <step>/state       the student's arrays (Orbax StandardSave)
  <step>/extra       JSON: the data state and the metrics
  <step>/metrics     JSON: the metrics again, for Orbax's bookkeeping
                     (only with ``best_metric``)
  teachers/<name>/   one directory per saved teacher group

Example::

  with Checkpointer(workdir, max_to_keep=3, best_metric="accuracy") as ckpt:
    if ckpt.latest_step() is not None:
      state, data_state, _ = ckpt.restore(state)
      iterator.set_state(data_state)
    for batch in iterator:
      state, metrics = step(state, batch)
      ckpt.save(state, metrics=metrics, data_state=iterator.get_state())
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxkd.state import DistillState
from jaxkd.teachers import TeacherVariables

PyTree = Any

logger = logging.getLogger(__name__)

# The fields of a DistillState that a checkpoint holds. `teachers` are saved
# apart (save_teachers) and `hparams` are configuration: the driver sets them
# (from its schedules) on the freshly built state a run resumes into.
STATE_FIELDS = ("step", "params", "model_state", "opt_state", "rng")

_STATE_ITEM = "state"
_EXTRA_ITEM = "extra"
_EXTRA_FORMAT = 1
_BEST_MODES = ("max", "min")
_TEACHERS_DIR = "teachers"
_NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


# ---------------------------------------------------------------------------
# Trees: what is saved, and how a target is described to Orbax.
# ---------------------------------------------------------------------------


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

  Dtypes may differ: Orbax casts to the target's dtype on restore.
  """
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


# ---------------------------------------------------------------------------
# JSON parts: metrics and the data state.
# ---------------------------------------------------------------------------


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


def _preservation_policy(
    n: int | None, metric_fn, mode: str
) -> ocp.checkpoint_managers.PreservationPolicy:
  """The last ``n`` steps, and with ``metric_fn`` the best one too.

  ``metric_fn`` gives every step a number, the worst possible one to a step
  without a finite value of the metric (:meth:`Checkpointer._orbax_metric`).
  ``BestN`` sorts stably and keeps the last of the sorted steps, so among
  ties the latest step wins. A step without the metric can thus win only
  when no step has it; every step :meth:`Checkpointer.save` writes carries
  Orbax's metrics item, so the winner is then the latest step, which
  ``LatestN`` keeps anyway: no step is kept for being "best" without a
  finite value.
  """
  policies = [ocp.checkpoint_managers.LatestN(n=n)]
  if metric_fn is not None:
    policies.append(ocp.checkpoint_managers.BestN(
        n=1, get_metric_fn=metric_fn, reverse=mode == "min",
        keep_checkpoints_without_metrics=False))
  return ocp.checkpoint_managers.AnyPreservationPolicy(policies)


# ---------------------------------------------------------------------------
# The guard against saving a diverged state.
# ---------------------------------------------------------------------------


@jax.jit
def _finite_flags(leaves: list[jax.Array]) -> jax.Array:
  return jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves])


def _nonfinite_param(params: PyTree) -> str | None:
  """Path of the first floating parameter with a NaN or an infinity."""
  leaves = [
      (path, leaf)
      for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
      if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
  ]
  if not leaves:
    return None
  flags = np.asarray(jax.device_get(_finite_flags([x for _, x in leaves])))
  for (path, _), finite in zip(leaves, flags):
    if not finite:
      return _path_str(path)
  return None


def _refusal(state: DistillState, metrics: dict | None) -> str | None:
  """Why ``state`` must not be saved, or None."""
  if metrics is not None and "nonfinite" in metrics:
    flagged = np.asarray(metrics["nonfinite"], dtype=np.float64)
    if np.any(flagged > 0) or not np.all(np.isfinite(flagged)):
      return f"metrics['nonfinite'] is {metrics['nonfinite']}"
  path = _nonfinite_param(state.params)
  if path is not None:
    return f"parameter params/{path} is not finite"
  return None


# ---------------------------------------------------------------------------
# The checkpointer.
# ---------------------------------------------------------------------------


def _as_path(directory: os.PathLike[str] | str) -> epath.Path:
  text = os.fspath(directory)
  if "://" not in text:
    text = os.path.abspath(text)
  return epath.Path(text)


class Checkpointer:
  """Saves and restores the student's side of a distillation run.

  A thin layer over ``orbax.checkpoint.CheckpointManager`` (asynchronous
  saves: :meth:`save` returns once the arrays are copied off the devices, so
  the train step may donate them right after, and the files are written in
  the background).

  Which checkpoints are kept: the last ``max_to_keep`` steps, and, with
  ``best_metric``, also the one step with the best finite value of
  ``metrics[best_metric]`` among every step saved so far (the latest of
  ties; the best step is never deleted, so it stays the best of all). So at
  most ``max_to_keep + 1`` steps are on disk. A step whose metrics lack
  ``best_metric`` (or hold NaN there) is kept only while it is among the
  last ``max_to_keep``; it is never "best". This is Orbax's
  ``AnyPreservationPolicy([LatestN(max_to_keep), BestN(n=1)])``. (Orbax's
  ``best_fn`` with ``max_to_keep`` alone would keep the best
  ``max_to_keep`` steps and drop recent ones, which a resumed run needs.)

  Args:
    directory: Where the step directories go (created if missing).
    max_to_keep: How many of the latest steps are kept (``None``: all).
    best_metric: The name of a scalar in the metrics passed to :meth:`save`
      by which the best step is kept and reported by :meth:`best_step`.
    best_mode: ``"max"`` (accuracy) or ``"min"`` (a loss).
    save_interval_steps: :meth:`save` writes only steps that are multiples
      of this (and the first step saved into an empty directory), and only
      steps after the latest one on disk, unless ``force=True``.

  .. versionadded:: 0.1.0
  """

  def __init__(
      self,
      directory: os.PathLike[str] | str,
      *,
      max_to_keep: int | None = 3,
      best_metric: str | None = None,
      best_mode: str = "max",
      save_interval_steps: int = 1,
  ):
    if max_to_keep is not None and (
        isinstance(max_to_keep, bool) or int(max_to_keep) < 1
    ):
      raise ValueError(
          f"`max_to_keep` must be None or an integer >= 1, got {max_to_keep!r}."
      )
    if best_mode not in _BEST_MODES:
      raise ValueError(
          f"`best_mode` must be one of {_BEST_MODES}, got {best_mode!r}."
      )
    if best_metric is not None and (
        not isinstance(best_metric, str) or not best_metric
    ):
      raise ValueError(
          f"`best_metric` must be None or a metric name, got {best_metric!r}."
      )
    if isinstance(save_interval_steps, bool) or int(save_interval_steps) < 1:
      raise ValueError(
          "`save_interval_steps` must be an integer >= 1, got"
          f" {save_interval_steps!r}."
      )
    self._directory = _as_path(directory)
    self._best_metric = best_metric
    self._best_mode = best_mode
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=int(save_interval_steps),
        # Orbax writes (and reads back for the policy) the metrics only when
        # `best_fn` is set; with a preservation policy it ranks nothing else.
        best_fn=self._orbax_metric if best_metric is not None else None,
        best_mode=best_mode,
        preservation_policy=_preservation_policy(
            None if max_to_keep is None else int(max_to_keep),
            self._orbax_metric if best_metric is not None else None,
            best_mode),
        create=True,
    )
    self._manager = ocp.CheckpointManager(
        self._directory,
        options=options,
        item_handlers={
            _STATE_ITEM: ocp.StandardCheckpointHandler(),
            _EXTRA_ITEM: ocp.JsonCheckpointHandler(),
        },
    )
    # step -> metrics (JSON) of the steps seen by this object.
    self._metrics_cache: dict[int, dict | None] = {}

  @property
  def directory(self) -> epath.Path:
    return self._directory

  def _orbax_metric(self, metrics: Any) -> float:
    """The best metric of one step for Orbax's ranking; the worst if none."""
    value = _metric_value(metrics, self._best_metric)
    if value is None:
      return -np.inf if self._best_mode == "max" else np.inf
    return value

  def __repr__(self) -> str:
    return (
        f"Checkpointer({os.fspath(self._directory)!r},"
        f" steps={self.all_steps()})"
    )

  # -- Saving --------------------------------------------------------------

  def save(
      self,
      state: DistillState,
      *,
      metrics: Mapping[str, Any] | None = None,
      data_state: Any = None,
      force: bool = False,
  ) -> bool:
    """Saves ``state`` at step ``state.step``, unless it must not be saved.

    Nothing is written (and a warning is logged; no exception is raised, so
    a long run is never stopped by it) when a floating leaf of
    ``state.params`` is NaN or infinite, or ``metrics["nonfinite"] > 0`` (the
    train step's flag of a non-finite loss or gradient). The last good
    checkpoint then stays the latest. A step already on disk is never
    overwritten.

    Args:
      state: The state; its ``teachers`` and ``hparams`` are not saved.
      metrics: Metrics of the step (arrays or numbers, nested dicts allowed),
        stored as JSON; ranked by ``best_metric``.
      data_state: The input pipeline's position: a JSON-serializable value
        (a dict, say) or ``bytes`` (a grain ``DataLoader`` iterator's state).
        Restored as saved (a tuple comes back as a list).
      force: Save even if the step is not a multiple of
        ``save_interval_steps`` or not after the latest saved step (say at
        the end of a run). Never overwrites a saved step.

    Returns:
      Whether a checkpoint was saved.

    Raises:
      TypeError: If ``metrics`` or ``data_state`` is not JSON-serializable
        (checked before anything is written).
    """
    step = int(jax.device_get(state.step))
    if step in self._manager.all_steps():
      logger.warning(
          "Not saving step %d: a checkpoint of this step already exists in"
          " %s (checkpoints are never overwritten).",
          step,
          self._directory,
      )
      return False
    if not force and not self._manager.should_save(step):
      return False
    metrics_json = _metrics_to_json(metrics)
    extra = {
        "format": _EXTRA_FORMAT,
        "data_state": _encode_data_state(data_state),
        "metrics": metrics_json,
    }
    reason = _refusal(state, metrics_json)
    if reason is not None:
      logger.warning(
          "Not saving step %d: %s. The latest checkpoint (step %s) is kept.",
          step,
          reason,
          self._manager.latest_step(),
      )
      return False
    tree = _to_savable(_student_tree(state))
    saved = self._manager.save(
        step,
        args=ocp.args.Composite(**{
            _STATE_ITEM: ocp.args.StandardSave(tree),
            _EXTRA_ITEM: ocp.args.JsonSave(extra),
        }),
        metrics=(
            (metrics_json or {}) if self._best_metric is not None else None
        ),
        force=force,
    )
    if saved:
      self._metrics_cache[step] = metrics_json
    return bool(saved)

  # -- Restoring -----------------------------------------------------------

  def _resolve_step(self, step: int | None) -> int:
    self._manager.wait_until_finished()
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise ValueError(f"No checkpoint to restore in {self._directory}.")
      return steps[-1]
    if int(step) not in steps:
      raise ValueError(
          f"No checkpoint of step {step} in {self._directory}; saved steps:"
          f" {steps}."
      )
    return int(step)

  def restore(
      self, target: DistillState, *, step: int | None = None
  ) -> tuple[DistillState, Any, dict | None]:
    """Restores a step into the structure and placement of ``target``.

    Every restored array gets the shape, dtype and sharding of the
    corresponding leaf of ``target``: a freshly initialised state, or
    ``jax.eval_shape`` of one with shardings attached (leaves without a
    sharding go to the first local device). A checkpoint saved on one device
    count is thus restored onto another by giving ``target`` the new
    shardings. ``target.teachers`` and ``target.hparams`` are returned as
    they are.

    The restored arrays are committed to their shardings. ``jax.jit`` keys
    its cache on committedness too, so a step compiled for the uncommitted
    arrays of a fresh ``init`` compiles once more for a state restored in
    the same process.

    Args:
      target: A state of the same model, objective and optimiser.
      step: The step to restore; the latest by default.

    Returns:
      ``(state, data_state, metrics)``: the data state and metrics as passed
      to :meth:`save` (``None`` where none were).

    Raises:
      ValueError: If there is no such step, or the checkpoint's tree differs
        from ``target``'s (the message names the first differing leaf and
        both shapes); checked on the saved metadata before anything is read.
    """
    step = self._resolve_step(step)
    target_tree = _student_tree(target)
    abstract = jax.tree.map(_abstract_leaf, target_tree)
    metadata = self._manager.item_metadata(step)[_STATE_ITEM]
    _check_matches(
        metadata,
        abstract,
        what=f"Checkpoint step {step} in {self._directory}",
    )
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(**{
            _STATE_ITEM: ocp.args.StandardRestore(abstract),
            _EXTRA_ITEM: ocp.args.JsonRestore(),
        }),
    )
    tree = _like_target(target_tree, restored[_STATE_ITEM])
    extra = restored[_EXTRA_ITEM]
    state = target.replace(**tree)
    return state, _decode_data_state(extra["data_state"]), extra["metrics"]

  # -- Queries -------------------------------------------------------------

  def latest_step(self) -> int | None:
    """The latest saved step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Every step on disk, in increasing order."""
    return sorted(self._manager.all_steps())

  def metrics(self, step: int) -> dict | None:
    """The metrics saved with ``step`` (None if it had none)."""
    step = self._resolve_step(step)
    if step not in self._metrics_cache:
      extra = self._manager.restore(
          step, args=ocp.args.Composite(**{_EXTRA_ITEM: ocp.args.JsonRestore()})
      )[_EXTRA_ITEM]
      self._metrics_cache[step] = extra["metrics"]
    return self._metrics_cache[step]

  def best_step(self) -> int | None:
    """The kept step with the best ``best_metric`` (latest among ties).

    None without ``best_metric``, or when no kept step has a finite value of
    it.
    """
    if self._best_metric is None:
      return None
    steps = self.all_steps()
    index = _best_index(
        [self.metrics(s) for s in steps], self._best_metric, self._best_mode
    )
    return None if index is None else steps[index]

  # -- Lifetime ------------------------------------------------------------

  def wait_until_finished(self) -> None:
    """Blocks until every pending save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases Orbax's resources."""
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


# ---------------------------------------------------------------------------
# Teachers: saved once, loaded by name.
# ---------------------------------------------------------------------------


def _check_name(name: Any) -> str:
  if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name):
    raise ValueError(
        "`name` must be a non-empty string of letters, digits, '_', '-' and"
        f" '.' (not starting with '.' or '-'), got {name!r}."
    )
  return name


def saved_teacher_names(directory: os.PathLike[str] | str) -> list[str]:
  """The names of the teacher groups saved under ``directory/teachers``.

  .. versionadded:: 0.1.0
  """
  root = _as_path(directory) / _TEACHERS_DIR
  if not root.exists():
    return []
  return sorted(
      p.name
      for p in root.iterdir()
      if p.is_dir()
      and _NAME_PATTERN.fullmatch(p.name)
      and ocp.utils.is_checkpoint_finalized(p)
  )


def _teacher_tree(variables: TeacherVariables) -> dict[str, PyTree]:
  return {"params": variables.params, "state": variables.state}


def save_teachers(
    directory: os.PathLike[str] | str,
    name: str,
    variables: TeacherVariables,
    *,
    overwrite: bool = False,
) -> epath.Path:
  """Saves a teacher group's stacked arrays once, under a name.

  Args:
    directory: The run's (or a shared) checkpoint directory; the teachers go
      to ``directory/teachers/<name>``.
    name: The group's name (letters, digits, ``_``, ``-``, ``.``).
    variables: The group's :class:`~jaxkd.teachers.TeacherVariables`.
    overwrite: Replace teachers already saved under ``name``.

  Returns:
    The directory written.

  Raises:
    ValueError: On a bad name, or when ``name`` is saved already and
      ``overwrite`` is False.

  .. versionadded:: 0.1.0
  """
  name = _check_name(name)
  if not isinstance(variables, TeacherVariables):
    raise TypeError(
        "`variables` must be a TeacherVariables, got"
        f" {type(variables).__name__}."
    )
  path = _as_path(directory) / _TEACHERS_DIR / name
  if path.exists() and not overwrite:
    raise ValueError(
        f"Teachers {name!r} are already saved in {path}; pass"
        " `overwrite=True` to replace them."
    )
  with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
    checkpointer.save(
        path,
        args=ocp.args.StandardSave(_to_savable(_teacher_tree(variables))),
        force=overwrite,
    )
  return path


def load_teachers(
    directory: os.PathLike[str] | str,
    name: str,
    *,
    like: TeacherVariables | None = None,
) -> TeacherVariables:
  """Loads a teacher group saved by :func:`save_teachers`.

  Args:
    directory: The directory given to :func:`save_teachers`.
    name: The group's name.
    like: Optional :class:`~jaxkd.teachers.TeacherVariables` (arrays or
      ``jax.ShapeDtypeStruct`` leaves with shardings) giving the tree types,
      dtypes and shardings to load into, e.g. to shard the teacher axis over
      a mesh. Without it the arrays come back as plain nested dicts with
      their saved dtypes, on the saved placement.

  Returns:
    The group's :class:`~jaxkd.teachers.TeacherVariables`.

  Raises:
    ValueError: If no teachers are saved under ``name`` (the message lists
      the saved names), or ``like`` differs from them in structure or shapes.

  Examples:
    >>> import tempfile
    >>> import jax.numpy as jnp
    >>> from jaxkd import checkpoint, teachers
    >>> variables = teachers.TeacherVariables(
    ...     params={"w": jnp.ones((4, 3))}, state={})
    >>> with tempfile.TemporaryDirectory() as workdir:
    ...   _ = checkpoint.save_teachers(workdir, "linear", variables)
    ...   print(checkpoint.saved_teacher_names(workdir))
    ...   loaded = checkpoint.load_teachers(workdir, "linear")
    ['linear']
    >>> print(loaded.params["w"].shape, loaded.state)
    (4, 3) {}

  .. versionadded:: 0.1.0
  """
  name = _check_name(name)
  names = saved_teacher_names(directory)
  if name not in names:
    listing = ", ".join(map(repr, names)) if names else "none"
    raise ValueError(
        f"No teachers named {name!r} in {_as_path(directory) / _TEACHERS_DIR};"
        f" saved names: {listing}."
    )
  path = _as_path(directory) / _TEACHERS_DIR / name
  with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
    if like is None:
      restored = checkpointer.restore(path, args=ocp.args.StandardRestore())
      return TeacherVariables(
          params=restored["params"], state=restored.get("state") or {}
      )
    target = _teacher_tree(like)
    abstract = jax.tree.map(_abstract_leaf, target)
    _check_matches(
        checkpointer.metadata(path).item_metadata,
        abstract,
        what=f"Teachers {name!r} in {path}",
    )
    restored = checkpointer.restore(
        path, args=ocp.args.StandardRestore(abstract)
    )
  tree = _like_target(target, restored)
  return TeacherVariables(params=tree["params"], state=tree["state"])
