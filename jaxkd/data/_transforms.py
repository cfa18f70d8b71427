"""Per-record preprocessing in NumPy: decode, check, augment, normalise.

Every function works on one ``uint8`` image ``[height, width, channels]``.
Random augmentations take a ``np.random.Generator``; the loader gives each
record its own generator, seeded by the loader's seed and the record's
position in the stream (grain's ``random_map``), so that augmentations are
reproducible and identical after a resume.

Augmentations:

* ``"cifar"``: zero-pad 4 pixels on each side, take a random crop of the
  original size (every offset in ``[0, 8]`` equally likely), then flip left to
  right with probability 1/2. Padding happens before normalisation, so the
  padded pixels are black, as with torchvision's ``RandomCrop(32, padding=4)``
  followed by ``Normalize``.
* ``"imagenet"``: for training, a random-resized crop (area fraction uniform in
  ``[0.08, 1]``, log aspect ratio uniform in ``[log 3/4, log 4/3]``, up to 10
  tries, then a center crop of the largest allowed aspect ratio, as
  torchvision's ``RandomResizedCrop``) resized bilinearly to the target size,
  then a flip with probability 1/2; for evaluation, resize the shorter side to
  ``resize_size`` (256 for 224 outputs) and take the center crop.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxkd.data._registry import DatasetSpec

CIFAR_PADDING = 4
CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RANGE = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10


def _shape_matches(
    shape: tuple[int, ...], expected: tuple[int | None, ...]
) -> bool:
  return len(shape) == len(expected) and all(
      e is None or s == e for s, e in zip(shape, expected)
  )


def decode_record(
    record: Mapping[str, Any], spec: DatasetSpec
) -> tuple[np.ndarray, int]:
  """Returns a record's ``uint8`` image ``[h, w, c]`` and integer label.

  Raises:
    ValueError: the record has no ``image`` or ``label``, the image shape does
      not match ``spec.record_shape``, the image is not ``uint8`` or the label
      is outside ``[0, spec.num_classes)``.
  """
  try:
    image, label = record["image"], record["label"]
  except (KeyError, TypeError, IndexError):
    if isinstance(record, Mapping):
      keys = sorted(record)
    else:
      keys = type(record).__name__
    raise ValueError(
        f"Data set {spec.name!r}: a record must be a dict with 'image' and"
        f" 'label', got {keys}."
    ) from None
  image = np.asarray(image)
  if image.ndim == 2 and spec.record_shape[-1] == 1:
    image = image[..., None]
  if not _shape_matches(image.shape, spec.record_shape):
    expected = tuple("?" if d is None else d for d in spec.record_shape)
    raise ValueError(
        f"Data set {spec.name!r}: image of shape {image.shape}, expected"
        f" {expected} (height, width, channels; '?' = any). Is the data"
        f" directory holding another data set, or does the spec's"
        f" `record_shape` need changing?"
    )
  if image.dtype != np.uint8:
    raise ValueError(
        f"Data set {spec.name!r}: image of dtype {image.dtype}, expected uint8"
        " pixel values 0-255."
    )
  label = int(np.asarray(label))
  if not 0 <= label < spec.num_classes:
    raise ValueError(
        f"Data set {spec.name!r}: label {label} outside"
        f" [0, {spec.num_classes})."
    )
  return image, label


def resize(image: np.ndarray, height: int, width: int, box=None) -> np.ndarray:
  """Bilinear resize of a ``uint8`` image (or of its crop ``box``) with PIL."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  squeeze = image.shape[-1] == 1
  pil = Image.fromarray(image[..., 0] if squeeze else image)
  out = np.asarray(
      pil.resize((width, height), Image.Resampling.BILINEAR, box=box)
  )
  return out[..., None] if squeeze else out


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Flips left to right with probability 1/2."""
  return image[:, ::-1] if rng.random() < 0.5 else image


def cifar_augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Zero-pads 4 pixels, random-crops back to the input size, random flip."""
  height, width, _ = image.shape
  pad = CIFAR_PADDING
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  top = int(rng.integers(0, 2 * pad + 1))
  left = int(rng.integers(0, 2 * pad + 1))
  return random_flip(padded[top : top + height, left : left + width], rng)


def random_resized_crop_box(
    height: int, width: int, rng: np.random.Generator
) -> tuple[int, int, int, int]:
  """Samples a crop ``(left, top, right, bottom)`` as RandomResizedCrop does."""
  area = height * width
  log_low, log_high = (math.log(r) for r in CROP_ASPECT_RANGE)
  for _ in range(CROP_ATTEMPTS):
    target_area = area * rng.uniform(*CROP_AREA_RANGE)
    aspect = math.exp(rng.uniform(log_low, log_high))
    crop_w = int(round(math.sqrt(target_area * aspect)))
    crop_h = int(round(math.sqrt(target_area / aspect)))
    if 0 < crop_w <= width and 0 < crop_h <= height:
      top = int(rng.integers(0, height - crop_h + 1))
      left = int(rng.integers(0, width - crop_w + 1))
      return left, top, left + crop_w, top + crop_h
  # Fallback: the whole image, cut to the allowed range of aspect ratios.
  ratio = width / height
  if ratio < CROP_ASPECT_RANGE[0]:
    crop_w, crop_h = width, int(round(width / CROP_ASPECT_RANGE[0]))
  elif ratio > CROP_ASPECT_RANGE[1]:
    crop_w, crop_h = int(round(height * CROP_ASPECT_RANGE[1])), height
  else:
    crop_w, crop_h = width, height
  top, left = (height - crop_h) // 2, (width - crop_w) // 2
  return left, top, left + crop_w, top + crop_h


def imagenet_train(
    image: np.ndarray, rng: np.random.Generator, size: tuple[int, int]
) -> np.ndarray:
  """Random-resized crop to ``size`` (height, width), then a random flip."""
  box = random_resized_crop_box(image.shape[0], image.shape[1], rng)
  return random_flip(resize(image, size[0], size[1], box=box), rng)


def resize_and_center_crop(
    image: np.ndarray, resize_size: int, size: tuple[int, int]
) -> np.ndarray:
  """Resizes the shorter side to ``resize_size``, then center-crops ``size``."""
  height, width = image.shape[:2]
  if height <= width:
    new_h, new_w = resize_size, max(1, int(resize_size * width / height))
  else:
    new_h, new_w = max(1, int(resize_size * height / width)), resize_size
  image = resize(image, new_h, new_w)
  top = int(round((new_h - size[0]) / 2.0))
  left = int(round((new_w - size[1]) / 2.0))
  return image[top : top + size[0], left : left + size[1]]


class Preprocess:
  """Record -> ``{"image": float32 [h, w, c], "label": int32}``.

  An instance is picklable (grain may send it to worker processes). Called as
  ``preprocess(record, rng)`` with a generator for training augmentation, or
  ``preprocess(record)`` for deterministic preprocessing.
  """

  def __init__(self, spec: DatasetSpec, augment: str):
    self.spec = spec
    self.augment = augment
    self.size = spec.image_shape[:2]
    # Images whose stored size differs from the models' size (ImageNet) are
    # resized to a shorter side of `resize_size` and center-cropped.
    self.needs_resize = tuple(spec.record_shape) != tuple(spec.image_shape)
    self.resize_size = spec.resize_size or int(
        round(max(self.size) * 256 / 224)
    )
    std = np.asarray(spec.std, np.float32)
    # (pixels / 255 - mean) / std == pixels * scale - offset.
    self.scale = (1.0 / (255.0 * std)).astype(np.float32)
    self.offset = (np.asarray(spec.mean, np.float32) / std).astype(np.float32)

  def __call__(
      self,
      record: Mapping[str, Any],
      rng: np.random.Generator | None = None,
  ) -> dict[str, np.ndarray]:
    spec = self.spec
    image, label = decode_record(record, spec)
    if rng is not None and self.augment == "imagenet":
      image = imagenet_train(image, rng, self.size)
    else:
      if self.needs_resize:
        image = resize_and_center_crop(image, self.resize_size, self.size)
      if rng is not None and self.augment == "cifar":
        image = cifar_augment(image, rng)
    if image.shape != spec.image_shape:
      raise ValueError(
          f"Data set {spec.name!r}: preprocessing gave an image of shape"
          f" {image.shape}, the models take {spec.image_shape}."
      )
    image = image.astype(np.float32) * self.scale - self.offset
    return {"image": image, "label": np.int32(label)}


def padding_example(spec: DatasetSpec) -> dict[str, np.ndarray]:
  """The example that pads the last batch: zeros, label 0, ``mask`` False."""
  return {
      "image": np.zeros(spec.image_shape, np.float32),
      "label": np.int32(0),
      "mask": np.bool_(False),
  }
