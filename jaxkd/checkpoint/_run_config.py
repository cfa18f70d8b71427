"""The run's config, stored with its checkpoints; a resume checks it.

``<directory>/config.json`` holds the config of the run's first start and
is never rewritten while the directory holds a step. Every start appends to
``<directory>/config_history.jsonl`` (one JSON object a line: ``event``,
``step``, ``time``, ``config`` and, for a change, ``changes``). A start with
another config than the last one recorded is refused, with the changed
fields listed, unless every changed field is one that may change on resume
or the caller allows the change; an allowed change is recorded in the
history. Private module of :mod:`jaxkd.checkpoint`.
"""

from __future__ import annotations

import datetime
import fnmatch
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath

from jaxkd.checkpoint._trees import _to_json

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"

logger = logging.getLogger("jaxkd.checkpoint")


class ConfigMismatchError(ValueError):
  """A run resumed with another config than the one it was saved with.

  .. versionadded:: 0.1.0
  """


class _Absent:
  def __repr__(self) -> str:
    return "<absent>"


_ABSENT = _Absent()


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested mappings as ``{"a.b": value}``; lists are values."""
  out = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping) and value:
      out.update(flatten(value, name + "."))
    else:
      out[name] = value
  return out


def changes(old: Mapping[str, Any], new: Mapping[str, Any]
            ) -> dict[str, tuple[Any, Any]]:
  """``{dotted key: (old, new)}`` of the fields that differ."""
  old, new = flatten(old), flatten(new)
  return {key: (old.get(key, _ABSENT), new.get(key, _ABSENT))
          for key in sorted(set(old) | set(new))
          if old.get(key, _ABSENT) != new.get(key, _ABSENT)}


def _text(value: Any) -> str:
  return repr(value) if value is _ABSENT else json.dumps(value)


def describe(diff: Mapping[str, tuple[Any, Any]]) -> str:
  """``"kd.temperature: 4.0 -> 2.0; method: \\"kd\\" -> \\"dkd\\""``."""
  return "; ".join(f"{key}: {_text(a)} -> {_text(b)}"
                   for key, (a, b) in diff.items())


def _read_history(path: epath.Path) -> list[dict[str, Any]]:
  if not path.exists():
    return []
  entries = []
  for number, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      entries.append(json.loads(line))
    except ValueError:
      logger.warning("Skipping unreadable line %d of %s.", number, path)
  return entries


def _append(path: epath.Path, entry: Mapping[str, Any]) -> None:
  with path.open("a") as f:
    f.write(json.dumps(entry) + "\n")


def _write_atomically(path: epath.Path, text: str) -> None:
  tmp = path.parent / f".{path.name}.tmp"
  tmp.write_text(text)
  tmp.replace(path)


def record_config(
    directory: epath.Path,
    config: Mapping[str, Any],
    *,
    latest_step: int | None,
    allow_change: bool,
    changeable: Sequence[str],
) -> None:
  """Stores ``config`` with the checkpoints in ``directory``, or refuses it.

  Args:
    directory: The checkpoint directory.
    config: The run's config (JSON-able).
    latest_step: The latest step on disk (``None``: nothing to resume, so
      ``config`` starts the run afresh).
    allow_change: Accept any change (it is recorded, marked ``forced``).
    changeable: ``fnmatch`` patterns of the dotted keys that may change on
      resume without ``allow_change``.

  Raises:
    TypeError: If ``config`` is not a JSON-able mapping.
    ConfigMismatchError: If fields outside ``changeable`` changed and
      ``allow_change`` is False; nothing is written then.
  """
  if not isinstance(config, Mapping):
    raise TypeError(
        f"`config` must be a mapping, got {type(config).__name__}.")
  config = _to_json(dict(config), name="config")
  config_path = directory / CONFIG_FILE
  history_path = directory / HISTORY_FILE
  now = datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec="seconds")
  if latest_step is None or not config_path.exists():
    if config_path.exists():
      event = "restart"  # The directory holds no step: nothing resumes.
    else:
      event = "start" if latest_step is None else "adopted"
    _write_atomically(config_path, json.dumps(config, indent=2) + "\n")
    _append(history_path, {"event": event, "step": latest_step, "time": now,
                           "config": config})
    return
  recorded = [e for e in _read_history(history_path)
              if isinstance(e, dict) and isinstance(e.get("config"), dict)]
  current = (recorded[-1]["config"] if recorded
             else json.loads(config_path.read_text()))
  diff = changes(current, config)
  if not diff:
    return
  refused = {key: change for key, change in diff.items()
             if not any(fnmatch.fnmatchcase(key, p) for p in changeable)}
  if refused and not allow_change:
    raise ConfigMismatchError(
        f"The checkpoints in {directory} (latest step {latest_step}) were"
        f" saved with another config. Changed: {describe(refused)}. Resume"
        " with the saved config, use a fresh directory, or allow the change"
        " (it is recorded in"
        f" {history_path.name}; the experiments take"
        " --config.allow_config_change=True).")
  _append(history_path, {
      "event": "change", "step": latest_step, "time": now,
      "forced": bool(refused),
      "changes": {key: {"old": None if a is _ABSENT else a,
                        "new": None if b is _ABSENT else b}
                  for key, (a, b) in diff.items()},
      "config": config})
  if refused:
    logger.warning("Resuming %s at step %d with a changed config (allowed):"
                   " %s.", directory, latest_step, describe(refused))
