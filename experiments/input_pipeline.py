"""Batches for the experiments: jaxkd.data loaders, or the splits held in RAM.

:func:`setup` checks the data set, splits, augmentation and image size of a
config (before anything is compiled) and returns a :class:`Data`, which
hands out

* training iterators, infinite, with exact ``get_state`` / ``set_state``:
  ``jaxkd.data.make_loader`` (grain, per-record augmentation), or with
  ``config.in_memory`` ``jaxkd.data.make_array_loader`` over the decoded
  split (grain again, one gather per batch: for the small embedded data
  sets, where per-record work would cost more than the model's step);
  either way a fresh permutation per epoch that depends only on
  ``(seed, epoch)``;
* evaluation batches, one pass, the last batch padded and masked.

:func:`random_shift` is a random translation done inside the step
(``jaxkd.Views``), for data sets whose loader has no augmentation.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxkd import data as data_lib


def random_shift(images: jax.Array, key: jax.Array, *,
                 pixels: int) -> jax.Array:
  """Translates each image by up to ``pixels`` in x and y, filling with the
  image's minimum (the background of normalised digits).

  Args:
    images: ``[B, H, W, C]``.
    key: PRNG key.
    pixels: The largest shift.

  Returns:
    ``[B, H, W, C]``.
  """
  batch, height, width, channels = images.shape
  fill = jnp.min(images, axis=(1, 2, 3), keepdims=True)
  padded = jnp.pad(images - fill, ((0, 0), (pixels, pixels),
                                   (pixels, pixels), (0, 0))) + fill
  offsets = jax.random.randint(key, (batch, 2), 0, 2 * pixels + 1)

  def crop(image, offset):
    return jax.lax.dynamic_slice(
        image, (offset[0], offset[1], 0), (height, width, channels))

  return jax.vmap(crop)(padded, offsets)


def _example_axes(arrays: dict[str, np.ndarray]) -> dict[str, int]:
  # Cached teacher logits are [K, N, C]; every other array is [N, ...].
  return {name: 1 if name == "teacher_logits" else 0 for name in arrays}


@functools.lru_cache(maxsize=8)
def _load_split(spec: data_lib.DatasetSpec, split: str,
                data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
  loader = data_lib.make_loader(spec, split, batch_size=512, seed=0,
                                train=False, data_dir=data_dir, num_threads=0)
  images, labels = [], []
  for batch in loader:
    keep = batch["mask"]
    images.append(batch["image"][keep])
    labels.append(batch["label"][keep])
  return np.concatenate(images), np.concatenate(labels)


@dataclasses.dataclass
class Data:
  """A config's data: the spec, its splits, and iterators over them."""

  spec: data_lib.DatasetSpec
  train_split: str
  test_split: str
  augment: str
  data_dir: str | None
  in_memory: bool
  num_train: int
  batch_size: int
  eval_batch_size: int
  steps_per_epoch: int

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.spec.image_shape)

  @property
  def num_classes(self) -> int:
    return self.spec.num_classes

  def train_arrays(self) -> tuple[np.ndarray, np.ndarray]:
    """The decoded training split (``in_memory`` only)."""
    return _load_split(self.spec, self.train_split, self.data_dir)

  def train_iterator(self, seed: int, *, extra: dict[str, np.ndarray]
                     | None = None):
    """Infinite training batches of ``seed``, with ``extra`` per-example
    arrays (``in_memory`` only; ``"teacher_logits"`` is ``[K, N, C]``, handed
    out ``[K, B, C]`` as the train step reads it)."""
    if self.in_memory:
      images, labels = self.train_arrays()
      arrays = {"image": images, "label": labels, **(extra or {})}
      return data_lib.make_array_loader(
          arrays, batch_size=self.batch_size, seed=seed,
          example_axis=_example_axes(arrays))
    if extra:
      raise ValueError("Per-example arrays need `in_memory=True`.")
    return data_lib.make_loader(
        self.spec, self.train_split, batch_size=self.batch_size, seed=seed,
        train=True, data_dir=self.data_dir, augment=self.augment)

  def sample_batch(self, extra: dict[str, np.ndarray] | None = None
                   ) -> dict[str, np.ndarray]:
    """A training-shaped batch of zeros (for initialisation), with the
    per-example ``extra`` arrays of :meth:`train_iterator`."""
    sample = {
        "image": np.zeros((self.batch_size,) + self.image_shape, np.float32),
        "label": np.zeros((self.batch_size,), np.int32),
    }
    for name, axis in _example_axes(extra or {}).items():
      shape = list(extra[name].shape)
      shape[axis] = self.batch_size
      sample[name] = np.zeros(shape, extra[name].dtype)
    return sample

  def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
    """One pass over the test split; every batch has a ``"mask"``."""
    if not self.in_memory:
      yield from data_lib.make_loader(
          self.spec, self.test_split, batch_size=self.eval_batch_size,
          seed=0, train=False, data_dir=self.data_dir)
      return
    images, labels = _load_split(self.spec, self.test_split, self.data_dir)
    size = self.eval_batch_size
    for start in range(0, len(labels), size):
      image, label = images[start:start + size], labels[start:start + size]
      pad = size - len(label)
      mask = np.arange(size) < len(label)
      if pad:
        image = np.concatenate([image, np.zeros((pad,) + image.shape[1:],
                                                image.dtype)])
        label = np.concatenate([label, np.zeros((pad,), label.dtype)])
      yield {"image": image, "label": label, "mask": mask}


def setup(config: ml_collections.ConfigDict) -> Data:
  """Checks the config's data fields and opens the data set.

  Raises:
    ValueError: Unknown data set, split or augmentation, a batch larger than
      the split, ``image_size`` on a data set of fixed image size,
      ``in_memory`` with a loader augmentation.
    jaxkd.data.DatasetNotPreparedError: The data set is not prepared.
  """
  spec = data_lib.get_spec(config.dataset)
  if config.image_size:
    if spec.augment != "imagenet":
      raise ValueError(
          f"`image_size` resizes only data sets of variable image size"
          f" (ImageNet); {spec.name!r} has fixed {spec.image_shape}: set"
          " `image_size=0`."
      )
    size = int(config.image_size)
    spec = dataclasses.replace(
        spec, image_shape=(size, size, spec.image_shape[-1]),
        resize_size=max(size, round(size * 256 / 224)))
  train_split = config.train_split or spec.train_split
  test_split = config.test_split or spec.test_split
  data_lib.check_split(spec, train_split)
  data_lib.check_split(spec, test_split)
  augment = config.augment or spec.augment
  if augment not in data_lib.AUGMENTATIONS:
    raise ValueError(
        f"Unknown augmentation {augment!r}; known:"
        f" {', '.join(data_lib.AUGMENTATIONS)}."
    )
  if config.in_memory and augment != "none":
    raise ValueError(
        f"`in_memory=True` holds decoded images, so it cannot use the"
        f" loader's {augment!r} augmentation: set `augment='none'` (and"
        " `student.shift_pixels` / `teacher.shift_pixels` for in-step"
        " shifts) or `in_memory=False`."
    )
  data_dir = config.data_dir or None
  source = data_lib.data_source(spec, train_split, data_dir=data_dir)
  num_train = len(source)
  if config.batch_size > num_train:
    raise ValueError(
        f"`batch_size` {config.batch_size} is larger than the training split"
        f" {train_split!r} of {spec.name!r} ({num_train} examples)."
    )
  steps_per_epoch = config.steps_per_epoch or num_train // config.batch_size
  return Data(
      spec=spec, train_split=train_split, test_split=test_split,
      augment=augment, data_dir=data_dir, in_memory=bool(config.in_memory),
      num_train=num_train, batch_size=config.batch_size,
      eval_batch_size=config.eval_batch_size,
      steps_per_epoch=int(steps_per_epoch))
