"""Placing a group's teacher axis over a mesh axis.

Private module of :mod:`jaxkd.teachers`.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxkd._stacking import num_stacked

PyTree = Any


def shard_teacher_axis(
    variables: PyTree, mesh: Mesh, axis_name: str = "teacher"
) -> PyTree:
  """Places the leading teacher axis of every leaf over a mesh axis.

  Each device of the mesh axis then holds ``K / size`` teachers; every other
  mesh axis holds a replica. Under ``jit`` with the ``"vmap"`` strategy the
  compiler partitions the teacher computation, each device running its own
  teachers (the logits come out sharded over the teacher axis). ``"scan"`` and
  ``"unroll"`` give the same numbers, but slice one teacher at a time out of
  the sharded stack, so the compiler moves parameters between devices.

  The mesh axis must have type ``AxisType.Auto`` (sharding decided by the
  compiler). With explicit sharding (the default of ``jax.make_mesh``) the
  sharding is part of every array's type and the teacher axis cannot be
  vmapped, scanned or sliced without resharding, so it is rejected; build the
  mesh with ``jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) *
  len(names))``.

  Args:
    variables: A stacked pytree (a :class:`TeacherVariables`, or any tree with
      leaves ``[K, ...]``).
    mesh: The device mesh.
    axis_name: The mesh axis for the teacher dimension.

  Returns:
    The same tree, with every leaf placed with
    ``NamedSharding(mesh, PartitionSpec(axis_name))``.

  Raises:
    ValueError: If ``axis_name`` is not an axis of ``mesh``, is not of type
      ``AxisType.Auto``, or K is not divisible by its size.

  .. versionadded:: 0.1.0
  """
  if axis_name not in mesh.axis_names:
    raise ValueError(
        f"`axis_name` {axis_name!r} is not an axis of the mesh, whose axes are"
        f" {tuple(mesh.axis_names)}."
    )
  axis_type = dict(zip(mesh.axis_names, mesh.axis_types))[axis_name]
  if axis_type != AxisType.Auto:
    raise ValueError(
        f"Mesh axis {axis_name!r} has type {axis_type}; the teacher axis"
        " needs AxisType.Auto. Build the mesh with `jax.make_mesh(shape,"
        " names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))`."
    )
  k = num_stacked(variables, name="variables")
  size = mesh.shape[axis_name]
  if k % size:
    raise ValueError(
        f"The {k} teachers cannot be split evenly over mesh axis"
        f" {axis_name!r} of size {size}: K must be divisible by {size}."
    )
  sharding = NamedSharding(mesh, PartitionSpec(axis_name))
  return jax.device_put(variables, sharding)
