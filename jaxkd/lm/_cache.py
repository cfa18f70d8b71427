"""An offline cache of a teacher's per-token top-k log-probabilities.

Running a large teacher once over the training set and storing, for every
token, its ``k`` most likely next tokens and their log-probabilities
(:func:`jaxkd.lm.top_k_log_probs`) turns distillation into reading a file.
Stored compactly, a token costs ``k * (2 + 2)`` bytes for vocabularies of up
to 65,536 entries (uint16 ids and 16-bit log-probabilities) and
``k * (4 + 2)`` above, instead of ``4 V`` for float32 logits: with
``k = 32`` and ``V = 128k``, 192 bytes instead of 512 KiB.

On disk a cache is a directory holding ``cache.array_record``, one
ArrayRecord record per sequence, and ``metadata.json``. A record is

* a little-endian ``uint32`` header ``[L, k]``,
* the ids, ``[L, k]`` little-endian ``uint16`` (``V <= 65536``) or
  ``int32``,
* the log-probabilities, ``[L, k]`` float16 or bfloat16 stored as their
  little-endian 16-bit patterns (ArrayRecord stores bytes).

Record ``i`` belongs to the ``i``-th sequence written, so it lines up with
example ``i`` of the data set that was fed to the teacher. Reading goes
through grain (``grain.sources.ArrayRecordDataSource`` and
``grain.MapDataset``), whose iterators resume exactly from
``get_state()``.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax.numpy as jnp
import numpy as np

# grain and array_record are imported where they are used: importing grain
# takes about as long as importing jax, and `import jaxkd.lm` should not pay
# for it unless a cache is opened.

__all__ = ["TeacherCache", "TeacherCacheWriter"]

RECORDS_FILE = "cache.array_record"
METADATA_FILE = "metadata.json"
_FORMAT = "jaxkd.lm.teacher_top_k"
_VERSION = 1
_HEADER = np.dtype("<u4")
_LOG_PROB_DTYPES = {"float16": np.dtype(np.float16),
                    "bfloat16": np.dtype(jnp.bfloat16)}


def _index_dtype(vocab_size: int) -> np.dtype:
  """uint16 while every id fits in 16 bits, else int32 (little-endian)."""
  return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<i4")


def _encode(log_probs: np.ndarray, indices: np.ndarray, index_dtype,
            log_prob_dtype) -> bytes:
  length, k = indices.shape
  bits = log_probs.astype(log_prob_dtype).view(np.uint16).astype("<u2")
  return b"".join((
      np.array([length, k], _HEADER).tobytes(),
      indices.astype(index_dtype).tobytes(),
      bits.tobytes(),
  ))


def _decode(record: bytes, index_dtype, log_prob_dtype) -> dict[str, Any]:
  length, k = (int(v) for v in np.frombuffer(record, _HEADER, count=2))
  offset = 2 * _HEADER.itemsize
  count = length * k
  indices = np.frombuffer(record, index_dtype, count=count, offset=offset)
  offset += count * index_dtype.itemsize
  bits = np.frombuffer(record, "<u2", count=count, offset=offset)
  if offset + 2 * count != len(record):
    raise ValueError(
        f"A cache record of {len(record)} bytes does not hold the {length} x"
        f" {k} entries its header announces; the file is corrupt or of"
        " another format."
    )
  log_probs = bits.astype(np.uint16).view(log_prob_dtype).astype(np.float32)
  return {
      "indices": indices.astype(np.int32).reshape(length, k),
      "log_probs": log_probs.reshape(length, k),
  }


class TeacherCacheWriter:
  """Writes per-token top-k (ids, log-probabilities) to a cache directory.

  Use it as a context manager, or call :meth:`close` (which writes
  ``metadata.json``; a cache without it cannot be opened).

  Args:
    directory: The cache directory (created; must not hold a cache yet).
    vocab_size: The teacher's vocabulary size ``V``; ids must lie in
      ``[0, V)``. It fixes the id dtype: uint16 for ``V <= 65536``, else
      int32.
    k: Number of tokens kept per position.
    log_prob_dtype: ``"float16"`` (default: 11 significant bits, enough for
      log-probabilities down to about -65504) or ``"bfloat16"`` (8 bits, the
      float32 range).
    temperature: The temperature the log-probabilities were computed at,
      recorded in the metadata.
    options: ArrayRecord writer options; ``"group_size:1"`` keeps every
      record independently readable (fast random access).

  Examples:
    >>> import tempfile, jax.numpy as jnp
    >>> from jaxkd import lm
    >>> log_probs, ids = lm.top_k_log_probs(jnp.zeros((5, 100)), 4)
    >>> directory = tempfile.mkdtemp()
    >>> with lm.TeacherCacheWriter(directory, vocab_size=100, k=4) as writer:
    ...   writer.write(log_probs, ids)
    >>> cache = lm.TeacherCache(directory)
    >>> print(len(cache), cache.bytes_per_token, cache[0]["indices"].shape)
    1 16 (5, 4)
  """

  def __init__(
      self,
      directory: str | os.PathLike[str],
      *,
      vocab_size: int,
      k: int,
      log_prob_dtype: str = "float16",
      temperature: float = 1.0,
      options: str = "group_size:1",
  ):
    for name, value in (("vocab_size", vocab_size), ("k", k)):
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an int, got {value!r}.")
      if value < 1:
        raise ValueError(f"`{name}` must be >= 1, got {value}.")
    if k > vocab_size:
      raise ValueError(f"`k`={k} exceeds `vocab_size`={vocab_size}.")
    if log_prob_dtype not in _LOG_PROB_DTYPES:
      raise ValueError(
          "`log_prob_dtype` must be one of"
          f" {', '.join(map(repr, _LOG_PROB_DTYPES))}; got {log_prob_dtype!r}."
      )
    self._directory = pathlib.Path(directory)
    self._directory.mkdir(parents=True, exist_ok=True)
    if (self._directory / METADATA_FILE).exists():
      raise FileExistsError(
          f"{self._directory} already holds a teacher cache"
          f" ({METADATA_FILE}); write to a new directory."
      )
    self._vocab_size, self._k = int(vocab_size), int(k)
    self._index_dtype = _index_dtype(self._vocab_size)
    self._log_prob_name = log_prob_dtype
    self._log_prob_dtype = _LOG_PROB_DTYPES[log_prob_dtype]
    self._temperature = float(temperature)
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

    self._writer = array_record_module.ArrayRecordWriter(
        os.fspath(self._directory / RECORDS_FILE), options
    )
    self._records = 0
    self._tokens = 0

  def write(self, log_probs: Any, indices: Any) -> None:
    """Appends one sequence: ``log_probs`` and ``indices`` of shape ``[L, k]``.

    Args:
      log_probs: Floating log-probabilities ``[L, k]`` (any float dtype; they
        are rounded to the cache's 16-bit dtype).
      indices: Integer token ids ``[L, k]`` in ``[0, vocab_size)``.
    """
    if self._writer is None:
      raise ValueError("This TeacherCacheWriter is closed.")
    log_probs = np.asarray(log_probs)
    indices = np.asarray(indices)
    if not np.issubdtype(indices.dtype, np.integer):
      raise TypeError(f"`indices` must be integer, got {indices.dtype}.")
    if not np.issubdtype(log_probs.dtype, np.floating):
      log_probs = log_probs.astype(np.float32)  # bfloat16 is not a subdtype.
    if indices.ndim != 2 or indices.shape[1] != self._k:
      raise ValueError(
          f"`indices` must have shape [L, {self._k}], got {indices.shape}."
      )
    if log_probs.shape != indices.shape:
      raise ValueError(
          f"`log_probs` must have the shape of `indices` {indices.shape}, got"
          f" {log_probs.shape}."
      )
    if indices.size and (indices.min() < 0
                         or indices.max() >= self._vocab_size):
      raise ValueError(
          f"`indices` must lie in [0, {self._vocab_size}), got values in"
          f" [{indices.min()}, {indices.max()}]."
      )
    self._writer.write(
        _encode(log_probs, indices, self._index_dtype, self._log_prob_dtype)
    )
    self._records += 1
    self._tokens += indices.shape[0]

  def write_batch(
      self, log_probs: Any, indices: Any, lengths: Any | None = None
  ) -> None:
    """Appends ``B`` sequences from ``[B, L, k]`` arrays.

    Args:
      log_probs: ``[B, L, k]`` log-probabilities.
      indices: ``[B, L, k]`` token ids.
      lengths: Optional ``[B]`` valid lengths: sequence ``b`` keeps its first
        ``lengths[b]`` positions (right padding is dropped).
    """
    log_probs, indices = np.asarray(log_probs), np.asarray(indices)
    if indices.ndim != 3:
      raise ValueError(
          f"`indices` must have shape [B, L, k], got {indices.shape}."
      )
    if lengths is None:
      lengths = np.full(indices.shape[0], indices.shape[1])
    lengths = np.asarray(lengths)
    if lengths.shape != indices.shape[:1]:
      raise ValueError(
          f"`lengths` must have shape ({indices.shape[0]},), got"
          f" {lengths.shape}."
      )
    for b in range(indices.shape[0]):
      n = int(lengths[b])
      self.write(log_probs[b, :n], indices[b, :n])

  def close(self) -> None:
    """Finishes the records file and writes ``metadata.json``."""
    if self._writer is None:
      return
    self._writer.close()
    self._writer = None
    metadata = {
        "format": _FORMAT,
        "version": _VERSION,
        "vocab_size": self._vocab_size,
        "k": self._k,
        "index_dtype": self._index_dtype.name,
        "log_prob_dtype": self._log_prob_name,
        "temperature": self._temperature,
        "num_records": self._records,
        "num_tokens": self._tokens,
    }
    (self._directory / METADATA_FILE).write_text(
        json.dumps(metadata, indent=2) + "\n", encoding="utf-8"
    )

  def __enter__(self) -> "TeacherCacheWriter":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


class TeacherCache:
  """Reads a cache written by :class:`TeacherCacheWriter`.

  ``cache[i]`` is record ``i`` decoded: ``{"indices": int32 [L, k],
  "log_probs": float32 [L, k]}``. :meth:`dataset` gives the same records as
  a ``grain.MapDataset``; its iterators resume exactly::

    iterator = iter(cache.dataset())
    ...
    state = iterator.get_state()      # JSON-serialisable
    resumed = iter(cache.dataset())
    resumed.set_state(state)          # continues where `iterator` was

  Args:
    directory: A directory holding ``metadata.json`` and
      ``cache.array_record``.

  Attributes:
    metadata: The dict of ``metadata.json`` (``vocab_size``, ``k``, dtypes,
      ``temperature``, ``num_records``, ``num_tokens``).
  """

  def __init__(self, directory: str | os.PathLike[str]):
    self._directory = pathlib.Path(directory)
    metadata_path = self._directory / METADATA_FILE
    if not metadata_path.exists():
      raise FileNotFoundError(
          f"No teacher cache in {self._directory}: {METADATA_FILE} is"
          " missing (was the TeacherCacheWriter closed?)."
      )
    self.metadata = json.loads(metadata_path.read_text(encoding="utf-8"))
    if (self.metadata.get("format") != _FORMAT
        or self.metadata.get("version") != _VERSION):
      raise ValueError(
          f"{metadata_path} is not a version-{_VERSION} {_FORMAT} cache:"
          f" format {self.metadata.get('format')!r}, version"
          f" {self.metadata.get('version')!r}."
      )
    self._index_dtype = np.dtype(self.metadata["index_dtype"]).newbyteorder(
        "<"
    )
    self._log_prob_dtype = _LOG_PROB_DTYPES[self.metadata["log_prob_dtype"]]
    import grain  # pylint: disable=g-import-not-at-top

    self._source = grain.sources.ArrayRecordDataSource(
        os.fspath(self._directory / RECORDS_FILE)
    )
    if len(self._source) != self.metadata["num_records"]:
      raise ValueError(
          f"{self._directory / RECORDS_FILE} holds {len(self._source)}"
          f" records, the metadata says {self.metadata['num_records']}."
      )

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._decode(self._source[index])

  def _decode(self, record: bytes) -> dict[str, Any]:
    return _decode(record, self._index_dtype, self._log_prob_dtype)

  @property
  def bytes_per_token(self) -> int:
    """Stored bytes per token: ``k * (id bytes + log-probability bytes)``.

    The payload only; :attr:`file_bytes_per_token` adds the per-record
    header and the file format's own overhead.
    """
    return self.metadata["k"] * (self._index_dtype.itemsize + 2)

  @property
  def file_bytes_per_token(self) -> float:
    """The records file's size over the number of tokens it holds."""
    size = os.path.getsize(self._directory / RECORDS_FILE)
    return size / max(1, self.metadata["num_tokens"])

  def dataset(self) -> "grain.MapDataset":
    """The decoded records as a ``grain.MapDataset`` (random access)."""
    import grain  # pylint: disable=g-import-not-at-top

    return grain.MapDataset.source(self._source).map(self._decode)
