"""Batches on the mesh: split over "data", from one process or several."""

from __future__ import annotations

from collections.abc import Mapping
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jaxkd.sharding._mesh import _axis_size
from jaxkd.sharding._mesh import _check_mesh
from jaxkd.sharding._mesh import _check_size
from jaxkd.sharding._mesh import batch_sharding
from jaxkd.sharding._mesh import DATA_AXIS
from jaxkd.sharding._mesh import replicated

PyTree = Any

# Batch entries whose batch axis is not the first: cached teacher outputs
# ``[K, B, ...]`` (see jaxkd.train_step). A 2-D ``teacher_logits`` ``[B, C]``
# (a single teacher) keeps its batch axis first; see `_batch_axis`.
TEACHER_AXIS_FIRST_KEYS = (
    "teacher_logits",
    "teacher_topk_logits",
    "teacher_topk_indices",
)


def _batch_axis(key: str, leaf: Any, batch_axes: Mapping[str, int]) -> int:
  """The batch axis of entry ``key`` (-1: a scalar, replicated)."""
  ndim = np.ndim(leaf)
  if key in batch_axes:
    axis = int(batch_axes[key])
  elif key in TEACHER_AXIS_FIRST_KEYS and ndim >= 3:
    axis = 1
  else:
    axis = 0
  if ndim == 0:
    return -1
  if -ndim <= axis < 0:
    axis += ndim
  if not 0 <= axis < ndim:
    raise ValueError(
        f"Batch entry {key!r} of shape {tuple(np.shape(leaf))} has no batch"
        f" axis {axis}."
    )
  return axis


def batch_shardings(
    batch: Mapping[str, PyTree],
    mesh: Mesh,
    *,
    batch_axes: Mapping[str, int] | None = None,
) -> dict[str, PyTree]:
  """The ``NamedSharding`` of every entry of a batch (see :func:`shard_batch`).

  Works on arrays and on abstract values (``jax.ShapeDtypeStruct``).

  .. versionadded:: 0.1.0
  """
  batch_axes = dict(batch_axes or {})

  def one(key, leaf):
    axis = _batch_axis(key, leaf, batch_axes)
    return replicated(mesh) if axis < 0 else batch_sharding(mesh, axis)

  return {
      key: jax.tree.map(lambda leaf, key=key: one(key, leaf), value)
      for key, value in batch.items()
  }


def _check_batch_sizes(
    batch: Mapping[str, PyTree],
    batch_axes: Mapping[str, int],
    divisor: int,
    what: str,
    devices: str,
) -> None:
  """Raises unless every entry has one batch size, divisible by ``divisor``."""
  sizes = {}
  for key, value in batch.items():
    for leaf in jax.tree.leaves(value):
      axis = _batch_axis(key, leaf, batch_axes)
      if axis >= 0:
        sizes.setdefault(int(np.shape(leaf)[axis]), key)
  if len(sizes) > 1:
    listing = ", ".join(f"{key!r}: {size}" for size, key in sizes.items())
    raise ValueError(
        f"The batch entries disagree on the {what}: {listing}."
    )
  for size in sizes:
    if size % divisor:
      raise ValueError(f"The {what} {size} is not divisible by {devices}.")


def shard_batch(
    batch: Mapping[str, PyTree],
    mesh: Mesh,
    *,
    batch_axes: Mapping[str, int] | None = None,
) -> dict[str, PyTree]:
  """Places a host batch on ``mesh``, split along its batch axis over "data".

  Each device of the ``"data"`` axis receives ``B / data`` examples (and
  every device of the ``"teacher"`` axis a copy of them). The batch axis of
  an entry is its first axis, but the second for the cached teacher outputs
  ``"teacher_logits"``, ``"teacher_topk_logits"`` and
  ``"teacher_topk_indices"`` of shape ``[K, B, ...]``; ``batch_axes``
  overrides it per entry. Scalar entries are replicated.

  Every process must pass the same global batch; in a multi-process run where
  each process reads only its own examples, use :func:`host_batch_to_global`.

  Args:
    batch: A dict of arrays (NumPy or JAX), ``{"image": [B, ...], "label":
      [B], ...}``; an entry may be a pytree of arrays sharing its batch axis.
    mesh: A mesh with a ``"data"`` axis (:func:`make_mesh`).
    batch_axes: ``{entry name: batch axis}`` for entries whose batch axis is
      not the default.

  Returns:
    A dict of ``jax.Array`` with the same keys, sharded over ``"data"``.

  Raises:
    ValueError: If the batch size is not divisible by the size of the
      ``"data"`` axis, the entries disagree on the batch size, or the mesh
      lacks an ``Auto`` ``"data"`` axis; always before any step runs.

  .. versionadded:: 0.1.0
  """
  _check_mesh(mesh)
  batch = dict(batch)
  batch_axes = dict(batch_axes or {})
  data = _axis_size(mesh, DATA_AXIS)
  _check_batch_sizes(
      batch, batch_axes, data, "batch size",
      f"the {data} devices of mesh axis {DATA_AXIS!r}",
  )
  return jax.device_put(
      batch, batch_shardings(batch, mesh, batch_axes=batch_axes)
  )


def initialize_distributed(**kwargs: Any) -> bool:
  """Joins this process to a multi-process JAX run, when there is one.

  A thin wrapper over ``jax.distributed.initialize(**kwargs)`` that is safe
  to call from any entry point. It does nothing (and returns ``False``):

  * when the distributed runtime is already initialised;
  * when ``num_processes=1`` is passed;
  * when called without arguments in a single-process environment: no
    ``JAX_COORDINATOR_ADDRESS`` and no cluster (SLURM, Open MPI, Cloud TPU,
    ...) detected by JAX.

  Otherwise every argument goes to ``jax.distributed.initialize``, whose
  errors propagate. Like it, this must run before any other JAX call (even
  ``jax.devices()``). For a run whose surviving processes must exit cleanly
  and within a bound when one dies, use :func:`jaxkd.distributed.initialize`
  and :func:`jaxkd.distributed.watch_peers` instead.

  Args:
    **kwargs: ``coordinator_address``, ``num_processes``, ``process_id``,
      ``local_device_ids`` ... as for ``jax.distributed.initialize``.

  Returns:
    Whether the distributed runtime was initialised by this call.

  .. versionadded:: 0.1.0
  """
  if jax.distributed.is_initialized():
    return False
  if kwargs.get("num_processes") == 1:
    return False
  if not kwargs and not os.environ.get("JAX_COORDINATOR_ADDRESS"):
    try:
      jax.distributed.initialize()
    except ValueError:
      # JAX detected no cluster and has no coordinator: a single process.
      return False
    return True
  jax.distributed.initialize(**kwargs)
  return True


def process_batch_rows(
    batch_size: int,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> slice:
  """The rows of a global batch that this process feeds.

  With :func:`make_mesh` over ``jax.devices()``, process ``i`` of ``P`` holds
  the devices of rows ``[i * b, (i + 1) * b)`` of a global batch of
  ``batch_size = P * b``, and :func:`host_batch_to_global` puts process
  ``i``'s local batch there. Use it to cut a global batch that every process
  has (a test, a small in-memory data set) into the local parts. A data
  loader reading a large data set need not: ``jaxkd.data.make_loader``
  already gives each process its own examples (strided over the processes)
  as its local batch.

  Args:
    batch_size: The global batch size, divisible by the process count.
    process_index: This process; ``jax.process_index()`` by default.
    process_count: The number of processes; ``jax.process_count()`` by
      default.

  Returns:
    A ``slice`` of the batch's rows.

  Examples:
    >>> from jaxkd import sharding
    >>> sharding.process_batch_rows(12, process_index=1, process_count=3)
    slice(4, 8, None)

  .. versionadded:: 0.1.0
  """
  if process_count is None:
    process_count = jax.process_count()
  if process_index is None:
    process_index = jax.process_index()
  _check_size("process_count", process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(
        f"`process_index` must lie in [0, {process_count}), got"
        f" {process_index}."
    )
  if batch_size % process_count:
    raise ValueError(
        f"`batch_size`={batch_size} is not divisible by the"
        f" {process_count} processes."
    )
  n = batch_size // process_count
  return slice(process_index * n, (process_index + 1) * n)


def _local_data_shards(mesh: Mesh) -> int:
  """How many distinct positions on "data" this process's devices hold."""
  data_index = list(mesh.axis_names).index(DATA_AXIS)
  me = jax.process_index()
  positions = {
      index[data_index]
      for index, device in np.ndenumerate(mesh.devices)
      if device.process_index == me
  }
  if not positions:
    raise ValueError(
        f"Process {me} owns no device of the mesh; every process must feed"
        " data to devices of its own."
    )
  return len(positions)


def host_batch_to_global(
    local_batch: Mapping[str, PyTree],
    mesh: Mesh,
    *,
    batch_axes: Mapping[str, int] | None = None,
) -> dict[str, PyTree]:
  """Assembles a global batch from every process's local slice of it.

  Each process passes the examples it read (for example with
  :func:`process_batch_rows` or a data loader); the result is one global ``jax.Array`` per
  entry, sharded over ``"data"`` as :func:`shard_batch` would shard the
  concatenation of the processes' batches in process order (with
  :func:`make_mesh` over ``jax.devices()``). No data crosses processes: each
  process's examples go to its own devices
  (``jax.make_array_from_process_local_data``). In a single process it is
  :func:`shard_batch`.

  Args:
    local_batch: This process's part, ``{"image": [b, ...], ...}``, with
      ``b = B / jax.process_count()`` (the same ``b`` in every process).
    mesh: The global mesh.
    batch_axes: As for :func:`shard_batch`.

  Returns:
    A dict of global ``jax.Array`` of batch size ``B``.

  Raises:
    ValueError: If the local batch size is not divisible by the number of
      ``"data"`` shards this process feeds, or the entries disagree on it.

  .. versionadded:: 0.1.0
  """
  _check_mesh(mesh)
  local_batch = dict(local_batch)
  batch_axes = dict(batch_axes or {})
  local_shards = _local_data_shards(mesh)
  _check_batch_sizes(
      local_batch, batch_axes, local_shards, "local batch size",
      f"the {local_shards} positions of mesh axis {DATA_AXIS!r} that process"
      f" {jax.process_index()} feeds",
  )
  shardings = batch_shardings(local_batch, mesh, batch_axes=batch_axes)
  data = _axis_size(mesh, DATA_AXIS)

  def one(key, leaf, sharding):
    leaf = np.asarray(leaf)
    axis = _batch_axis(key, leaf, batch_axes)
    if axis < 0:
      return jax.device_put(leaf, sharding)
    shape = list(leaf.shape)
    shape[axis] = shape[axis] // local_shards * data
    return jax.make_array_from_process_local_data(
        sharding, leaf, tuple(shape)
    )

  return {
      key: jax.tree.map(
          lambda leaf, sharding, key=key: one(key, leaf, sharding),
          value,
          shardings[key],
      )
      for key, value in local_batch.items()
  }
