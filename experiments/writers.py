"""Where a run's numbers go: JSON lines, TensorBoard events, PNG curves.

* :class:`JsonlWriter`: one JSON object per line (``metrics.jsonl``), the
  log the other outputs are rebuilt from; on resume it is cut back to the
  restored step, and a line cut short by a crash is dropped with a warning.
* :class:`EventWriter`: TensorBoard scalar event files, written by
  tensorboardX; a resumed run starts a new file that purges the steps it
  writes again.
* :func:`plot_curves`: loss and accuracy against the epoch, a PNG
  (matplotlib, Agg backend).

A write that fails (a full disk) raises :class:`LogWriteError` naming the
file; nothing written before is lost.
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import math
import os
import pathlib
import time
from typing import Any, Iterable, Mapping

import numpy as np

logger = logging.getLogger(__name__)


def _jsonable(value: Any) -> Any:
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (np.generic, np.ndarray)):
    return _jsonable(np.asarray(value).tolist())
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN or infinity.
  return value


def dump_json(path: os.PathLike[str] | str, value: Any) -> None:
  """Writes ``value`` as indented JSON (NaN and infinities as strings)."""
  pathlib.Path(path).write_text(json.dumps(_jsonable(value), indent=2) + "\n")


class LogWriteError(OSError):
  """A log file could not be written (disk full, say)."""

  def __str__(self) -> str:
    return str(self.strerror)


def _write_error(path: pathlib.Path, error: OSError) -> LogWriteError:
  reason = error.strerror or str(error)
  return LogWriteError(error.errno or errno.EIO,
                       f"Cannot write {path}: {reason}")


class JsonlWriter:
  """Appends one JSON object per line to ``path``.

  A line that does not parse (a write cut short by a crash or a full disk)
  is skipped with a warning on :meth:`read`, never an error; the records
  before it are kept. :meth:`truncate_after` rewrites the file atomically,
  so a failure leaves the old file whole.
  """

  def __init__(self, path: os.PathLike[str] | str):
    self.path = pathlib.Path(path)

  def write(self, record: Mapping[str, Any]) -> None:
    """Appends ``record``.

    Raises:
      LogWriteError: Naming the path, if the line could not be written.
    """
    line = json.dumps(_jsonable(dict(record))) + "\n"
    try:
      with self.path.open("a") as f:
        f.write(line)
    except OSError as e:
      raise _write_error(self.path, e) from e

  def read(self) -> list[dict[str, Any]]:
    """The records; unreadable lines skipped, each with a warning."""
    if not self.path.exists():
      return []
    lines = self.path.read_text(errors="replace").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()),
               default=-1)
    records = []
    for i, line in enumerate(lines):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        if not isinstance(record, dict):
          raise ValueError(f"a JSON {type(record).__name__}, not an object")
      except ValueError:
        if i == last:
          logger.warning("%s: dropping its last line, cut short (%d"
                         " characters); the records before it are kept.",
                         self.path, len(line))
        else:
          logger.warning("%s: skipping line %d, which is not a JSON object.",
                         self.path, i + 1)
        continue
      records.append(record)
    return records

  def truncate_after(self, step: int) -> list[dict[str, Any]]:
    """Drops the records of steps after ``step``; returns those kept.

    Raises:
      LogWriteError: If the new file could not be written (the old one is
        left as it was).
    """
    kept = [r for r in self.read() if int(r.get("step", 0)) <= step]
    tmp = self.path.with_name(f".{self.path.name}.tmp")
    try:
      tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
      os.replace(tmp, self.path)
    except OSError as e:
      tmp.unlink(missing_ok=True)
      raise _write_error(self.path, e) from e
    return kept


# -- TensorBoard event files -------------------------------------------------

_writer_ids = itertools.count()


class EventWriter:
  """Writes scalar summaries to a new TensorBoard event file in ``logdir``.

  The file is written by tensorboardX's ``EventsWriter``, synchronously: a
  ``SummaryWriter`` writes from a thread, which on a full disk dies while
  the training goes on (and blocks once its queue is full); here the error
  reaches the caller. Every event is flushed when written.

  Args:
    logdir: The directory (created if missing).
    purge_step: A run resumed at step ``s`` passes ``s + 1``: TensorBoard
      then hides the events of steps ``>= s + 1`` of the earlier files, the
      ones the resumed run writes again (``SummaryWriter(purge_step=...)``'s
      events: a file version and a ``SessionLog.START`` at that step).

  Raises:
    LogWriteError: On any write (the constructor too).
  """

  def __init__(self, logdir: os.PathLike[str] | str, *,
               purge_step: int | None = None):
    # pylint: disable=g-import-not-at-top
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto import event_pb2
    from tensorboardX.proto import summary_pb2
    # pylint: enable=g-import-not-at-top
    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    logdir = pathlib.Path(logdir)
    # TensorBoard reads a directory's files in the order of their names:
    # after the second, the creation time in nanoseconds, zero-padded.
    suffix = f".{time.time_ns():020d}.{os.getpid()}.{next(_writer_ids)}"
    self._writer = None
    try:
      logdir.mkdir(parents=True, exist_ok=True)
      self._writer = EventsWriter(os.fspath(logdir / "events"), suffix)
      self.path = pathlib.Path(getattr(self._writer, "_file_name", logdir))
      if purge_step is not None:
        self._writer.write_event(event_pb2.Event(
            wall_time=time.time(), step=int(purge_step),
            file_version="brain.Event:2"))
        self._writer.write_event(event_pb2.Event(
            wall_time=time.time(), step=int(purge_step),
            session_log=event_pb2.SessionLog(
                status=event_pb2.SessionLog.START)))
      self._writer.flush()
    except OSError as e:
      raise _write_error(logdir, e) from e

  def scalars(self, step: int, values: Mapping[str, Any]) -> None:
    """One event at ``step`` holding every numeric value of ``values``."""
    summary = self._summary_pb2.Summary(value=[
        self._summary_pb2.Summary.Value(tag=k, simple_value=float(v))
        for k, v in values.items()
        if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)])
    if not summary.value:
      return
    try:
      self._writer.write_event(self._event_pb2.Event(
          wall_time=time.time(), step=int(step), summary=summary))
      self._writer.flush()
    except OSError as e:
      raise _write_error(self.path, e) from e

  def close(self) -> None:
    if self._writer is not None:
      writer, self._writer = self._writer, None
      try:
        writer.close()
      except OSError as e:
        raise _write_error(self.path, e) from e


# -- Curves ------------------------------------------------------------------


def plot_curves(
    path: os.PathLike[str] | str,
    history: Iterable[Mapping[str, Any]],
    *,
    title: str,
) -> None:
  """Loss and accuracy per epoch (train and test) as a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  history = [h for h in history if "epoch" in h]
  epochs = [h["epoch"] for h in history]

  def series(key):
    return [h.get(key, float("nan")) for h in history]

  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.4))
  for key, label in (("train/loss", "train"), ("test/loss", "test")):
    ax_loss.plot(epochs, series(key), marker=".", label=label)
  ax_loss.set_xlabel("epoch")
  ax_loss.set_ylabel("loss (train: objective, test: CE)")
  ax_loss.legend()
  for key, label in (("train/accuracy", "train"), ("test/accuracy", "test")):
    ax_acc.plot(epochs, series(key), marker=".", label=label)
  ax_acc.set_xlabel("epoch")
  ax_acc.set_ylabel("accuracy")
  ax_acc.legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
