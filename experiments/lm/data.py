"""The bytes of the Python standard library's ``*.py`` files, split by file.

Files are listed under ``sysconfig.get_paths()["stdlib"]`` (``site-packages``
and ``dist-packages`` left out), sorted by relative path, shuffled with a
fixed seed and split by file into train, validation and test, so no file
contributes to two splits. :func:`fingerprint` records what a reader needs
to know exactly which bytes were used: the Python version, the number of
files and a sha256 of the sorted ``path<TAB>size`` lines.

Each split is one byte stream (the files joined by a newline). Training
batches are windows at random offsets of the *train* stream only, served as
a ``grain.MapDataset`` of batches (:meth:`Splits.train_batches`: random
access, so a run can resume at any step); evaluation windows are evenly spaced,
non-overlapping windows of the validation or test stream
(:meth:`Splits.eval_windows`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import platform
import sysconfig
from typing import Sequence

import grain
import numpy as np

__all__ = ["Splits", "fingerprint", "list_files", "load", "split_files"]

_EXCLUDED_PARTS = ("site-packages", "dist-packages")


def list_files(root: str | None = None) -> tuple[pathlib.Path, list[str]]:
  """The stdlib root and its ``*.py`` files (relative paths, sorted)."""
  base = pathlib.Path(root or sysconfig.get_paths()["stdlib"])
  files = sorted(
      p.relative_to(base).as_posix() for p in base.rglob("*.py")
      if p.is_file() and not any(x in p.relative_to(base).parts
                                 for x in _EXCLUDED_PARTS)
  )
  if not files:
    raise ValueError(f"No *.py files under {base}.")
  return base, files


def fingerprint(base: pathlib.Path, files: Sequence[str]) -> dict:
  """Python version, file count, total size and sha256 of path/size lines."""
  digest = hashlib.sha256()
  total = 0
  for name in files:
    size = (base / name).stat().st_size
    total += size
    digest.update(f"{name}\t{size}\n".encode())
  return {"python": platform.python_version(), "stdlib": str(base),
          "files": len(files), "bytes": total,
          "sha256_sorted_paths_and_sizes": digest.hexdigest()}


def split_files(files: Sequence[str], *, seed: int,
                fractions: tuple[float, float] = (0.05, 0.05)
                ) -> dict[str, list[str]]:
  """``{"train", "validation", "test"}`` lists: a seeded shuffle, by file."""
  order = np.random.default_rng(seed).permutation(len(files))
  n_val = max(1, int(round(fractions[0] * len(files))))
  n_test = max(1, int(round(fractions[1] * len(files))))
  if n_val + n_test >= len(files):
    raise ValueError(f"{len(files)} files are too few to split.")
  shuffled = [files[i] for i in order]
  return {"validation": sorted(shuffled[:n_val]),
          "test": sorted(shuffled[n_val:n_val + n_test]),
          "train": sorted(shuffled[n_val + n_test:])}


def _stream(base: pathlib.Path, files: Sequence[str],
            max_bytes: int | None) -> np.ndarray:
  parts, size = [], 0
  for name in files:
    raw = (base / name).read_bytes() + b"\n"
    parts.append(raw)
    size += len(raw)
    if max_bytes is not None and size >= max_bytes:
      break
  data = b"".join(parts)
  if max_bytes is not None:
    data = data[:max_bytes]
  return np.frombuffer(data, np.uint8)


@dataclasses.dataclass(frozen=True)
class Splits:
  """The three byte streams and the files behind them."""

  train: np.ndarray
  validation: np.ndarray
  test: np.ndarray
  files: dict[str, list[str]]
  info: dict

  def train_batches(self, *, seed: int, steps: int, batch_size: int,
                    length: int) -> grain.MapDataset:
    """Batch ``i`` of training: ``{"tokens": [B, L] int32}`` train windows.

    The windows' starts are drawn up front, batch after batch, from
    ``np.random.default_rng(seed)`` (``B`` integers in
    ``[0, train.size - L)`` per batch), so batch ``i`` does not depend on
    which batches were read before it; the dataset holds ``steps`` batches.
    """
    if steps < 1:
      raise ValueError(f"`steps` must be >= 1, got {steps}.")
    high = self.train.size - length
    if high < 1:
      raise ValueError(
          f"The train split holds {self.train.size} bytes, fewer than"
          f" `length` + 1 = {length + 1}.")
    rng = np.random.default_rng(seed)
    starts = np.stack(
        [rng.integers(0, high, size=batch_size) for _ in range(steps)])
    offsets = np.arange(length)
    stream = self.train

    def batch(i: int) -> dict[str, np.ndarray]:
      return {"tokens": stream[starts[i][:, None] + offsets].astype(np.int32)}

    return grain.MapDataset.range(steps).map(batch)

  def eval_windows(self, split: str, count: int,
                   length: int) -> np.ndarray:
    """``[count, L]`` evenly spaced non-overlapping windows of a split."""
    if split not in ("validation", "test"):
      raise ValueError(f"`split` must be 'validation' or 'test', got {split!r}.")
    stream = getattr(self, split)
    count = min(count, stream.size // length)
    if count < 1:
      raise ValueError(f"The {split} split holds fewer than {length} bytes.")
    stride = stream.size // count
    starts = np.arange(count) * stride
    return np.stack([stream[s:s + length] for s in starts]).astype(np.int32)


def load(*, seed: int, fractions: tuple[float, float] = (0.05, 0.05),
         max_train_bytes: int | None = None, root: str | None = None
         ) -> Splits:
  """Lists, fingerprints, splits and reads the standard library."""
  base, files = list_files(root)
  split = split_files(files, seed=seed, fractions=fractions)
  info = fingerprint(base, files)
  streams = {
      name: _stream(base, names, max_train_bytes if name == "train" else None)
      for name, names in split.items()
  }
  info.update({f"{name}_files": len(names) for name, names in split.items()})
  info.update({f"{name}_bytes": int(streams[name].size) for name in split})
  info["split_seed"] = seed
  return Splits(files=split, info=info, **streams)
