"""A faster default for XLA:CPU, applied when ``jaxkd`` is imported.

XLA:CPU (jaxlib 0.10.2) hands convolutions to YNNPACK fusions by default.
For the CIFAR ResNets of the distillation benchmarks that path is markedly
slower than XLA's own convolution emitter: with the option below, a resnet8x4
train step ran about 1.8x faster and a resnet32x4 forward pass about 1.4x
faster on a 2-core x86 machine (``benchmarks/throughput.py``)::

  XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution

The leading ``-`` removes convolutions alone from the default list of YNNPACK
fusion kinds. Replacing the whole list instead (``=individual_dot``) would
also take reductions away from YNNPACK, which makes BatchNorm slow.

:func:`apply_default_cpu_flags` appends that option to ``XLA_FLAGS`` when all
of these hold, and otherwise leaves the environment untouched:

* ``JAXKD_NO_CPU_FLAGS`` is unset, empty or ``0`` (set it to ``1`` to opt
  out);
* ``XLA_FLAGS`` does not mention ``xla_cpu_experimental_ynn_fusion_type``
  already (a value the user chose is never overridden);
* the installed jaxlib is one on which the option was verified
  (:data:`VERIFIED_JAXLIB_VERSIONS`). XLA aborts the whole process on an
  unknown flag, so the version is checked *before* the flag is written, and
  an unverified jaxlib gets a warning and no flag;
* no JAX backend has been initialised yet. XLA reads ``XLA_FLAGS`` when the
  first backend starts, so a flag added later would have no effect: a warning
  says so and nothing is written.

Importing ``jax`` and calling ``jax.config.update`` do not start a backend;
the first array operation, ``jax.devices()`` or a compilation do. The check
therefore looks for an initialised backend only when ``jax`` was already
imported, and never imports ``jax`` itself.

Under pytest, ``tests/conftest.py`` imports ``jax`` and sets configuration
options, which starts no backend; the test modules then import ``jaxkd`` while
they are collected, before any test runs, so the test process gets the flag
too (``tests/test_cpu_flags.py`` checks it). A ``conftest.py`` that ran an
array operation before importing ``jaxkd`` would lose the flag, with a
warning.

The warnings never stop the import: should a warnings filter turn them into
errors (``-W error``, pytest's ``filterwarnings = error``), the message is
logged instead.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import sys
import warnings
from typing import MutableMapping

OPTION = "xla_cpu_experimental_ynn_fusion_type"
FLAG = f"--{OPTION}=-individual_convolution"
OPT_OUT_VARIABLE = "JAXKD_NO_CPU_FLAGS"
# jaxlib releases on which FLAG was parsed and measured to help. XLA aborts on
# an unknown flag, so a release is added here only after checking it.
VERIFIED_JAXLIB_VERSIONS = frozenset({"0.10.2"})

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


def apply_default_cpu_flags(
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
        " does not know). Convolutions on XLA:CPU may be slower. Set the flag"
        f" yourself if your jaxlib has it, or {OPT_OUT_VARIABLE}=1 to silence"
        " this.",
    )
    return False
  if backend_initialized():
    _warn_once(
        "initialized",
        f"jaxkd could not set `{FLAG}` in XLA_FLAGS: a JAX backend was"
        " already initialised when jaxkd was imported, and XLA reads the"
        " flags only once. Import jaxkd before the first JAX computation, or"
        " set the flag in XLA_FLAGS before starting Python, for faster"
        f" convolutions on XLA:CPU ({OPT_OUT_VARIABLE}=1 silences this).",
    )
    return False
  environ["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
  return True
