"""Checkpointable batches of arrays held in memory, built with grain.

:func:`make_array_loader` serves a dict of NumPy arrays (decoded images and
labels of a small data set, a cache of teacher logits, ...) through a grain
``MapDataset`` of *batches*, with one vectorised gather per batch instead of
per-record work:

* epoch ``e`` visits the examples in the order of
  ``np.random.default_rng([seed, e]).permutation(N)`` and ends with its last
  whole global batch (``N mod (batch_size * process_count)`` examples of
  each epoch are left out, a different few every epoch), so every epoch is
  ``N // (batch_size * process_count)`` batches and no batch spans two
  epochs;
* global batch ``t`` holds the ``batch_size * process_count`` examples of
  its slice of its epoch's permutation; process ``i`` of ``P`` takes rows
  ``i, i + P, ...`` of it (strided, as :func:`jaxkd.data.make_loader` splits
  its stream);
* ``MapDataset.range(batches_per_epoch).repeat()`` is the stream of batch
  positions, so grain's iterator state (how many batches were read) is the
  whole state.

The iterator is a :class:`jaxkd.data.BatchIterator`: exact ``get_state`` /
``set_state`` (a JSON-serialisable dict), refused on a loader built with
other arguments or arrays of other shapes.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from jaxkd.data import _loader


class _Batches:
  """Batch position ``t`` -> this process's rows of every array.

  A picklable callable holding the arrays; it caches the permutation of the
  epoch it last served.
  """

  def __init__(self, arrays: Mapping[str, np.ndarray],
               example_axis: Mapping[str, int], *, seed: int,
               num_examples: int, batch_size: int, process_index: int,
               process_count: int):
    self.arrays = dict(arrays)
    self.example_axis = dict(example_axis)
    self.seed = seed
    self.num_examples = num_examples
    self.global_batch = batch_size * process_count
    self.batches_per_epoch = num_examples // self.global_batch
    self.process_index = process_index
    self.process_count = process_count
    self._epoch = None
    self._permutation = None

  def permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._epoch:
      self._permutation = np.random.default_rng(
          [self.seed, epoch]).permutation(self.num_examples)
      self._epoch = epoch
    return self._permutation

  def __call__(self, t: int, within_epoch: int) -> dict[str, np.ndarray]:
    del within_epoch  # t mod batches_per_epoch.
    epoch, within = divmod(int(t), self.batches_per_epoch)
    start = within * self.global_batch
    rows = self.permutation(epoch)[start:start + self.global_batch]
    rows = rows[self.process_index::self.process_count]
    return {
        name: np.take(array, rows, axis=self.example_axis[name])
        for name, array in self.arrays.items()
    }


def _describe(arrays: Mapping[str, np.ndarray],
              example_axis: Mapping[str, int]) -> str:
  # What a saved state must match: names, shapes, dtypes, example axes.
  return ";".join(
      f"{name}:{array.dtype}{list(array.shape)}@{example_axis[name]}"
      for name, array in sorted(arrays.items())
  )


def make_array_loader(
    arrays: Mapping[str, np.ndarray],
    *,
    batch_size: int,
    seed: int,
    example_axis: Mapping[str, int] | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> _loader.BatchIterator:
  """Returns an infinite, shuffled, checkpointable iterator over ``arrays``.

  Args:
    arrays: NumPy arrays with the same number ``N`` of examples along their
      example axis, e.g. ``{"image": [N, H, W, C], "label": [N]}``.
    batch_size: examples per batch on this process (the global batch is
      ``batch_size * process_count``).
    seed: seed of the shuffle, an int in ``[0, 2**32)``.
    example_axis: the axis of each named array that indexes examples
      (default 0), kept in its batches: a teacher cache ``[K, N, C]`` with
      ``{"teacher_logits": 1}`` gives ``[K, B, C]`` batches.
    process_index: this process's shard, default ``jax.process_index()``.
    process_count: number of shards, default ``jax.process_count()``.

  Returns:
    An infinite :class:`BatchIterator` of dicts holding ``batch_size`` rows
    of every array; epoch ``e`` is ``N // (batch_size * process_count)``
    batches in the order of ``default_rng([seed, e]).permutation(N)``.

  Raises:
    ValueError: no arrays, arrays of different lengths, an ``example_axis``
      naming an unknown array or an axis the array lacks, a batch larger than
      this process's share of the examples.
    TypeError: a non-integer size or seed.
  """
  import grain  # pylint: disable=g-import-not-at-top

  if not arrays:
    raise ValueError("`arrays` is empty: pass at least one array.")
  arrays = {name: np.asarray(array) for name, array in arrays.items()}
  example_axis = dict(example_axis or {})
  unknown = sorted(set(example_axis) - set(arrays))
  if unknown:
    raise ValueError(
        f"`example_axis` names {unknown}, which are not in `arrays`"
        f" ({sorted(arrays)})."
    )
  axes = {}
  for name, array in arrays.items():
    axis = example_axis.get(name, 0)
    if array.ndim == 0 or not -array.ndim <= axis < array.ndim:
      raise ValueError(
          f"`example_axis[{name!r}]` is {axis}, but `arrays[{name!r}]` has"
          f" shape {array.shape}."
      )
    axes[name] = axis % array.ndim
  lengths = {name: array.shape[axes[name]] for name, array in arrays.items()}
  if len(set(lengths.values())) != 1:
    raise ValueError(
        f"`arrays` have different numbers of examples along their example"
        f" axes: {lengths}."
    )
  (num_examples,) = set(lengths.values())
  batch_size = _loader.check_int("batch_size", batch_size, minimum=1)
  seed = _loader.check_int("seed", seed, minimum=0, maximum=2**32 - 1)
  process_index, process_count = _loader.resolve_processes(
      process_index, process_count)
  if batch_size * process_count > num_examples:
    raise ValueError(
        f"`batch_size` {batch_size} x {process_count} processes is larger"
        f" than the {num_examples} examples of `arrays`."
    )

  batches = _Batches(arrays, axes, seed=seed, num_examples=num_examples,
                     batch_size=batch_size, process_index=process_index,
                     process_count=process_count)
  # map_with_index: the stream position t (not t mod batches_per_epoch) says
  # which epoch's permutation a batch comes from.
  dataset = grain.MapDataset.range(batches.batches_per_epoch).repeat(
      None).map_with_index(batches)
  config = _loader.LoaderConfig(
      dataset="arrays",
      split="",
      seed=seed,
      train=True,
      batch_size=batch_size,
      num_epochs=None,
      drop_remainder=True,
      process_index=process_index,
      process_count=process_count,
      augment="none",
      num_examples=num_examples,
      worker_count=0,
      arrays=_describe(arrays, axes),
  )
  # The gather is one vectorised copy per batch: no reader threads.
  iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0))
  return _loader.BatchIterator(iter_dataset, config, None, None)
