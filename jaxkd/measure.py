"""Measurements for results files: where a run ran, how long a call takes.

The experiments and the benchmarks record one :func:`environment` beside
every figure they publish, so that a number can be traced to the machine and
the package versions that produced it, and time calls with
:func:`time_calls`.

Examples:
  >>> from jaxkd import measure
  >>> record = measure.environment(packages=("jax",))
  >>> sorted(record)
  ['date', 'device', 'machine', 'versions', 'xla_flags']
  >>> list(record["versions"])
  ['python', 'jax']
  >>> len(measure.time_calls(lambda: None, steps=3, warmup=1))
  3
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import time
from typing import Any, Callable, Sequence

import jax

__all__ = ["environment", "package_version", "time_calls"]


def package_version(package: str) -> str | None:
  """The installed version of ``package``, or ``None`` if it is absent."""
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _memory_total_gib() -> float | None:
  try:
    import psutil  # pylint: disable=g-import-not-at-top

    return psutil.virtual_memory().total / 2**30
  except ImportError:
    return None


def environment(*, packages: Sequence[str]) -> dict[str, Any]:
  """The date, machine, first device, versions and ``XLA_FLAGS`` of this run.

  Starts the JAX backend (it asks for the devices).

  Args:
    packages: Distribution names whose versions to record, in order.

  Returns:
    A JSON-ready dict: ``"date"`` (UTC, ISO 8601 to the second),
    ``"machine"`` (``platform``, ``system``, ``architecture``, ``cpu``,
    ``logical_cores``, ``memory_gib``, the last ``None`` without psutil),
    ``"device"`` (``backend``, ``kind``, ``count``), ``"versions"``
    (``python`` then each of ``packages``, ``None`` where not installed) and
    ``"xla_flags"`` (``""`` when unset).
  """
  device = jax.devices()[0]
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"
      ),
      "machine": {
          "platform": platform.platform(),
          "system": platform.system(),
          "architecture": platform.machine(),
          "cpu": _cpu_model(),
          "logical_cores": os.cpu_count(),
          "memory_gib": _memory_total_gib(),
      },
      "device": {
          "backend": jax.default_backend(),
          "kind": device.device_kind,
          "count": jax.device_count(),
      },
      "versions": {
          "python": platform.python_version(),
          **{name: package_version(name) for name in packages},
      },
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


def time_calls(run: Callable[[], Any], *, steps: int, warmup: int) -> list[float]:
  """Seconds of each of ``steps`` timed calls of ``run``, after ``warmup``.

  ``run`` must block until its work is done (end it with
  ``jax.block_until_ready``); the ``warmup`` calls before (the first one
  compiles) are not timed. At least one call is timed.

  Args:
    run: The call to time, without arguments.
    steps: How many calls to time.
    warmup: How many calls to make first, untimed.

  Returns:
    The wall-clock seconds of every timed call, in order.
  """
  for _ in range(warmup):
    run()
  durations = []
  for _ in range(max(steps, 1)):
    start = time.perf_counter()
    run()
    durations.append(time.perf_counter() - start)
  return durations
