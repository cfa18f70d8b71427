"""Why a run stops early: a step not applied, a failed write, a signal.

Each is an exception :func:`experiments.loop.run_loop` raises with one line
that names the run, the step and what to do: :class:`NonFiniteLossError`
(bad data, a bad hyper-parameter or a non-finite loss),
:class:`WriteFailed` (exit status 1) and :class:`Preempted` (SIGTERM or
SIGINT, caught by :class:`StopRequests`; exit status 0).
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Mapping

import numpy as np

from jaxkd import checkpoint as checkpoint_lib


class NonFiniteLossError(FloatingPointError):
  """The loss (or a gradient) of a step was NaN or infinite."""


def failure_message(loop: Any, metrics: Mapping[str, Any], step: int,
                     spe: int) -> str:
  """Why step ``step`` was not applied: bad data, a bad hyper-parameter or a
  non-finite loss, named."""
  where = (f"{loop.name}: step {step} (epoch {step // spe + 1}, batch"
           f" {step % spe + 1} of {spe}) was not applied")
  fields = sorted(k.removeprefix("bad/") for k, v in metrics.items()
                  if k.startswith("bad/") and np.any(np.asarray(v) > 0))
  if fields:
    return (f"{where}: the batch's {', '.join(fields)} holds bad values"
            " (labels outside [0, num_classes), NaN or inf inputs or cached"
            " teacher outputs). Fix the data, or set `nonfinite='skip'` to"
            " skip and count such batches.")
  invalid = sorted(k.removeprefix("invalid/") for k, v in metrics.items()
                   if k.startswith("invalid/") and np.any(np.asarray(v) > 0))
  if invalid:
    return (f"{where}: the hyper-parameter {', '.join(invalid)} had an"
            " invalid value (a temperature must be finite and > 0, a weight"
            " finite and >= 0).")
  value = np.asarray(metrics.get(loop.loss_key, np.nan))
  return (f"{where}: the loss or a gradient is not finite;"
          f" {loop.loss_key}={value}. Lower the learning rate, or set"
          " `nonfinite='skip'` to skip such steps.")


def first_nonfinite(host, finite) -> int | None:
  for i, metrics in enumerate(host):
    if not finite(metrics):
      return i
  return None


class WriteFailed(SystemExit):
  """A log or checkpoint could not be written (a full disk, say).

  A ``SystemExit`` whose code is the one-line message: uncaught, Python
  prints it and exits with status 1, without a traceback. Nothing written
  before is lost; rerunning the command resumes from the latest checkpoint.
  """

  def __init__(self, message: str):
    super().__init__(message)
    self.message = message

  def __str__(self) -> str:
    return self.message


class Preempted(SystemExit):
  """SIGTERM or SIGINT stopped the run after a step, checkpoint written.

  A ``SystemExit`` with code 0: uncaught, the process exits 0. The next
  start resumes from the checkpoint (with the steps not yet logged), and
  goes on exactly as the uninterrupted run would have.
  """

  def __init__(self, message: str, *, step: int):
    super().__init__(0)
    self.message, self.step = message, step

  def __str__(self) -> str:
    return self.message


class StopRequests:
  """Turns SIGTERM and SIGINT into a request to stop after the step.

  Installed while a loop runs, in the main thread only; a second SIGINT
  interrupts at once (``KeyboardInterrupt``).
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum: int | None = None
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signum = signum

  def __enter__(self) -> StopRequests:
    if threading.current_thread() is threading.main_thread():
      for signum in self.SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)


def write_failed(loop: Any, error: OSError,
                  checkpointer: checkpoint_lib.Checkpointer | None
                  ) -> WriteFailed:
  if checkpointer is None:
    resume = "rerunning the command starts the run again"
  else:
    latest = checkpointer.latest_step()
    resume = ("rerunning the command starts the run again" if latest is None
              else f"rerun the command to resume from step {latest}"
                   f" ({checkpointer.directory})")
  return WriteFailed(f"{loop.name}: stopped: {error}. Nothing older was"
                     f" lost; {resume}.")
