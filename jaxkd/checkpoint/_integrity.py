"""Integrity of saved steps: checksums, a file manifest, quarantine.

Two layers, both BLAKE2b with 16-byte digests:

* Per-leaf checksums of the arrays (over dtype, shape and bytes), computed
  from the host copy when a step is saved and stored in the step's JSON
  ``extra`` item; checked against the arrays Orbax restores. They catch any
  change of a value, wherever it comes from.
* A manifest of every file of a step directory (size and digest), written
  once Orbax has committed the step (:func:`seal`) and checked before Orbax
  reads anything (:func:`check_files`). It catches damage that no restored
  value shows (a flipped bit in an index node Orbax does not read back, a
  deleted ``_sharding``) and keeps damaged files away from TensorStore,
  which reports them noisily.

A step saved by a process that died before sealing it has no manifest; it
is still checked leaf by leaf. Private module of :mod:`jaxkd.checkpoint`.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import sys
import time
from typing import Any, Iterator, Mapping

from etils import epath
import jax
import numpy as np

from jaxkd.checkpoint._trees import PyTree
from jaxkd.checkpoint._trees import _path_str

ALGORITHM = "blake2b-128"
MANIFEST = "jaxkd_files.json"
_CHUNK = 1 << 22
# Loggers that report Orbax's and TensorStore's failures while a damaged
# step is read; the Checkpointer reports one line instead.
_NOISY_LOGGERS = ("absl", "orbax")


class CorruptCheckpointError(ValueError):
  """A checkpoint step is damaged, or no step is intact.

  .. versionadded:: 0.1.0
  """


class Damage(Exception):
  """What is wrong with one step (internal: restore turns it into a
  fallback or a :class:`CorruptCheckpointError`)."""


def _digest() -> Any:
  return hashlib.blake2b(digest_size=16)


def leaf_digest(array: np.ndarray) -> str:
  """The checksum of one host array: dtype, shape and C-order bytes."""
  array = np.ascontiguousarray(array)
  h = _digest()
  h.update(f"{array.dtype.str}{array.shape}".encode())
  h.update(memoryview(array).cast("B"))
  return h.hexdigest()


def tree_digests(tree: PyTree) -> dict[str, str | None]:
  """``{leaf path: checksum}`` of a tree of arrays (one host copy).

  A leaf this process cannot read whole (sharded over several hosts) gets
  ``None`` and is not checked.
  """
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  readable = [getattr(x, "is_fully_addressable", True) for _, x in leaves]
  host = jax.device_get([x for (_, x), ok in zip(leaves, readable) if ok])
  host = iter(host)
  return {
      _path_str(path): leaf_digest(np.asarray(next(host))) if ok else None
      for (path, _), ok in zip(leaves, readable)
  }


def check_tree(tree: PyTree, expected: Mapping[str, str | None]) -> None:
  """Raises :class:`Damage` naming the first leaf that differs."""
  got = tree_digests(tree)
  for path, digest in expected.items():
    if digest is None:
      continue
    if path not in got:
      raise Damage(f"leaf {path} is missing")
    if got[path] != digest:
      raise Damage(f"leaf {path} does not match its checksum")


def json_digest(value: Any) -> str:
  """The checksum of a JSON value (canonical text: sorted keys)."""
  h = _digest()
  h.update(json.dumps(value, sort_keys=True, separators=(",", ":")).encode())
  return h.hexdigest()


# -- The file manifest ------------------------------------------------------


def _files(root: epath.Path) -> Iterator[tuple[str, epath.Path]]:
  stack = [(root, "")]
  while stack:
    directory, prefix = stack.pop()
    for child in sorted(directory.iterdir(), key=lambda p: p.name):
      rel = prefix + child.name
      if child.is_dir():
        stack.append((child, rel + "/"))
      elif rel != MANIFEST and not child.name.startswith(f".{MANIFEST}"):
        yield rel, child


def _file_digest(path: epath.Path) -> str:
  h = _digest()
  with path.open("rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
  return h.hexdigest()


def seal(step_dir: epath.Path) -> None:
  """Writes the manifest of every file of a committed step directory."""
  files = {rel: [path.stat().length, _file_digest(path)]
           for rel, path in _files(step_dir)}
  text = json.dumps({"algorithm": ALGORITHM, "files": files}, indent=1)
  tmp = step_dir / f".{MANIFEST}.tmp"
  tmp.write_text(text)
  tmp.replace(step_dir / MANIFEST)


def is_sealed(step_dir: epath.Path) -> bool:
  return (step_dir / MANIFEST).exists()


def check_files(step_dir: epath.Path) -> None:
  """Raises :class:`Damage` unless every file of the manifest is intact.

  A step without a manifest passes (its arrays are still checked).
  """
  path = step_dir / MANIFEST
  if not path.exists():
    return
  try:
    manifest = json.loads(path.read_text())
    files = manifest["files"]
  except (ValueError, KeyError, TypeError) as e:
    raise Damage(f"{MANIFEST} is unreadable ({e})") from None
  for rel, (size, digest) in files.items():
    file = step_dir / rel
    if not file.exists():
      raise Damage(f"file {rel} is missing")
    actual = file.stat().length
    if actual != size:
      raise Damage(f"file {rel} has {actual} bytes, {size} when saved")
    if _file_digest(file) != digest:
      raise Damage(f"file {rel} does not match its checksum")


def quarantine(step_dir: epath.Path) -> epath.Path:
  """Renames a damaged step aside, to ``<step>.corrupt-<n>``.

  Orbax lists only directories named by a step number, so it no longer
  sees the step; no file is deleted.
  """
  n = 1
  while (target := step_dir.parent / f"{step_dir.name}.corrupt-{n}").exists():
    n += 1
  step_dir.rename(target)
  return target


# -- Quiet reads --------------------------------------------------------------


def first_line(error: BaseException, limit: int = 160) -> str:
  """``Type: first line of the message``, cut to ``limit`` characters."""
  text = (str(error).strip().splitlines() or [""])[0]
  # TensorStore appends its spec (dozens of lines) to every error.
  text = text.split(" See full TensorStore details")[0]
  if len(text) > limit:
    text = text[:limit - 3] + "..."
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


_mute_until = 0.0
_previous_hook = None


def _is_orbax_coroutine(obj: Any) -> bool:
  code = getattr(obj, "cr_code", None)
  return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


def _unraisable_hook(unraisable: Any) -> None:
  error = unraisable.exc_value
  if _is_orbax_coroutine(unraisable.object) or (
      time.monotonic() < _mute_until and isinstance(error, RuntimeError)
      and str(error) == "Event loop is closed"):
    return
  (_previous_hook or sys.__unraisablehook__)(unraisable)


def _mute_failed_read_leftovers(seconds: float = 60.0) -> None:
  """Drops the late reports of a failed Orbax read.

  When a read fails, Orbax's event loop closes while TensorStore still
  completes the other reads of the step: each completion then reports
  ``RuntimeError: Event loop is closed`` through ``sys.unraisablehook``,
  up to seconds later (dropped for ``seconds``), and Orbax's unfinished read
  coroutines raise again when they are garbage-collected (always dropped;
  nothing else runs Orbax's read coroutines to their end). Everything else
  reaches the previous hook.
  """
  global _mute_until, _previous_hook
  _mute_until = time.monotonic() + seconds
  if sys.unraisablehook is not _unraisable_hook:
    _previous_hook = sys.unraisablehook
    sys.unraisablehook = _unraisable_hook
  gc.collect()  # Most leftover coroutines go now, while muted.


@contextlib.contextmanager
def quiet_orbax() -> Iterator[None]:
  """Silences Orbax's loggers for one read attempt; see above."""
  loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
  disabled = [logger.disabled for logger in loggers]
  for logger in loggers:
    logger.disabled = True
  try:
    yield
  except Exception:
    _mute_failed_read_leftovers()
    raise
  finally:
    for logger, was in zip(loggers, disabled):
      logger.disabled = was
