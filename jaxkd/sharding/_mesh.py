"""The device mesh of a run and the two basic shardings on it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

PyTree = Any

DATA_AXIS = "data"
TEACHER_AXIS = "teacher"
AXIS_NAMES = (DATA_AXIS, TEACHER_AXIS)


def make_mesh(
    *,
    data: int | None = None,
    teacher: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
  """A ``("data", "teacher")`` device mesh with ``AxisType.Auto`` axes.

  ``Auto`` axes let ``jit`` propagate shardings from its inputs through the
  step; the default of ``jax.make_mesh`` in recent JAX is ``Explicit``, under
  which the stacked teachers cannot be vmapped, scanned or sliced along a
  sharded axis without resharding.

  Args:
    data: Size of the ``"data"`` axis; by default every device not used by
      the teacher axis, ``len(devices) // teacher``.
    teacher: Size of the ``"teacher"`` axis (1: teachers replicated).
    devices: The devices; ``jax.devices()`` (every device of every process)
      by default.

  Returns:
    The mesh, of shape ``{"data": data, "teacher": teacher}``.

  Raises:
    ValueError: If a size is not a positive integer or ``data * teacher`` is
      not the number of devices.

  Examples:
    >>> import jax
    >>> from jaxkd import sharding
    >>> mesh = sharding.make_mesh()
    >>> mesh.axis_names
    ('data', 'teacher')
    >>> mesh.shape["data"] == jax.device_count(), mesh.shape["teacher"]
    (True, 1)
    >>> sharding.make_mesh(data=0)
    Traceback (most recent call last):
      ...
    ValueError: `data` must be a positive integer, got 0.

  .. versionadded:: 0.1.0
  """
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("`devices` must hold at least one device, got none.")
  _check_size("teacher", teacher)
  if data is None:
    if len(devices) % teacher:
      raise ValueError(
          f"The {len(devices)} devices cannot be split into a teacher axis"
          f" of size {teacher}: `teacher` must divide the device count."
      )
    data = len(devices) // teacher
  _check_size("data", data)
  if data * teacher != len(devices):
    raise ValueError(
        f"A mesh of data={data} x teacher={teacher} = {data * teacher}"
        f" devices cannot be built from {len(devices)} devices; the sizes"
        " must multiply to the device count."
    )
  return jax.make_mesh(
      (data, teacher),
      AXIS_NAMES,
      axis_types=(AxisType.Auto, AxisType.Auto),
      devices=devices,
  )


def _check_size(name: str, value: Any) -> None:
  if (
      not isinstance(value, (int, np.integer))
      or isinstance(value, bool)
      or value < 1
  ):
    raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def _check_mesh(mesh: Mesh) -> None:
  """Raises unless ``mesh`` has an ``AxisType.Auto`` "data" axis.

  A "teacher" axis is optional, but ``Auto`` too when present.
  """
  if not isinstance(mesh, Mesh):
    raise TypeError(
        f"`mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}."
    )
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  if DATA_AXIS not in types:
    raise ValueError(
        f"The mesh has no axis {DATA_AXIS!r}; its axes are"
        f" {tuple(mesh.axis_names)}. Build it with `sharding.make_mesh`."
    )
  for axis in [a for a in AXIS_NAMES if a in types]:
    if types[axis] != AxisType.Auto:
      raise ValueError(
          f"Mesh axis {axis!r} has type {types[axis]}; the train step needs"
          " AxisType.Auto axes (shardings propagated by the compiler). Build"
          " the mesh with `sharding.make_mesh`."
      )


def _axis_size(mesh: Mesh, axis: str) -> int:
  return int(dict(mesh.shape).get(axis, 1))


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
  """Splits axis ``batch_axis`` of an array over the ``"data"`` mesh axis.

  .. versionadded:: 0.1.0
  """
  return NamedSharding(mesh, PartitionSpec(*([None] * batch_axis), DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy of an array on every device of ``mesh``.

  .. versionadded:: 0.1.0
  """
  return NamedSharding(mesh, PartitionSpec())
