"""The step checkpoints of a run: :class:`Checkpointer`.

Private module of :mod:`jaxkd.checkpoint` (see its docstring for the
layout on disk).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath
import jax
import orbax.checkpoint as ocp

from jaxkd.checkpoint import _integrity
from jaxkd.checkpoint import _reading
from jaxkd.checkpoint import _run_config
from jaxkd.checkpoint import _writing
from jaxkd.checkpoint._guards import _hold_orbax_errors
from jaxkd.checkpoint._guards import _manager_options
from jaxkd.checkpoint._guards import _refusal
from jaxkd.checkpoint._integrity import CorruptCheckpointError
from jaxkd.checkpoint._integrity import Damage
from jaxkd.checkpoint._reading import Restored
from jaxkd.checkpoint._trees import _as_path
from jaxkd.checkpoint._trees import _best_index
from jaxkd.checkpoint._trees import _encode_data_state
from jaxkd.checkpoint._trees import _metric_value
from jaxkd.checkpoint._trees import _metrics_to_json
from jaxkd.state import DistillState

__all__ = ["Checkpointer"]

logger = logging.getLogger("jaxkd.checkpoint")


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

  Integrity: every step carries checksums of its arrays and, once written,
  a manifest of its files (``jaxkd.checkpoint._integrity``). :meth:`restore`
  checks both; a damaged latest step is renamed aside (``<step>.corrupt-<n>``,
  no file is deleted) with one warning, and the previous step is restored.

  Args:
    directory: Where the step directories go (created if missing).
    max_to_keep: How many of the latest steps are kept (``None``: all).
    best_metric: The name of a scalar in the metrics passed to :meth:`save`
      by which the best step is kept and reported by :meth:`best_step`.
    best_mode: ``"max"`` (accuracy) or ``"min"`` (a loss).
    save_interval_steps: :meth:`save` writes only steps that are multiples
      of this (and the first step saved into an empty directory), and only
      steps after the latest one on disk, unless ``force=True``.
    config: The run's config, a JSON-able mapping (``None``: not checked).
      Written to ``directory/config.json`` at the run's first start; each
      start is recorded in ``directory/config_history.jsonl``. A start with
      another config than the last recorded one, while the directory holds
      a step to resume, raises :class:`ConfigMismatchError` naming each
      changed field (``kd.temperature: 4.0 -> 2.0``).
    allow_config_change: Resume despite a changed config; the change is
      recorded in the history (``config.json`` keeps the first config).
    changeable_config_keys: ``fnmatch`` patterns of dotted config keys that
      may change on resume without ``allow_config_change`` (say
      ``"num_epochs"`` to train longer); their changes are recorded too.

  Raises:
    ConfigMismatchError: See ``config``.

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
      config: Mapping[str, Any] | None = None,
      allow_config_change: bool = False,
      changeable_config_keys: Sequence[str] = (),
  ):
    options = _manager_options(
        max_to_keep=max_to_keep, best_metric=best_metric,
        best_mode=best_mode, save_interval_steps=save_interval_steps)
    self._directory = _as_path(directory)
    self._best_metric = best_metric
    self._best_mode = best_mode
    _hold_orbax_errors(True)
    self._open = True
    self._final_steps: list[int] | None = None
    try:
      with _integrity.quiet_orbax():
        self._manager = ocp.CheckpointManager(
            self._directory,
            options=options,
            item_handlers={
                _reading.STATE_ITEM: ocp.StandardCheckpointHandler(),
                _reading.EXTRA_ITEM: ocp.JsonCheckpointHandler(),
            },
        )
      if config is not None:
        _run_config.record_config(
            self._directory, config, latest_step=self._manager.latest_step(),
            allow_change=bool(allow_config_change),
            changeable=tuple(changeable_config_keys))
    except BaseException:
      if hasattr(self, "_manager"):
        self._manager.close()
      self._release()
      raise
    # step -> metrics (JSON) of the steps seen by this object.
    self._metrics_cache: dict[int, dict | None] = {}
    # Steps saved by this object whose files have no manifest yet.
    self._unsealed: list[int] = []

  @property
  def directory(self) -> epath.Path:
    return self._directory

  def _step_dir(self, step: int) -> epath.Path:
    return self._directory / str(step)

  def __repr__(self) -> str:
    return (
        f"Checkpointer({os.fspath(self._directory)!r},"
        f" steps={self.all_steps()})"
    )

  # -- Saving --------------------------------------------------------------

  def _finish(self) -> None:
    """Waits for the pending save, then writes its file manifest.

    Raises:
      CheckpointWriteError: If the background save failed.
    """
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # Orbax re-raises its thread's error here.
      failed = self._unsealed[-1] if self._unsealed else None
      self._unsealed = []
      self._manager.reload()
      target = (self._directory if failed is None
                else self._step_dir(failed))
      raise _writing.write_error(e, failed, target, self.all_steps()) from e
    _writing.seal_steps((s, self._step_dir(s)) for s in self._unsealed)
    self._unsealed = []

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

    The checksums of the arrays are computed here, from one host copy; the
    files are written in the background and their manifest is written when
    the next save starts, at :meth:`wait_until_finished` or at
    :meth:`close`.

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
      CheckpointWriteError: If this or the previous save could not be
        written (an ``OSError``: disk full, say); the steps saved before are
        intact.
    """
    step = int(jax.device_get(state.step))
    self._finish()
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
    encoded_data_state = _encode_data_state(data_state)
    reason = _refusal(state, metrics_json)
    if reason is not None:
      logger.warning(
          "Not saving step %d: %s. The latest checkpoint (step %s) is kept.",
          step,
          reason,
          self._manager.latest_step(),
      )
      return False
    tree, extra = _writing.step_payload(
        state, metrics_json, encoded_data_state)
    if self._best_metric is None:
      orbax_metrics = None
    else:
      value = _metric_value(metrics_json, self._best_metric)
      orbax_metrics = {} if value is None else {self._best_metric: value}
    try:
      saved = self._manager.save(
          step,
          args=ocp.args.Composite(**{
              _reading.STATE_ITEM: ocp.args.StandardSave(tree),
              _reading.EXTRA_ITEM: ocp.args.JsonSave(extra),
          }),
          metrics=orbax_metrics,
          force=force,
      )
    except OSError as e:
      self._manager.reload()
      raise _writing.write_error(
          e, step, self._step_dir(step), self.all_steps()) from e
    if saved:
      self._metrics_cache[step] = metrics_json
      self._unsealed.append(step)
    return bool(saved)

  # -- Restoring -----------------------------------------------------------

  def restore(
      self, target: DistillState, *, step: int | None = None
  ) -> Restored:
    """Restores a step into the structure and placement of ``target``.

    Every restored array gets the shape, dtype and sharding of the
    corresponding leaf of ``target``: a freshly initialised state, or
    ``jax.eval_shape`` of one with shardings attached (leaves without a
    sharding go to the first local device). A checkpoint saved on one device
    count is thus restored onto another by giving ``target`` the new
    shardings. ``target.teachers`` and ``target.hparams`` are returned as
    they are.

    The step is checked first: its file manifest, the checksum of its JSON
    part, then the checksum of every array as read. If the latest step is
    damaged (a truncated or edited file, a missing ``_METADATA``, Orbax
    failing to read it), one warning names the step, the path and what is
    wrong; the step directory is renamed to ``<step>.corrupt-<n>`` (no file
    is deleted; Orbax no longer lists it) and the previous step is tried,
    down to the oldest.

    The restored arrays are committed to their shardings. ``jax.jit`` keys
    its cache on committedness too, so a step compiled for the uncommitted
    arrays of a fresh ``init`` compiles once more for a state restored in
    the same process.

    Args:
      target: A state of the same model, objective and optimiser.
      step: The step to restore (no fallback: a damaged step raises); the
        latest intact one by default.

    Returns:
      A :class:`Restored` ``(state, data_state, metrics)``, with the data
      state and metrics as passed to :meth:`save` (``None`` where none
      were) and the step as ``.step``.

    Raises:
      ValueError: If there is no such step, or the checkpoint's tree differs
        from ``target``'s (the message names the first differing leaf and
        both shapes); checked on the saved metadata before anything is read.
      CorruptCheckpointError: If ``step`` is damaged, or no step is intact
        (the message lists what is wrong with each).
    """
    self._finish()
    steps = self.all_steps()
    if step is not None:
      if int(step) not in steps:
        raise ValueError(
            f"No checkpoint of step {step} in {self._directory}; saved steps:"
            f" {steps}."
        )
      try:
        return _reading.read_step(
            self._manager, target, int(step),
            step_dir=self._step_dir(int(step)),
            what=f"Checkpoint step {step} in {self._directory}")
      except Damage as e:
        raise CorruptCheckpointError(
            f"Checkpoint step {step} in {self._step_dir(int(step))} is"
            f" damaged: {e}.") from None
    if not steps:
      raise ValueError(f"No checkpoint to restore in {self._directory}.")
    return _reading.read_newest_intact(
        self._manager, target, steps, directory=self._directory,
        forget=lambda step: self._metrics_cache.pop(step, None))

  # -- Queries -------------------------------------------------------------

  def latest_step(self) -> int | None:
    """The latest saved step, or None."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def all_steps(self) -> list[int]:
    """Every step on disk, in increasing order (after :meth:`close`: as
    they were then)."""
    if self._final_steps is not None:
      return list(self._final_steps)
    return sorted(self._manager.all_steps())

  def metrics(self, step: int) -> dict | None:
    """The metrics saved with ``step`` (None if it had none).

    Raises:
      ValueError: If there is no such step.
      CorruptCheckpointError: If its JSON part is unreadable.
    """
    self._finish()
    if int(step) not in self.all_steps():
      raise ValueError(
          f"No checkpoint of step {step} in {self._directory}; saved steps:"
          f" {self.all_steps()}."
      )
    step = int(step)
    if step not in self._metrics_cache:
      try:
        self._metrics_cache[step] = _reading.read_extra(
            self._manager, step)["metrics"]
      except Exception as e:
        raise CorruptCheckpointError(
            f"The metrics of checkpoint step {step} in"
            f" {self._step_dir(step)} are unreadable:"
            f" {_integrity.first_line(e)}.") from None
    return self._metrics_cache[step]

  def best_step(self) -> int | None:
    """The kept step with the best ``best_metric`` (latest among ties).

    None without ``best_metric``, or when no kept step has a finite value of
    it. A step whose metrics are unreadable is passed over.
    """
    if self._best_metric is None:
      return None
    steps = self.all_steps()
    metrics = []
    for s in steps:
      try:
        metrics.append(self.metrics(s))
      except CorruptCheckpointError:
        metrics.append(None)
    index = _best_index(metrics, self._best_metric, self._best_mode)
    return None if index is None else steps[index]

  # -- Lifetime ------------------------------------------------------------

  def wait_until_finished(self) -> None:
    """Blocks until every pending save is on disk (and its manifest).

    Raises:
      CheckpointWriteError: If the pending save failed.
    """
    self._finish()

  def _release(self) -> None:
    if self._open:
      self._open = False
      _hold_orbax_errors(False)

  def close(self) -> None:
    """Waits for pending saves and releases Orbax's resources.

    Raises:
      CheckpointWriteError: If the pending save failed (Orbax's resources
        are released all the same).
    """
    if not self._open:
      return
    try:
      self._finish()
    finally:
      self._final_steps = self.all_steps()
      self._manager.close()
      self._release()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
