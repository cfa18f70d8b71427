"""A faster XLA:CPU default, applied by an explicit call.

XLA:CPU hands convolutions to YNNPACK fusions by default. For the CIFAR
ResNets of the distillation benchmarks, XLA's own convolution emitter is
faster on jaxlib 0.10.2 (a resnet8x4 train step about 1.8x, a resnet32x4
forward pass about 1.4x on a 2-core x86 machine, ``benchmarks/throughput.py``)
and still somewhat faster on jaxlib 0.12 (0-15% on the student step, within
noise on the whole distillation step)::

  XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution

The leading ``-`` removes convolutions alone from the default list of YNNPACK
fusion kinds. Replacing the whole list instead (``=individual_dot``) would
also take reductions away from YNNPACK, which makes BatchNorm slow.

Importing jaxkd never changes the environment. :func:`use_fast_cpu_defaults`
appends the flag to ``XLA_FLAGS``; the experiment and benchmark entry points
call it first thing, and so can a user's own script. It leaves the
environment untouched unless all of these hold:

* ``JAXKD_NO_CPU_FLAGS`` is unset, empty or ``0`` (set it to ``1`` to opt
  out);
* ``XLA_FLAGS`` does not mention ``xla_cpu_experimental_ynn_fusion_type``
  already (a value the user chose is never overridden);
* the installed jaxlib is one on which the flag was checked to parse
  (:data:`VERIFIED_JAXLIB_VERSIONS`). XLA aborts the whole process on an
  unknown flag, so the version is checked *before* the flag is written;
* no JAX backend has been initialised yet. XLA reads ``XLA_FLAGS`` when the
  first backend starts, so a flag added later would have no effect.

In the last two cases a :class:`CpuFlagsWarning` says what was not done and
why. Importing ``jax`` and calling ``jax.config.update`` do not start a
backend; the first array operation, ``jax.devices()`` or a compilation do.
The warnings never raise: should a filter turn them into errors, the message
is logged instead.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import sys
import warnings
from typing import MutableMapping

__all__ = [
    "CpuFlagsWarning",
    "FLAG",
    "OPT_OUT_VARIABLE",
    "VERIFIED_JAXLIB_VERSIONS",
    "use_fast_cpu_defaults",
]

OPTION = "xla_cpu_experimental_ynn_fusion_type"
FLAG = f"--{OPTION}=-individual_convolution"
OPT_OUT_VARIABLE = "JAXKD_NO_CPU_FLAGS"
# jaxlib releases on which FLAG was checked to parse (and measured). XLA aborts
# on an unknown flag, so a release is added here only after checking it.
VERIFIED_JAXLIB_VERSIONS = frozenset({"0.10.2", "0.12.0", "0.12.0.1"})

_logger = logging.getLogger(__name__)
_warned: set[str] = set()


class CpuFlagsWarning(UserWarning):
  """The default XLA:CPU flag of jaxkd could not be applied."""


def _warn_once(kind: str, message: str) -> None:
  if kind in _warned:
    return
  _warned.add(kind)
  try:
    warnings.warn(message, CpuFlagsWarning, stacklevel=3)
  except Warning:
    # A filter turned the warning into an error: an import must not fail
    # for a performance hint.
    _logger.warning("%s", message)


def jaxlib_version() -> str | None:
  """The installed jaxlib version (package metadata; jaxlib is not imported)."""
  try:
    return importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return None


def backend_initialized() -> bool:
  """Whether a JAX backend already runs in this process (never imports jax)."""
  xla_bridge = sys.modules.get("jax._src.xla_bridge")
  if xla_bridge is None:
    return False
  check = getattr(xla_bridge, "backends_are_initialized", None)
  if check is not None:
    return bool(check())
  return bool(getattr(xla_bridge, "_backends", None))


def _opted_out(environ: MutableMapping[str, str]) -> bool:
  return environ.get(OPT_OUT_VARIABLE, "").strip().lower() not in (
      "", "0", "false", "no",
  )


def use_fast_cpu_defaults(
    environ: MutableMapping[str, str] | None = None,
) -> bool:
  """Appends the fast XLA:CPU convolution flag to ``XLA_FLAGS`` if safe.

  See the module docstring for the conditions. Calling it again is harmless:
  the second call finds the option already present.

  Args:
    environ: The environment to update; ``os.environ`` by default.

  Returns:
    Whether the flag was added by this call.
  """
  environ = os.environ if environ is None else environ
  if _opted_out(environ):
    return False
  flags = environ.get("XLA_FLAGS", "")
  if OPTION in flags:
    return False
  version = jaxlib_version()
  if version not in VERIFIED_JAXLIB_VERSIONS:
    _warn_once(
        "version",
        f"jaxkd did not set `{FLAG}` in XLA_FLAGS: it was verified on jaxlib"
        f" {', '.join(sorted(VERIFIED_JAXLIB_VERSIONS))}, and jaxlib"
        f" {version or '(not found)'} is installed (XLA aborts on a flag it"
        " does not know). Nothing was changed; the measured gain of the flag"
        " is up to 1.8x on jaxlib 0.10.2 and 0-15% on 0.12. Set it in"
        f" XLA_FLAGS yourself if your jaxlib has it, or {OPT_OUT_VARIABLE}=1"
        " to silence this.",
    )
    return False
  if backend_initialized():
    _warn_once(
        "initialized",
        f"jaxkd could not set `{FLAG}` in XLA_FLAGS: a JAX backend was"
        " already initialised, and XLA reads the flags only once. Call"
        " `jaxkd.cpu.use_fast_cpu_defaults()` before the first JAX"
        " computation, or set the flag in XLA_FLAGS before starting Python"
        f" ({OPT_OUT_VARIABLE}=1 silences this).",
    )
    return False
  environ["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
  return True
