"""Preparing data sets and opening them as TFDS random-access data sources.

jaxkd reads every data set with ``tfds.data_source``, which needs a data set
prepared in a random-access file format (ArrayRecord) and no TensorFlow. It
never downloads anything: ``tfds.data_source`` is always called with
``download=False``.

* The embedded data sets (``mnist5k``, ``digits``) are prepared into the data
  directory on first use, from files that installed packages ship.
* Every other data set must already be prepared as ArrayRecord in the data
  directory. If it is not, :class:`DatasetNotPreparedError` says how to
  prepare it (on a machine with network access and TensorFlow) or how to
  convert a TFRecord copy.

Several processes preparing an embedded data set into the same directory at
once is tolerated (TFDS writes into a temporary directory and renames it; a
process that loses the race reads the winner's copy), but preparing once
before starting a multi-process job is simpler: ``jaxkd.data.prepare(name)``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

from jaxkd.data._registry import DatasetSpec
from jaxkd.data._registry import check_split
from jaxkd.data._registry import get_spec
from jaxkd.data._registry import resolve_data_dir

_RANDOM_ACCESS_FORMATS = ("array_record", "parquet")


class DatasetNotPreparedError(ValueError):
  """A data set is not available in a format ``tfds.data_source`` can read.

  Raised when the data directory holds no prepared copy of the data set, or
  holds only a TFRecord copy (which only TensorFlow can read). The message says
  how to prepare or convert it.
  """


def _tfds_base_name(tfds_name: str) -> str:
  # "imagenet2012/subset:5.1.0" -> "imagenet2012".
  return tfds_name.split(":")[0].split("/")[0]


_Infos = list[tuple[pathlib.Path, list[str]]]


def _dataset_infos(dataset_dir: pathlib.Path) -> _Infos:
  """Each prepared version directory under ``dataset_dir``, with its formats."""
  found = []
  for info_path in sorted(dataset_dir.glob("**/dataset_info.json")):
    # TFDS writes into `incomplete.*` directories and renames them when done.
    if any(part.startswith("incomplete") for part in info_path.parts):
      continue
    try:
      info = json.loads(info_path.read_text())
    except (OSError, ValueError):
      continue
    # Older TFDS versions did not record the format; their default was TFRecord.
    formats = [info.get("fileFormat") or "tfrecord"]
    formats += list(info.get("alternativeFileFormats") or ())
    found.append((info_path.parent, formats))
  return found


def _build_command(spec: DatasetSpec, root: pathlib.Path) -> str:
  command = (
      f"tfds build {spec.tfds_name} --file_format=array_record"
      f" --data_dir={root}"
  )
  if _tfds_base_name(spec.tfds_name) == "imagenet2012":
    command += " --manual_dir=DIR_WITH_ILSVRC2012_TAR_FILES"
  return command


def _not_prepared_message(spec: DatasetSpec, root: pathlib.Path) -> str:
  base = _tfds_base_name(spec.tfds_name)
  return (
      f"Data set {spec.name!r} (TFDS {spec.tfds_name!r}) is not prepared in"
      f" {root} (no dataset_info.json under {root / base}). jaxkd reads TFDS"
      " data sets as ArrayRecord, without TensorFlow, and never downloads"
      " them. To prepare it:\n"
      "  * on a machine with network access and TensorFlow, run\n"
      f"      {_build_command(spec, root)}\n"
      f"    and copy the directory {root / base} to this machine; or\n"
      "  * copy an already prepared ArrayRecord copy into that directory, or"
      " point jaxkd at the directory that holds it with `data_dir=...` or the"
      " environment variable JAXKD_DATA_DIR."
  )


def _wrong_format_message(
    spec: DatasetSpec, root: pathlib.Path, infos: _Infos
) -> str:
  found = "; ".join(f"{path}: {', '.join(formats)}" for path, formats in infos)
  version_dir = infos[-1][0]
  return (
      f"Data set {spec.name!r} (TFDS {spec.tfds_name!r}) is prepared in {root}"
      f" only as TFRecord ({found}). `tfds.data_source`, which jaxkd uses,"
      " needs random access (ArrayRecord); TFRecord can only be read with"
      " TensorFlow. Either:\n"
      "  * convert it, on a machine with TensorFlow (or after `pip install"
      " tensorflow` here), in place:\n"
      f"      tfds convert_format --dataset_version_dir={version_dir}"
      " --out_file_format=array_record\n"
      f"    (or `--root_data_dir={root}` to convert every data set there); or\n"
      "  * re-build it as ArrayRecord on a machine with network access and"
      " TensorFlow:\n"
      f"      {_build_command(spec, root)}"
  )


def _diagnose(
    spec: DatasetSpec, root: pathlib.Path
) -> DatasetNotPreparedError | None:
  """The error to raise after ``tfds.data_source`` failed, or ``None``."""
  infos = _dataset_infos(root / _tfds_base_name(spec.tfds_name))
  if not infos:
    return DatasetNotPreparedError(_not_prepared_message(spec, root))
  formats = {f for _, version_formats in infos for f in version_formats}
  if not formats & set(_RANDOM_ACCESS_FORMATS):
    return DatasetNotPreparedError(_wrong_format_message(spec, root, infos))
  # A random-access copy exists: the failure has another cause.
  return None


@contextlib.contextmanager
def _quiet_tfds_logs():
  """TFDS's absl INFO/WARNING lines while it prepares an embedded set."""
  loggers = [logging.getLogger(name) for name in ("absl", "tensorflow_datasets")]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    for logger, level in zip(loggers, levels):
      logger.setLevel(level)


def _prepare_embedded(spec: DatasetSpec, root: pathlib.Path) -> pathlib.Path:
  """Builds an embedded data set as ArrayRecord unless already prepared."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  from jaxkd.data import _builders  # pylint: disable=g-import-not-at-top

  with _quiet_tfds_logs():
    builder = _builders.BUILDERS[spec.name](
        data_dir=os.fspath(root), file_format="array_record"
    )
    prepared = builder.is_prepared()
  if not prepared:
    # TFDS would announce "Downloading and preparing dataset Unknown size"
    # and draw progress bars; nothing is downloaded, so say what happens.
    print(f"jaxkd: preparing the embedded data set {spec.name!r} as"
          f" ArrayRecord in {root}, once: {spec.description.rstrip('.')}.",
          file=sys.stderr)
    captured = io.StringIO()
    try:
      with contextlib.redirect_stdout(captured), \
          contextlib.redirect_stderr(captured), _quiet_tfds_logs():
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                # Nothing to fetch: never look for a copy on Google Cloud.
                try_download_gcs=False,
            )
        )
    except Exception:
      # Another process may have finished preparing the same copy first.
      if not builder.is_prepared():
        sys.stderr.write(captured.getvalue())
        raise
  return pathlib.Path(os.fspath(builder.data_dir))


def _open(spec: DatasetSpec, split: Any, root: pathlib.Path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  if spec.embedded:
    _prepare_embedded(spec, root)
  try:
    return tfds.data_source(
        spec.tfds_name, split=split, data_dir=os.fspath(root), download=False
    )
  except tfds.core.registered.DatasetNotFoundError:
    raise  # An unknown TFDS name: TFDS's message is the right one.
  except Exception as error:  # TFDS raises several types here.
    replacement = _diagnose(spec, root)
    if replacement is None:
      raise
    raise replacement from error


def prepare(
    name: str | DatasetSpec, *, data_dir: str | os.PathLike[str] | None = None
) -> pathlib.Path:
  """Makes a data set readable by :func:`make_loader` and returns where it is.

  Embedded data sets (``mnist5k``, ``digits``) are built as ArrayRecord into
  the data directory if they are not there yet (a few seconds, no network).
  For any other data set, checks that an ArrayRecord copy is there.

  Args:
    name: a name in :data:`jaxkd.data.DATASETS` or a :class:`DatasetSpec`.
    data_dir: the TFDS data directory; default ``$JAXKD_DATA_DIR`` or
      ``~/.cache/jaxkd/tensorflow_datasets``.

  Returns:
    The data set's version directory, e.g.
    ``<data_dir>/jaxkd_mnist5k/1.0.0``.

  Raises:
    ValueError: unknown data set.
    DatasetNotPreparedError: not prepared, or prepared only as TFRecord; the
      message says how to prepare or convert it.
  """
  spec = get_spec(name)
  root = resolve_data_dir(data_dir)
  if spec.embedded:
    return _prepare_embedded(spec, root)
  _open(spec, None, root)  # Opens every split: raises if one is unreadable.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = tfds.builder(spec.tfds_name, data_dir=os.fspath(root))
  return pathlib.Path(os.fspath(builder.data_dir))


def data_source(
    name: str | DatasetSpec,
    split: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
) -> Sequence[dict[str, Any]]:
  """Opens one split of a data set as a TFDS random-access data source.

  The source supports ``len(source)`` and ``source[i]``, which returns the
  decoded record, a dict of NumPy values (``"image"`` ``uint8 [h, w, c]``,
  ``"label"``, and whatever other features the data set has). Embedded data
  sets are prepared on first use.

  Args:
    name: a name in :data:`jaxkd.data.DATASETS` or a :class:`DatasetSpec`.
    split: a split of the data set, optionally sliced the TFDS way
      (``"train[:90%]"``).
    data_dir: the TFDS data directory; default ``$JAXKD_DATA_DIR`` or
      ``~/.cache/jaxkd/tensorflow_datasets``.

  Returns:
    The data source.

  Raises:
    ValueError: unknown data set or split.
    DatasetNotPreparedError: not prepared, or prepared only as TFRecord.
  """
  spec = get_spec(name)
  check_split(spec, split)
  return _open(spec, split, resolve_data_dir(data_dir))
