"""The training loop of every run: steps, logs, evaluation, checkpoints.

:func:`run_loop` drives a :class:`Loop` (what to step, feed and evaluate)
for a number of epochs. It resumes from the run's latest Orbax checkpoint
(state and input position) and cuts ``metrics.jsonl`` back to it, so a
resumed run continues exactly; it checks every step's loss for NaN and
infinities (``config.nonfinite``: stop naming the step, or skip); and it
writes the run's logs: a tqdm progress bar (loss, accuracy, samples/s,
ETA), ``metrics.jsonl``, TensorBoard events and ``curves.png``.

SIGTERM or SIGINT stops a run after its current step with a checkpoint
(:class:`Preempted`, exit status 0); a full disk stops it with one line
(:class:`WriteFailed`, exit status 1). Either way the next start resumes.

The run's config is stored with its checkpoints; a resume with another
config is refused naming the changed fields, except those in
``RESUMABLE_CHANGES`` (``--config.allow_config_change=True`` overrides and
records the change).
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import signal
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np

from experiments import stops as stops_lib
from experiments import writers
# Re-exported: the exceptions run_loop raises.
from experiments.stops import NonFiniteLossError  # pylint: disable=g-bad-import-order
from experiments.stops import Preempted  # pylint: disable=g-bad-import-order
from experiments.stops import WriteFailed  # pylint: disable=g-bad-import-order
from jaxkd import checkpoint as checkpoint_lib
from jaxkd.state import DistillState

logger = logging.getLogger(__name__)

BEST_METRIC = "test/accuracy"

# Config fields that may change when a run resumes (dotted keys, fnmatch
# patterns); a change of any other field is refused unless
# `config.allow_config_change` (the change is then recorded in the run's
# checkpoints/config_history.jsonl). Train longer or shorter; move the data
# or the saved teachers; log or checkpoint at another rate; choose other
# seeds or methods for the pipeline's other runs.
RESUMABLE_CHANGES = (
    "num_epochs", "teacher.num_epochs",
    "data_dir", "teacher.load_dir",
    "log_every_steps", "progress_bar",
    "checkpoint_every_epochs", "max_checkpoints",
    "allow_config_change",
    "pipeline.seeds", "pipeline.methods", "pipeline.notes",
    "pipeline.latency_*", "compare.methods", "compare.seeds",
)

# What a teacher's run does not depend on: the student's side of the config.
_STUDENT_ONLY = ("student", "optimizer", "method", "offline_teacher",
                 "pipeline", "sweep", "compare")


@dataclasses.dataclass
class Loop:
  """One run's training loop: what it steps, feeds and evaluates.

  Attributes:
    name: The run's name (logs and errors).
    run_dir: Its directory.
    step: ``(state, batch) -> (state, metrics)``.
    batches: The training batches (``None`` forever for data-free runs).
    evaluate: ``state -> {"test/...": value}``.
    num_epochs: Epochs to reach.
    batch_size: Examples per step (samples/s).
    finite: ``host metrics of one step -> bool``.
    loss_key: The metric shown as the loss.
    to_checkpoint, from_checkpoint: The state as a ``DistillState`` for
      ``jaxkd.checkpoint`` and back; ``None`` disables checkpoints.
    labels: For vmapped sweeps: one label per student, to name the entries
      of vector metrics.
    steps_per_epoch: ``None``: the data's.
    config: What the run's checkpoints are checked against on resume (a
      JSON-able mapping; see ``RESUMABLE_CHANGES``); ``None``: the whole
      ``ctx.config``.
  """

  name: str
  run_dir: pathlib.Path
  step: Callable[[Any, Any], tuple[Any, dict]]
  batches: Iterator[Any]
  evaluate: Callable[[Any], dict[str, Any]]
  num_epochs: int
  batch_size: int
  finite: Callable[[dict], bool]
  loss_key: str = "loss"
  to_checkpoint: Callable[[Any], DistillState] | None = None
  from_checkpoint: Callable[[Any, DistillState], Any] | None = None
  labels: Sequence[str] | None = None
  steps_per_epoch: int | None = None
  config: Mapping[str, Any] | None = None


def teacher_config(config: Mapping[str, Any]) -> dict[str, Any]:
  """The part of an experiment config a teacher's run depends on.

  Everything but the student's model, optimiser and method (with every
  method's sub-config) and the modes' lists, so that distilling another
  way in the same workdir resumes the teachers it shares.
  """
  from experiments.configs import common  # pylint: disable=g-import-not-at-top

  drop = set(_STUDENT_ONLY) | set(common.method_configs())
  return {k: v for k, v in config.items() if k not in drop}


def _flatten(values: Mapping[str, Any],
             labels: Sequence[str] | None) -> dict[str, float]:
  """Scalars as they are; vectors as ``key[label]`` (or ``key[i]``)."""
  out = {}
  for key, value in values.items():
    array = np.asarray(value, np.float64)
    if array.ndim == 0:
      out[key] = float(array)
      continue
    for i, v in enumerate(array.reshape(-1)):
      label = labels[i] if labels and array.size == len(labels) else str(i)
      out[f"{key}[{label}]"] = float(v)
  return out


def _mean_metrics(host: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
  keys = host[0].keys()
  return {k: np.mean(np.stack([np.asarray(m[k], np.float64) for m in host]),
                     axis=0) for k in keys}


_WRITE_ERRORS = (writers.LogWriteError, checkpoint_lib.CheckpointWriteError)
# Where a mid-epoch checkpoint keeps the host metrics not yet logged.
_PROGRESS_KEY = "loop_progress"


def _open_checkpointer(loop: Loop,
                       config) -> checkpoint_lib.Checkpointer | None:
  if loop.to_checkpoint is None:
    return None
  return checkpoint_lib.Checkpointer(
      loop.run_dir / "checkpoints", max_to_keep=config.max_checkpoints,
      best_metric=BEST_METRIC,
      config=loop.config if loop.config is not None else config.to_dict(),
      allow_config_change=bool(getattr(config, "allow_config_change", False)),
      changeable_config_keys=RESUMABLE_CHANGES)


def _has_events(logdir: pathlib.Path) -> bool:
  return logdir.is_dir() and any(logdir.glob("events.out.tfevents.*"))


def run_loop(ctx: Any, loop: Loop, state: Any) -> tuple[Any, list[dict]]:
  """Trains ``state`` for ``loop.num_epochs`` epochs.

  Args:
    ctx: The run's ``experiments.train.Context`` (config, data, placement).
    loop: What to step, feed and evaluate.
    state: The freshly initialised state (the restore target).

  Returns:
    The final state and the per-epoch history (``metrics.jsonl``'s epoch
    records).

  Raises:
    NonFiniteLossError: With ``config.nonfinite == "stop"``.
    jaxkd.checkpoint.ConfigMismatchError: When resuming with a changed
      config (see ``RESUMABLE_CHANGES``).
    WriteFailed: When a log or a checkpoint cannot be written.
    Preempted: After SIGTERM or SIGINT: the step in progress is finished, a
      checkpoint written (with the input position and the metrics not yet
      logged) and the logs closed; one warning says where it stopped.
  """
  config = ctx.config
  loop.run_dir.mkdir(parents=True, exist_ok=True)
  log = writers.JsonlWriter(loop.run_dir / "metrics.jsonl")
  checkpointer = _open_checkpointer(loop, config)
  outputs = {}  # the event writer and the progress bar, once open
  stopped = None
  try:
    with stops_lib.StopRequests() as stops:
      result = _train(ctx, loop, state, log, checkpointer, outputs, stops)
    error = None
  except _WRITE_ERRORS as e:
    result, error = None, e
  except Preempted as e:
    result, error, stopped = None, None, e
  except BaseException:
    _close(outputs, checkpointer)  # the error in flight is reported
    raise
  error = _close(outputs, checkpointer) or error
  if error is not None:
    raise stops_lib.write_failed(loop, error, checkpointer) from error
  if stopped is not None:
    logger.warning("%s", stopped.message)
    raise stopped
  return result


def _close(outputs: dict, checkpointer) -> OSError | None:
  """Closes the run's outputs; the first write error, if any."""
  error = None
  closers = [outputs[k].close for k in ("bar", "events") if k in outputs]
  if checkpointer is not None:
    closers.append(checkpointer.close)
  for close in closers:
    try:
      close()
    except _WRITE_ERRORS as e:
      error = error or e
  return error


def _train(ctx, loop: Loop, state, log: writers.JsonlWriter,
           checkpointer: checkpoint_lib.Checkpointer | None,
           outputs: dict, stops: stops_lib.StopRequests) -> tuple[Any, list[dict]]:
  import tqdm  # pylint: disable=g-import-not-at-top

  config = ctx.config
  spe = loop.steps_per_epoch or ctx.data.steps_per_epoch
  total = loop.num_epochs * spe
  start, progress = 0, {}
  if checkpointer is not None and checkpointer.latest_step() is not None:
    restored = checkpointer.restore(loop.to_checkpoint(state))
    state = loop.from_checkpoint(state, restored.state)
    if restored.data_state is not None and hasattr(loop.batches, "set_state"):
      loop.batches.set_state(restored.data_state)
    start = restored.step
    progress = (restored.metrics or {}).get(_PROGRESS_KEY) or {}
    records = log.truncate_after(start)
    logger.info("%s: resumed at step %d from %s", loop.name, start,
                checkpointer.directory)
  else:
    records = log.truncate_after(-1)
  history = [r for r in records if r.get("kind") == "epoch"]
  if start > total:
    raise ValueError(
        f"{loop.name}: the checkpoint in {loop.run_dir} is at step {start},"
        f" past this config's {total} steps; use a fresh workdir."
    )
  logdir = loop.run_dir / "tensorboard"
  if start < total:
    # A new event file; TensorBoard hides the older files' events of the
    # steps this run writes again.
    events = outputs["events"] = writers.EventWriter(
        logdir, purge_step=start + 1 if _has_events(logdir) else None)
  bar = outputs["bar"] = tqdm.tqdm(
      total=total, initial=start, desc=loop.name, unit="step",
      disable=not config.progress_bar, dynamic_ncols=True, mininterval=1.0,
      leave=False)
  # Host metrics of the steps not yet logged, and of the epoch so far.
  pending = list(progress.get("pending", []))
  epoch_host = list(progress.get("epoch", []))
  skipped = sum(int(r.get("skipped", 0)) for r in records
                if r.get("kind") == "train")
  interval_start = time.perf_counter()
  epoch_start = time.perf_counter()
  for step in range(start, total):
    if stops.signum is not None:
      raise _preempt(loop, state, step, total, checkpointer, stops.signum,
                     pending, epoch_host)
    batch = next(loop.batches)
    state, metrics = loop.step(
        state, None if batch is None else ctx.put(batch))
    pending.append(metrics)
    bar.update(1)
    end_of_epoch = (step + 1) % spe == 0
    if (step + 1) % config.log_every_steps and not end_of_epoch:
      continue
    host = jax.device_get(pending)
    first = step + 1 - len(host)
    bad = stops_lib.first_nonfinite(host, loop.finite)
    if bad is not None and config.nonfinite == "stop":
      raise NonFiniteLossError(stops_lib.failure_message(
          loop, host[bad], first + bad, spe))
    n_bad = sum(not loop.finite(m) for m in host)
    skipped += n_bad
    now = time.perf_counter()
    rate = len(host) * loop.batch_size / max(now - interval_start, 1e-9)
    interval_start = now
    means = _flatten(
        {f"train/{k}": v for k, v in _mean_metrics(host).items()},
        loop.labels)
    record = {"kind": "train", "step": step + 1, **means,
              "samples_per_s": rate, "skipped": n_bad}
    log.write(record)
    events.scalars(step + 1, {**means, "train/samples_per_s": rate})
    loss = means.get(f"train/{loop.loss_key}")
    accuracy = means.get("train/accuracy")
    bar.set_postfix({k: v for k, v in (
        ("loss", None if loss is None else f"{loss:.4f}"),
        ("acc", None if accuracy is None else f"{accuracy:.3f}"),
        ("ex/s", f"{rate:.0f}")) if v is not None}, refresh=False)
    epoch_host.extend(host)
    pending = []
    if not end_of_epoch:
      continue
    epoch = (step + 1) // spe
    epoch_time = time.perf_counter() - epoch_start
    evaluation = _flatten(loop.evaluate(state), loop.labels)
    train_means = _flatten(
        {f"train/{k}": v for k, v in _mean_metrics(epoch_host).items()},
        loop.labels)
    epoch_host = []
    record = {"kind": "epoch", "epoch": epoch, "step": step + 1,
              **train_means, **evaluation, "epoch_time_s": epoch_time,
              "samples_per_s": spe * loop.batch_size / max(epoch_time,
                                                           1e-9),
              "skipped_total": skipped}
    history.append(record)
    log.write(record)
    events.scalars(step + 1, evaluation)
    if checkpointer is not None and (
        epoch % config.checkpoint_every_epochs == 0
        or epoch == loop.num_epochs):
      checkpointer.save(
          loop.to_checkpoint(state),
          metrics={**record, "nonfinite": 0},
          data_state=_data_state(loop), force=True)
    epoch_start = time.perf_counter()
  if history:
    writers.plot_curves(loop.run_dir / "curves.png", history, title=loop.name)
  return state, history


def _data_state(loop: Loop) -> Any:
  return (loop.batches.get_state() if hasattr(loop.batches, "get_state")
          else None)


def _preempt(loop: Loop, state, done: int, total: int,
             checkpointer: checkpoint_lib.Checkpointer | None, signum: int,
             pending: list, epoch_host: list) -> Preempted:
  """Saves the state after step ``done``; the exception to raise."""
  name = signal.Signals(signum).name
  if checkpointer is None:
    return Preempted(
        f"{loop.name}: stopped by {name} after step {done} of {total}; this"
        " run keeps no checkpoints, so a new start begins again.", step=done)
  if checkpointer.latest_step() != done:
    progress = {"pending": jax.device_get(pending), "epoch": epoch_host}
    checkpointer.save(
        loop.to_checkpoint(state),
        metrics={"kind": "preempted", "step": done, "nonfinite": 0,
                 _PROGRESS_KEY: progress},
        data_state=_data_state(loop), force=True)
    checkpointer.wait_until_finished()
  latest = checkpointer.latest_step()
  return Preempted(
      f"{loop.name}: stopped by {name} after step {done} of {total};"
      f" checkpoint of step {latest} in {checkpointer.directory}. Run the"
      " same command again to resume.", step=done)


def summarize_history(history: Sequence[Mapping[str, Any]],
                      key: str = BEST_METRIC) -> dict[str, Any]:
  """Best and last epoch of ``key`` in a run's history."""
  if not history:
    return {}
  values = [float(h.get(key, np.nan)) for h in history]
  best = int(np.nanargmax(values)) if np.any(np.isfinite(values)) else -1
  last = history[-1]
  return {
      "best_accuracy": values[best] if best >= 0 else float("nan"),
      "best_epoch": int(history[best]["epoch"]) if best >= 0 else -1,
      "last_accuracy": values[-1],
      "epochs": int(last["epoch"]),
      "steps": int(last["step"]),
      "train_time_s": float(sum(h.get("epoch_time_s", 0.0)
                                for h in history)),
      "skipped_steps": int(last.get("skipped_total", 0)),
      "last": {k: v for k, v in last.items() if k.startswith("test/")},
  }
