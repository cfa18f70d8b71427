"""Persistent benchmark workers, driven by a parent over JSON lines.

A worker is a Python process (any interpreter: the benchmark's own, an older
stack, one that has PyTorch) that holds one configuration at a time. The
parent writes one JSON object per line to its standard input and reads one
back from its standard output:

* ``{"op": "info"}`` -> the worker's Python and package versions;
* ``{"op": "build", "config": {...}}`` -> the systems it can now time
  (compilation and warm-up happen here, once per configuration);
* ``{"op": "time", "system": NAME, "steps": N}`` -> ``{"seconds": [...]}``,
  each step timed alone in the worker;
* ``{"op": "memory"}`` -> its resident set and high-water mark (MiB);
* ``{"op": "profile", "system": NAME, "steps": N, "warmup": W}`` -> where
  one step's time goes, from the framework's own profiler (workers built
  with a ``profile`` function: ``benchmarks.torch_worker``);
* ``{"op": "quit"}``.

Every answer carries ``"ok"``; a failure answers ``{"ok": false, "error":
traceback}`` and the parent raises it. The parent waits for each answer
before sending the next request, to this worker or any other, so only one
process computes at a time and each round of :func:`interleave` meets every
worker under the same machine load.

This module imports neither JAX nor PyTorch: both sides use it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Iterable, Sequence

__all__ = [
    "REPO_ROOT", "Worker", "WorkerError", "interleave", "process_memory",
    "python_info", "schedule", "serve",
]

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


class WorkerError(RuntimeError):
  """A worker answered with an error, or died."""


# ---------------------------------------------------------------------------
# Worker side.
# ---------------------------------------------------------------------------


def python_info(packages: Iterable[str]) -> dict[str, Any]:
  """The interpreter and the installed versions of ``packages``."""
  versions: dict[str, Any] = {"python": platform.python_version()}
  for name in packages:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return {"executable": sys.executable, "versions": versions}


def process_memory() -> dict[str, float | None]:
  """This process's resident set now and its peak, in MiB (Linux)."""
  rss = None
  try:
    with open("/proc/self/status", encoding="utf-8") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          rss = int(line.split()[1]) / 1024  # kB.
  except OSError:
    pass
  # ru_maxrss is in KiB on Linux.
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return {"rss_mib": rss, "peak_rss_mib": peak}


def time_steps(step: Callable[[], Any], steps: int) -> list[float]:
  """Seconds of each of ``steps`` calls of ``step`` (which must block)."""
  seconds = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    seconds.append(time.perf_counter() - start)
  return seconds


def serve(build: Callable[[dict], tuple[dict[str, Callable[[], Any]], dict]],
          info: dict[str, Any],
          profile: Callable[..., dict[str, Any]] | None = None) -> None:
  """Answers the parent's requests until ``quit`` or end of input.

  Args:
    build: ``config -> (steps, extra)``: the blocking step closure of every
      system of the configuration, and what else the ``build`` answer
      carries (parameter counts, compile times).
    info: The ``info`` answer (see :func:`python_info`).
    profile: ``profile(step, steps=N, warmup=W) -> dict`` answering
      ``profile`` requests, or ``None`` (the request is an error).
  """
  # The protocol owns the real standard output; anything a library prints
  # goes to standard error instead of corrupting it.
  channel = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
  os.dup2(2, 1)
  sys.stdout = sys.stderr
  steps: dict[str, Callable[[], Any]] = {}
  for line in sys.stdin:
    if not line.strip():
      continue
    try:
      request = json.loads(line)
      op = request["op"]
      if op == "quit":
        answer: dict[str, Any] = {}
      elif op == "info":
        answer = dict(info)
      elif op == "build":
        steps = {}  # Frees the previous configuration first.
        steps, extra = build(request["config"])
        answer = {"systems": list(steps), **extra}
      elif op == "time":
        answer = {"seconds": time_steps(steps[request["system"]],
                                        int(request["steps"]))}
      elif op == "memory":
        answer = process_memory()
      elif op == "profile" and profile is not None:
        answer = profile(steps[request["system"]],
                         steps=int(request["steps"]),
                         warmup=int(request.get("warmup", 0)))
      else:
        raise ValueError(f"Unknown op {op!r}.")
      answer["ok"] = True
    except Exception:  # pylint: disable=broad-except  # Sent to the parent.
      op = None
      answer = {"ok": False, "error": traceback.format_exc()}
    channel.write(json.dumps(answer) + "\n")
    if op == "quit":
      return


# ---------------------------------------------------------------------------
# Parent side.
# ---------------------------------------------------------------------------


class Worker:
  """A worker process: ``python -m <module>`` answering JSON-line requests.

  The worker imports this checkout's ``benchmarks`` and ``jaxkd`` (the
  repository root goes first on its ``PYTHONPATH``); its standard error is
  the parent's.
  """

  def __init__(self, label: str, python: str | os.PathLike[str],
               module: str, args: Sequence[str] = ()):
    self.label = label
    self.python = str(python)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH")
                            else []))
    self._process = subprocess.Popen(
        [self.python, "-u", "-m", module, *args], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT, env=env,
    )
    try:
      self.info = self.request("info")
    except BaseException:
      self.close()
      raise

  def request(self, op: str, **fields) -> dict[str, Any]:
    """Sends one request and waits for its answer."""
    process = self._process
    try:
      process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
      process.stdin.flush()
      line = process.stdout.readline()
    except (BrokenPipeError, OSError):
      line = ""
    if not line:
      raise WorkerError(
          f"The {self.label} worker ({self.python}) exited (code"
          f" {process.wait()}) before answering {op!r}; its error is above."
      )
    answer = json.loads(line)
    if not answer.pop("ok"):
      raise WorkerError(
          f"The {self.label} worker failed on {op!r}:\n{answer['error']}")
    return answer

  def close(self, timeout: float = 30.0) -> None:
    """Asks the worker to quit; kills it if it does not."""
    if self._process.poll() is None:
      try:
        self.request("quit")
        self._process.wait(timeout)
      except (WorkerError, subprocess.TimeoutExpired, ValueError):
        self._process.kill()
        self._process.wait()
    for stream in (self._process.stdin, self._process.stdout):
      stream.close()

  def __enter__(self) -> "Worker":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def schedule(names: Sequence[Any], rounds: int) -> list[Any]:
  """The order of :func:`interleave`: every name once per round, in order."""
  return [name for _ in range(max(rounds, 1)) for name in names]


def interleave(
    systems: Sequence[tuple[Any, str]], *, steps: int, rounds: int
) -> dict[tuple[Any, str], list[float]]:
  """Times ``(worker, system)`` pairs in alternating rounds.

  Each round asks every pair, in order, for ``steps`` timed steps; each
  request waits for its answer, so the workers never compute at once.

  Returns:
    The ``rounds * steps`` durations of each pair, in seconds.
  """
  durations: dict[tuple[Any, str], list[float]] = {
      pair: [] for pair in systems}
  for worker, system in schedule(list(systems), rounds):
    answer = worker.request("time", system=system, steps=max(steps, 1))
    durations[(worker, system)] += answer["seconds"]
  return durations
