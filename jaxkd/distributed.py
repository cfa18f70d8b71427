"""Multi-process runs whose survivors exit cleanly when a peer dies.

``jax.distributed`` detects a dead process through its coordination service:
after ``heartbeat_timeout_seconds`` (100 s by default) without heartbeats the
service reports the error to every other process, and their clients end the
process with ``abort()``: SIGABRT, a C++ stack trace and, with Gloo
collectives on CPU, often a Python traceback of the collective that failed
first. A process that is killed in the middle of a collective also leaves its
peers blocked in it until then. This module turns that into a bounded,
clean exit:

* :func:`initialize` starts the runtime with short time-outs (and, for a
  loopback coordinator, binds it to the loopback address only) and starts a
  heartbeat of this process through the coordination service's key-value
  store;
* :func:`watch_peers` is a context manager around the training loop: a
  watchdog thread reads every process's heartbeat, and when one has not
  changed for ``peer_timeout`` seconds it writes one line naming the lost
  process to stderr and ends this process with :data:`PEER_LOST_EXIT_CODE`
  (75, ``EX_TEMPFAIL``: try again), whatever the main thread is doing
  (blocked in a collective or a checkpoint barrier, or unwinding the
  collective's error). JAX's own heartbeat time-out is set above
  ``peer_timeout`` (:func:`jax_heartbeat_timeout`), so the watchdog ends the
  process before JAX aborts it.

Bound: a surviving process exits within ``peer_timeout + 2 * interval``
seconds of a peer's death (``interval = min(1, peer_timeout / 5)``), plus
scheduling delays; ``tests/test_faults_multihost.py`` kills one of two
processes mid-run and checks the exit within ``peer_timeout + 8`` seconds.

Not covered: the death of process 0 itself. Process 0 hosts the coordination
service, and when it dies every other process's JAX client aborts at once
(within about a second, exit by SIGABRT with JAX's multi-line message): the
exit is bounded and fast, but it is JAX's, not one line.

A restart of every process resumes from the last checkpoint (written by
:mod:`jaxkd.checkpoint`): the dead process's state is lost with it, so the
survivors cannot go on alone.

Example::

  from jaxkd import distributed
  distributed.initialize(coordinator_address="10.0.0.1:1234",
                         num_processes=2, process_id=rank, peer_timeout=10)
  with distributed.watch_peers():
    for batch in batches:
      state, metrics = step(state, batch)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
import math
import os
import socket
import sys
import threading
import time
from typing import Any, TextIO

import jax
# The coordination service's client: the handle Orbax uses too
# (orbax.checkpoint's multihost module); `jax.distributed` does not export it.
from jax._src import distributed as _jax_distributed

__all__ = [
    "DEFAULT_PEER_TIMEOUT",
    "PEER_LOST_EXIT_CODE",
    "initialize",
    "jax_heartbeat_timeout",
    "watch_peers",
]

# ``EX_TEMPFAIL`` of sysexits.h: a temporary failure, try again (the restart
# resumes from the last checkpoint).
PEER_LOST_EXIT_CODE = 75
DEFAULT_PEER_TIMEOUT = 10.0

_HEARTBEAT_DIR = "jaxkd/heartbeat/"
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")


def jax_heartbeat_timeout(peer_timeout: float) -> int:
  """JAX's heartbeat time-out used with a given ``peer_timeout`` (seconds).

  Twice ``peer_timeout`` plus 5 s, rounded up: JAX must not declare a
  process dead (and abort its peers) before the watchdog has ended them
  cleanly.

  Examples:
    >>> from jaxkd import distributed
    >>> distributed.jax_heartbeat_timeout(10.0)
    25
  """
  return int(math.ceil(2 * float(peer_timeout))) + 5


def _check_timeout(name: str, value: Any) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) \
      or not math.isfinite(value) or value <= 0:
    raise ValueError(
        f"`{name}` must be a positive finite number of seconds, got"
        f" {value!r}.")
  return float(value)


def _interval(peer_timeout: float) -> float:
  return min(1.0, peer_timeout / 5)


def initialize(
    coordinator_address: str,
    num_processes: int,
    process_id: int,
    *,
    peer_timeout: float = DEFAULT_PEER_TIMEOUT,
    initialization_timeout: int = 120,
    shutdown_timeout: int = 30,
    bind_address: str | None = None,
    **kwargs: Any,
) -> bool:
  """Joins a multi-process JAX run with bounded failure detection.

  Calls ``jax.distributed.initialize`` with ``heartbeat_timeout_seconds`` set
  to :func:`jax_heartbeat_timeout` of ``peer_timeout``, the given
  initialisation and shutdown time-outs, and ``coordinator_bind_address``;
  then starts this process's heartbeat, which :func:`watch_peers` of the
  other processes read. Every process must pass the same ``peer_timeout``.
  Like ``jax.distributed.initialize``, this must run before any other JAX
  call.

  Args:
    coordinator_address: ``host:port`` of process 0's coordination service.
    num_processes: How many processes take part. With 1, nothing is done.
    process_id: This process, in ``[0, num_processes)``.
    peer_timeout: Seconds without a heartbeat of a peer after which
      :func:`watch_peers` ends this process.
    initialization_timeout: Seconds to wait for every process to connect.
    shutdown_timeout: Seconds a finishing process waits at exit for the
      others to finish too.
    bind_address: The address the coordination service listens on (only
      used by process 0). By default the coordinator's own address when its
      host is a loopback address (nothing listens beyond the machine), and
      JAX's default (every interface, same port) otherwise.
    **kwargs: Further arguments of ``jax.distributed.initialize``
      (``local_device_ids``, ...).

  Returns:
    Whether the runtime was initialised by this call (``False`` for one
    process, or when it already was).

  Raises:
    ValueError: If a time-out is not a positive number.

  .. versionadded:: 0.1.0
  """
  peer_timeout = _check_timeout("peer_timeout", peer_timeout)
  _check_timeout("initialization_timeout", initialization_timeout)
  _check_timeout("shutdown_timeout", shutdown_timeout)
  if num_processes == 1 or jax.distributed.is_initialized():
    return False
  if bind_address is None:
    host = coordinator_address.rsplit(":", 1)[0]
    if host in _LOOPBACK_HOSTS:
      bind_address = coordinator_address
  jax.distributed.initialize(
      coordinator_address=coordinator_address,
      num_processes=num_processes,
      process_id=process_id,
      initialization_timeout=int(math.ceil(initialization_timeout)),
      heartbeat_timeout_seconds=jax_heartbeat_timeout(peer_timeout),
      shutdown_timeout_seconds=int(math.ceil(shutdown_timeout)),
      coordinator_bind_address=bind_address,
      **kwargs,
  )
  _heartbeat(peer_timeout)
  return True


# ---------------------------------------------------------------------------
# The heartbeat and the watchdog.
# ---------------------------------------------------------------------------


class _Heartbeat:
  """Writes this process's beat and reads every peer's, once an interval.

  The beat is ``"<count> <host> pid <os pid>"`` under
  ``jaxkd/heartbeat/<process>``: the count changes at every beat, the rest
  names the process in the watchdog's message.
  """

  def __init__(self, client: Any, peer_timeout: float):
    self.client = client
    self.peer_timeout = peer_timeout
    self.interval = _interval(peer_timeout)
    # From the runtime's state, not jax.process_index(): that would start
    # the backends, after which `jax.config` device options no longer apply.
    self.me = _jax_distributed.global_state.process_id
    self.count = _jax_distributed.global_state.num_processes
    self._name = f"{socket.gethostname()} pid {os.getpid()}"
    self._beats = 0
    self.lock = threading.Lock()
    now = time.monotonic()
    # Process -> (last beat text, monotonic time it was first seen).
    self.seen: dict[int, tuple[str | None, float]] = {
        p: (None, now) for p in range(self.count) if p != self.me}
    self.last_ok = now  # the last exchange with the coordination service
    self.last_error: str | None = None
    self.thread = threading.Thread(target=self._run, daemon=True,
                                   name="jaxkd-heartbeat")
    self.thread.start()

  def alive(self) -> bool:
    return _jax_distributed.global_state.client is self.client

  def _run(self) -> None:
    while self.alive():
      self._beats += 1
      try:
        self.client.key_value_set(
            f"{_HEARTBEAT_DIR}{self.me}", f"{self._beats} {self._name}",
            allow_overwrite=True)
        entries = self.client.key_value_dir_get(_HEARTBEAT_DIR)
      except Exception as e:  # pylint: disable=broad-except
        if not self.alive():  # jax.distributed.shutdown() was called.
          return
        with self.lock:
          self.last_error = _first_line(e)
      else:
        now = time.monotonic()
        with self.lock:
          self.last_ok = now
          for key, value in entries:
            process = int(key.rstrip("/").rsplit("/", 1)[-1])
            if process in self.seen and self.seen[process][0] != value:
              self.seen[process] = (value, now)
      time.sleep(self.interval)

  def lost(self, timeout: float) -> str | None:
    """Why a peer counts as lost now, or ``None`` while every one beats."""
    now = time.monotonic()
    with self.lock:
      if now - self.last_ok > timeout:
        return (
            f"lost the coordination service at"
            f" {_jax_distributed.global_state.coordinator_address} (process 0)"
            f" for {now - self.last_ok:.1f} s: {self.last_error}")
      for process, (value, since) in sorted(self.seen.items()):
        if now - since > timeout:
          who = "" if value is None else f" ({value.split(' ', 1)[1]})"
          return (f"lost process {process} of {self.count}{who}: no heartbeat"
                  f" for {now - since:.1f} s")
    return None


_HEARTBEAT: _Heartbeat | None = None
_HEARTBEAT_LOCK = threading.Lock()


def _heartbeat(peer_timeout: float) -> _Heartbeat:
  """This process's heartbeat, started on first use for the live client."""
  global _HEARTBEAT
  with _HEARTBEAT_LOCK:
    if _HEARTBEAT is None or not _HEARTBEAT.alive():
      _HEARTBEAT = _Heartbeat(_jax_distributed.global_state.client,
                              peer_timeout)
    return _HEARTBEAT


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def _end_process(message: str, exit_code: int, stream: TextIO | None) -> None:
  """Writes ``message`` as one line and ends the process at once.

  ``os._exit``: no ``atexit`` handler runs, in particular not JAX's shutdown,
  which would wait ``shutdown_timeout`` for the dead peer.
  """
  stream = sys.stderr if stream is None else stream
  try:
    sys.stdout.flush()
    stream.write(message.replace("\n", " ") + "\n")
    stream.flush()
  finally:
    os._exit(exit_code)  # pylint: disable=protected-access


@contextlib.contextmanager
def watch_peers(
    *,
    peer_timeout: float | None = None,
    exit_code: int = PEER_LOST_EXIT_CODE,
    stream: TextIO | None = None,
) -> Iterator[None]:
  """Ends this process cleanly when another process of the run dies.

  Inside the context a watchdog thread checks the heartbeats of the other
  processes every ``interval = min(1, peer_timeout / 5)`` seconds. When one
  has not changed for ``peer_timeout`` seconds (or the coordination service
  cannot be reached for as long), it writes one line::

    jaxkd: lost process 1 of 2 (host pid 123): no heartbeat for 5.2 s;
    exiting with code 75, restart every process to resume from the last
    checkpoint

  to ``stream`` and ends the process with ``exit_code`` (``os._exit``: no
  traceback, no ``atexit`` handlers, no wait for a pending background
  checkpoint write, which Orbax never commits half-written). An exception
  raised inside the context (such as the failed collective's
  ``JaxRuntimeError``, or ``ValueError`` where its result was converted) is
  held for up to ``peer_timeout + 2 * interval`` seconds so that the
  watchdog can name the lost process; if none is lost by then it
  propagates. ``KeyboardInterrupt`` and ``SystemExit`` are not held. In a
  single-process run the context does nothing.

  Enter it in every process right after :func:`initialize` (or
  ``jax.distributed.initialize``, in which case the heartbeat starts here,
  and JAX's ``heartbeat_timeout_seconds`` should exceed ``peer_timeout`` by
  a margin: see :func:`jax_heartbeat_timeout`), and keep the whole run in
  it, the last checkpoint's wait included: a process that has left the
  context waits for a dead peer at JAX's shutdown barrier, for up to
  ``shutdown_timeout``, and is then aborted by JAX.

  Args:
    peer_timeout: Seconds without a peer's heartbeat before this process
      ends; by default the ``peer_timeout`` given to :func:`initialize`
      (:data:`DEFAULT_PEER_TIMEOUT` if the runtime was started otherwise).
    exit_code: The exit status of the ended process.
    stream: Where the line goes (``sys.stderr``).

  Yields:
    Nothing; the body is the training loop.

  Raises:
    ValueError: If ``peer_timeout`` is not a positive number.

  .. versionadded:: 0.1.0
  """
  if peer_timeout is not None:
    peer_timeout = _check_timeout("peer_timeout", peer_timeout)
  if not jax.distributed.is_initialized() \
      or _jax_distributed.global_state.num_processes == 1:
    yield
    return
  beat = _heartbeat(peer_timeout or DEFAULT_PEER_TIMEOUT)
  timeout = beat.peer_timeout if peer_timeout is None else peer_timeout
  done = threading.Event()

  def judge() -> None:
    while not done.wait(beat.interval):
      if not beat.alive():
        return
      reason = beat.lost(timeout)
      if reason is not None:
        _end_process(
            f"jaxkd: process {beat.me} {reason}; exiting with code"
            f" {exit_code}, restart every process to resume from the last"
            f" checkpoint", exit_code, stream)

  thread = threading.Thread(target=judge, daemon=True, name="jaxkd-watchdog")
  thread.start()
  try:
    yield
  except Exception:
    # Perhaps a collective that failed because its peer died (a
    # JaxRuntimeError, or a ValueError where an array was converted): the
    # watchdog ends the process, naming the peer, within the bound. If every
    # peer still beats by then, the error goes on.
    deadline = time.monotonic() + timeout + 2 * beat.interval
    while time.monotonic() < deadline and thread.is_alive():
      thread.join(beat.interval)
    raise
  finally:
    done.set()
