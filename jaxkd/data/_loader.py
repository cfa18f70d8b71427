"""Checkpointable, sharded, deterministic batch iterators built with grain.

:func:`make_loader` turns one split of a data set into an iterator of NumPy
batches ``{"image": float32 [B, H, W, C], "label": int32 [B]}`` (plus
``"mask"`` ``bool [B]`` when the last batch is padded). The pipeline is a
``grain.MapDataset``, so every element is a pure function of its position in
the stream, which is what makes shuffling, sharding and resuming exact:

1. ``MapDataset.source(tfds.data_source(...))``: random access to ``N``
   records.
2. Training only: ``shuffle`` with a seed derived from ``seed``; grain
   reshuffles every epoch (the epoch number is folded into the seed), so
   epoch ``e`` is a fresh permutation that depends only on ``(seed, e)``.
3. ``repeat(num_epochs)`` (infinite when ``None``): one global stream of
   positions ``0, 1, 2, ...``; position ``g`` holds record
   ``permutation_{g // N}[g % N]``.
4. Preprocessing (decode, augment, normalise). Training augmentation uses
   ``random_map``: the generator of position ``g`` is seeded from
   ``(seed, g)``, so it does not depend on threads, workers, resumes or the
   number of processes.
5. Per-process sharding: process ``i`` of ``P`` takes positions
   ``i, i + P, i + 2P, ...``; processes read disjoint records, and together
   the ``t``-th batches of all processes are exactly the positions
   ``[t * P * B, (t + 1) * P * B)`` of the global stream. With finite streams
   every process yields the same number of batches (the last
   ``(length mod P)`` positions are dropped, or, with padding, every process
   pads to the same length), so no process waits for another.
6. Batching, either dropping the incomplete last batch
   (``drop_remainder=True``, the default for training) or padding it with
   zero images and adding ``"mask"``, ``False`` on padding
   (``drop_remainder=False``, the default for evaluation).

Reading runs in grain threads (``num_threads``) or, with
``worker_count > 0``, in worker processes that each prepare single examples
(worker ``w`` of ``n``: positions ``w, w + n, ...``), interleaved back into
stream order before batching: the batches do not depend on either setting.

Device placement is left to the caller: the batches are host NumPy arrays
holding this process's share of the global batch, ready for
``jax.make_array_from_process_local_data`` (``jaxkd.sharding.shard_batch``).

Resuming: :meth:`BatchIterator.get_state` returns a JSON-serialisable dict
(``json.dumps`` works on it; store it as a JSON checkpoint item), and
:meth:`BatchIterator.set_state` on a fresh loader built with the same
arguments continues with exactly the batches the first loader would have
produced next.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from jaxkd.data import _sources, _transforms
from jaxkd.data._registry import AUGMENTATIONS
from jaxkd.data._registry import DatasetSpec
from jaxkd.data._registry import check_split
from jaxkd.data._registry import get_spec

# Version of the state dict returned by `BatchIterator.get_state`.
_STATE_VERSION = 1


def _derive_seed(seed: int, purpose: int) -> int:
  # A 32-bit seed per purpose (0: shuffle, 1: augmentation), mixed by
  # SeedSequence so that nearby user seeds give unrelated streams. (grain
  # reshuffles epoch `e` with `shuffle_seed + e`: without mixing, seed `s` at
  # epoch 1 would replay seed `s + 1` at epoch 0.)
  return int(np.random.SeedSequence([seed, purpose]).generate_state(1)[0])


def check_int(
    name: str, value: Any, *, minimum: int, maximum: int | None = None
) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"`{name}` must be an int, got {value!r}.")
  value = int(value)
  if value < minimum or (maximum is not None and value > maximum):
    if maximum is None:
      bound = f">= {minimum}"
    else:
      bound = f"in [{minimum}, {maximum}]"
    raise ValueError(f"`{name}` must be {bound}, got {value}.")
  return value


def resolve_processes(process_index: int | None,
                      process_count: int | None) -> tuple[int, int]:
  """``(process_index, process_count)``, JAX's where ``None``, checked."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    if process_index is None:
      process_index = jax.process_index()
    if process_count is None:
      process_count = jax.process_count()
  process_count = check_int("process_count", process_count, minimum=1)
  process_index = check_int(
      "process_index", process_index, minimum=0, maximum=process_count - 1
  )
  return process_index, process_count


class _PaddedShard:
  """Position ``j`` of a process's padded shard: a real example or padding.

  Maps ``j`` to the global position ``process_index + j * process_count``;
  positions at or past ``length`` (the end of the global stream) are padding.
  A top-level class, so that grain can pickle it for worker processes.
  """

  def __init__(
      self,
      stream,
      length: int,
      process_index: int,
      process_count: int,
      spec: DatasetSpec,
  ):
    self.stream = stream
    self.length = length
    self.process_index = process_index
    self.process_count = process_count
    self.padding = _transforms.padding_example(spec)

  def __call__(self, j: int) -> dict[str, np.ndarray]:
    position = self.process_index + int(j) * self.process_count
    if position >= self.length:
      return dict(self.padding)
    example = dict(self.stream[position])
    example["mask"] = np.bool_(True)
    return example


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
  """What a state dict must match to be restored (see ``get_state``)."""

  dataset: str
  split: str
  seed: int
  train: bool
  batch_size: int
  num_epochs: int | None
  drop_remainder: bool
  process_index: int
  process_count: int
  augment: str
  num_examples: int
  worker_count: int
  # In-memory loaders (`make_array_loader`): the arrays' names and shapes.
  arrays: str = ""


class BatchIterator(Iterator[dict[str, np.ndarray]]):
  """An iterator of NumPy batches with exact ``get_state`` / ``set_state``.

  Built by :func:`make_loader` and :func:`make_array_loader`. Attributes:

  * ``spec``: the :class:`~jaxkd.data.DatasetSpec` (``None`` for arrays).
  * ``split`` (``""`` for arrays), ``batch_size`` (per process),
    ``process_index``, ``process_count``, ``train``.
  * ``num_examples``: examples in the split or the arrays (all processes
    together).
  * ``num_batches``: batches this iterator yields, ``None`` if infinite.
  """

  def __init__(
      self,
      dataset,
      config: LoaderConfig,
      spec: DatasetSpec | None,
      num_batches: int | None,
  ):
    self._dataset = dataset
    self._iterator = iter(dataset)
    self._config = config
    self.spec = spec
    self.split = config.split
    self.batch_size = config.batch_size
    self.process_index = config.process_index
    self.process_count = config.process_count
    self.train = config.train
    self.num_examples = config.num_examples
    self.num_batches = num_batches

  def __iter__(self) -> BatchIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iterator)

  def get_state(self) -> dict[str, Any]:
    """Returns the position in the stream as a JSON-serialisable dict.

    The dict holds grain's iterator state (``"grain"``: how many elements have
    been consumed) and the loader's arguments, which :meth:`set_state` checks.
    It contains only ints, strings, bools and ``None``.
    """
    return {
        "version": _STATE_VERSION,
        "grain": self._iterator.get_state(),
        "config": dataclasses.asdict(self._config),
    }

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from a state returned by :meth:`get_state`.

    Raises:
      ValueError: the state is malformed or was saved by a loader built with
        different arguments (data set, split, seed, batch size, shard, number
        of worker processes: grain's state has another structure with
        workers).
    """
    if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
      raise ValueError(
          f"`state` must be a dict returned by BatchIterator.get_state (version"
          f" {_STATE_VERSION}), got {state!r}."
      )
    saved = dict(state.get("config") or {})
    # Fields added since a state was saved hold their defaults there.
    for field in dataclasses.fields(self._config):
      if field.default is not dataclasses.MISSING:
        saved.setdefault(field.name, field.default)
    current = dataclasses.asdict(self._config)
    different = {
        key: (saved.get(key), value)
        for key, value in current.items()
        if saved.get(key) != value
    }
    if different:
      details = ", ".join(
          f"{key}: saved {old!r}, now {new!r}"
          for key, (old, new) in different.items()
      )
      raise ValueError(
          "`state` was saved by a loader built with different arguments"
          f" ({details}); resuming would not reproduce the stream."
      )
    self._iterator.set_state(state["grain"])

  def close(self) -> None:
    """Stops prefetch threads and worker processes, if any."""
    close = getattr(self._iterator, "close", None)
    if close is not None:
      close()


def make_loader(
    name: str | DatasetSpec,
    split: str,
    *,
    batch_size: int,
    seed: int,
    train: bool,
    data_dir: str | os.PathLike[str] | None = None,
    num_epochs: int | None = None,
    drop_remainder: bool | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    augment: str | None = None,
    num_threads: int | None = None,
    prefetch_buffer_size: int | None = None,
    worker_count: int = 0,
) -> BatchIterator:
  """Returns a checkpointable iterator over batches of one split.

  Args:
    name: a name in :data:`jaxkd.data.DATASETS` or a :class:`DatasetSpec`.
    split: the split, optionally sliced (``"train[:90%]"``).
    batch_size: examples per batch on this process; the global batch is
      ``batch_size * process_count``.
    seed: seed of the shuffle and of the augmentation, an int in
      ``[0, 2**32)``. The same seed gives the same batches; unused when
      ``train=False``.
    train: training (shuffle every epoch, augment, by default infinite and
      dropping the incomplete last batch) or evaluation (file order, no
      augmentation, one pass, the last batch padded and masked).
    data_dir: the TFDS data directory; default ``$JAXKD_DATA_DIR`` or
      ``~/.cache/jaxkd/tensorflow_datasets``.
    num_epochs: passes over the split; ``None`` means forever for training and
      one pass for evaluation.
    drop_remainder: drop the last incomplete batch (``True``) or pad it and
      add ``"mask"`` to every batch (``False``). Default: ``train``.
    process_index: this process's shard, default ``jax.process_index()``.
    process_count: number of shards, default ``jax.process_count()``.
    augment: ``"none"``, ``"cifar"`` or ``"imagenet"``; default the spec's
      augmentation. Training only: evaluation always uses the deterministic
      preprocessing (``"imagenet"`` data sets: resize and center crop).
    num_threads: grain threads reading and preprocessing records; default
      ``min(8, os.cpu_count())``. Reading and NumPy preprocessing hold the
      GIL for much of the time, so more threads than cores only add
      contention.
    prefetch_buffer_size: examples read ahead per process; default
      ``2 * batch_size`` (at least 16).
    worker_count: if > 0, preprocess in that many grain worker processes
      (``mp_prefetch``). Worker processes are started with the ``spawn``
      method: the entry point must be guarded by
      ``if __name__ == "__main__":``.

  Returns:
    A :class:`BatchIterator` of dicts ``{"image": float32 [B, H, W, C],
    "label": int32 [B]}`` (and ``"mask"`` ``bool [B]`` when
    ``drop_remainder=False``), with ``(H, W, C) = spec.image_shape`` and images
    normalised as ``(pixels / 255 - mean) / std``.

  Raises:
    ValueError: unknown data set, split or augmentation; bad sizes; images
      whose shape does not match the spec (checked on the first record,
      before anything is compiled, and on every record).
    DatasetNotPreparedError: the data set is not prepared as ArrayRecord.
  """
  spec = get_spec(name)
  check_split(spec, split)
  batch_size = check_int("batch_size", batch_size, minimum=1)
  seed = check_int("seed", seed, minimum=0, maximum=2**32 - 1)
  if not isinstance(train, bool):
    raise TypeError(f"`train` must be a bool, got {train!r}.")
  if num_epochs is not None:
    num_epochs = check_int("num_epochs", num_epochs, minimum=1)
  elif not train:
    num_epochs = 1
  if drop_remainder is None:
    drop_remainder = train
  process_index, process_count = resolve_processes(process_index,
                                                   process_count)
  if augment is None:
    augment = spec.augment if train else "none"
  if augment not in AUGMENTATIONS:
    raise ValueError(
        f"`augment` must be one of {AUGMENTATIONS}, got {augment!r}."
    )
  if not train and augment != "none":
    raise ValueError(
        f"`augment={augment!r}` with `train=False`: evaluation preprocessing"
        " is deterministic; leave `augment` unset."
    )
  if num_threads is None:
    num_threads = min(8, os.cpu_count() or 1)
  num_threads = check_int("num_threads", num_threads, minimum=0)
  worker_count = check_int("worker_count", worker_count, minimum=0)
  if prefetch_buffer_size is None:
    prefetch_buffer_size = max(16, 2 * batch_size)
  prefetch_buffer_size = check_int(
      "prefetch_buffer_size", prefetch_buffer_size, minimum=1
  )

  import grain  # pylint: disable=g-import-not-at-top

  source = _sources.data_source(spec, split, data_dir=data_dir)
  num_examples = len(source)
  if num_examples == 0:
    raise ValueError(f"Split {split!r} of {spec.name!r} is empty.")
  # Fail on a wrong image shape now, before a model is compiled for it.
  preprocess = _transforms.Preprocess(spec, augment)
  preprocess(source[0])

  dataset = grain.MapDataset.source(source)
  if train:
    dataset = dataset.shuffle(seed=_derive_seed(seed, 0))
  dataset = dataset.repeat(num_epochs)
  if train and augment != "none":
    dataset = dataset.random_map(preprocess, seed=_derive_seed(seed, 1))
  else:
    dataset = dataset.map(preprocess)
  length = len(dataset)  # sys.maxsize when infinite
  infinite = num_epochs is None

  if infinite:
    shard = dataset[process_index::process_count]
    num_batches = None
    if not drop_remainder:  # No last batch to pad; keep the keys uniform.
      shard = shard.map(_with_true_mask)
  elif drop_remainder:
    # The same number of positions on every process.
    per_process = length // process_count
    end = per_process * process_count
    shard = dataset[process_index:end:process_count]
    num_batches = per_process // batch_size
  else:
    # Every process pads its shard to the same whole number of batches.
    per_process = -(-length // process_count)
    num_batches = -(-per_process // batch_size)
    shard = grain.MapDataset.range(num_batches * batch_size).map(
        _PaddedShard(dataset, length, process_index, process_count, spec)
    )

  iter_dataset = shard.to_iter_dataset(
      grain.ReadOptions(
          num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size
      )
  )
  if worker_count:
    from absl import flags  # pylint: disable=g-import-not-at-top

    # grain's worker processes read absl flags (with their defaults). In a
    # program that does not parse flags itself (no `absl.app.run`), reading
    # them raises UnparsedFlagAccessError; accept the defaults instead.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    # Workers produce single examples (worker w: positions w, w + n, ...),
    # interleaved back into stream order, and batching happens here: the
    # batches are the same for any number of workers. (Batching inside the
    # workers would give each batch positions w, w + n, ... instead.)
    iter_dataset = iter_dataset.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=worker_count)
    )
  iter_dataset = iter_dataset.batch(batch_size, drop_remainder=drop_remainder)
  config = LoaderConfig(
      dataset=spec.name,
      split=split,
      seed=seed,
      train=train,
      batch_size=batch_size,
      num_epochs=num_epochs,
      drop_remainder=drop_remainder,
      process_index=process_index,
      process_count=process_count,
      augment=augment,
      num_examples=num_examples,
      worker_count=worker_count,
  )
  return BatchIterator(iter_dataset, config, spec, num_batches)


def _with_true_mask(example: dict[str, Any]) -> dict[str, Any]:
  return {**example, "mask": np.bool_(True)}
