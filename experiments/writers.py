"""Where a run's numbers go: JSON lines, TensorBoard events, PNG curves.

* :class:`JsonlWriter`: one JSON object per line (``metrics.jsonl``), the
  log the other outputs are rebuilt from; on resume it is cut back to the
  restored step.
* :class:`EventWriter`: TensorBoard scalar event files written without
  TensorFlow or TensorBoard: the file is a sequence of TFRecord frames
  (length, masked CRC-32C, payload, masked CRC-32C) each holding an
  ``Event`` protocol buffer, encoded here by hand (the few fields scalars
  need). ``tensorboard.backend.event_processing.event_accumulator`` reads
  them (tests/test_experiments.py checks it).
* :func:`plot_curves`: loss and accuracy against the epoch, a PNG
  (matplotlib, Agg backend).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import socket
import struct
import time
from typing import Any, Iterable, Mapping

import numpy as np


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


class JsonlWriter:
  """Appends one JSON object per line to ``path``."""

  def __init__(self, path: os.PathLike[str] | str):
    self.path = pathlib.Path(path)

  def write(self, record: Mapping[str, Any]) -> None:
    with self.path.open("a") as f:
      f.write(json.dumps(_jsonable(dict(record))) + "\n")

  def read(self) -> list[dict[str, Any]]:
    if not self.path.exists():
      return []
    return [json.loads(line) for line in self.path.read_text().splitlines()
            if line.strip()]

  def truncate_after(self, step: int) -> list[dict[str, Any]]:
    """Drops the records of steps after ``step``; returns those kept."""
    kept = [r for r in self.read() if int(r.get("step", 0)) <= step]
    self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return kept


# -- TensorBoard event files -------------------------------------------------

# CRC-32C (Castagnoli), reflected polynomial 0x82F63B78, as TFRecord uses.
_CRC_TABLE = []
for _byte in range(256):
  _crc = _byte
  for _ in range(8):
    _crc = (_crc >> 1) ^ (0x82F63B78 if _crc & 1 else 0)
  _CRC_TABLE.append(_crc)


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
  out = bytearray()
  value &= (1 << 64) - 1  # int64 two's complement, as protobuf encodes it.
  while True:
    bits = value & 0x7F
    value >>= 7
    if value:
      out.append(bits | 0x80)
    else:
      out.append(bits)
      return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, file_version: str | None = None,
           scalars: Mapping[str, float] | None = None) -> bytes:
  """An ``Event`` proto: wall_time (1), step (2), file_version (3) or
  summary (5) of ``Summary.Value`` entries with tag (1), simple_value (2)."""
  out = struct.pack("<Bd", 1 << 3 | 1, wall_time)
  out += _varint(2 << 3) + _varint(int(step))
  if file_version is not None:
    out += _field_bytes(3, file_version.encode())
  if scalars:
    values = b"".join(
        _field_bytes(1, _field_bytes(1, tag.encode())
                     + struct.pack("<Bf", 2 << 3 | 5, float(value)))
        for tag, value in scalars.items()
    )
    out += _field_bytes(5, values)
  return out


def _record(payload: bytes) -> bytes:
  header = struct.pack("<Q", len(payload))
  return (header + struct.pack("<I", _masked_crc(header)) + payload
          + struct.pack("<I", _masked_crc(payload)))


class EventWriter:
  """Writes scalar summaries to a TensorBoard event file in ``logdir``."""

  def __init__(self, logdir: os.PathLike[str] | str):
    logdir = pathlib.Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    self.path = logdir / (
        f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
    )
    with self.path.open("ab") as f:
      f.write(_record(_event(now, 0, file_version="brain.Event:2")))

  def scalars(self, step: int, values: Mapping[str, Any]) -> None:
    numbers = {k: float(v) for k, v in values.items()
              if isinstance(v, (int, float, np.number)) and not isinstance(
                  v, bool)}
    if numbers:
      with self.path.open("ab") as f:
        f.write(_record(_event(time.time(), step, scalars=numbers)))


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
