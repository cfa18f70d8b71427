"""Data-parallel, FSDP and teacher-axis placement of a distillation run.

The train step of :mod:`jaxkd.train_step` is one ``jax.jit`` program written
for a single device. Sharding it takes no change to the step: its *inputs*
are placed on a device mesh and the compiler partitions the program from
their shardings (GSPMD). This module builds the mesh and the placements:

* :func:`make_mesh`: a ``("data", "teacher")`` mesh whose axes have type
  ``AxisType.Auto`` (shardings propagate from the inputs through the step);
* :func:`shard_batch`: the batch split along its batch axis over ``"data"``
  (data parallelism; the gradients are all-reduced by the compiler);
* :func:`shard_state` / :func:`state_shardings`: the train state replicated,
  or with ``fsdp=True`` its large leaves split over ``"data"`` (fully sharded
  data parallelism: each device stores a slice of the parameters, moments and
  large teachers, and the compiler gathers them where they are used); the
  stacked teachers split over ``"teacher"`` when that axis is larger than 1
  (each device runs its own teachers under the ``"vmap"`` strategy);
* multi-host helpers: :func:`initialize_distributed`,
  :func:`process_batch_rows` and :func:`host_batch_to_global`, which
  assembles a global batch from every process's local slice.

Example::

  mesh = sharding.make_mesh()                     # every device on "data"
  state = sharding.shard_state(spec.init(key, batch, tvars), mesh)
  step = train_step.make_train_step(spec)  # or state_shardings=...
  for batch in batches:
    state, metrics = step(state, sharding.shard_batch(batch, mesh))

No ``pmap`` and no ``shard_map``: the step is the single-device program, and
its numbers equal the single-device step's up to the order of floating-point
reductions (BatchNorm statistics are computed over the global batch).

Two things measured with jaxlib 0.10.2 (8 CPU devices) that cost
communication under data parallelism, though the numbers stay right:

* The ``"vmap"`` teacher strategy turns a convolutional teacher's
  convolutions into grouped convolutions, and XLA's SPMD partitioner gathers
  the batch before every grouped convolution (depthwise ones excepted).
  ``"unroll"`` and ``"scan"`` keep the teachers' activations sharded.
* ``accumulation_steps > 1`` splits the batch into contiguous micro-batches,
  which do not lie on the devices that hold them: the compiler moves the
  examples between devices, or computes every micro-batch on every device
  when the split does not line up with the shards.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import math
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxkd import teachers as teachers_lib
from jaxkd.state import DistillState

__all__ = [
    "AXIS_NAMES",
    "DATA_AXIS",
    "DEFAULT_FSDP_MIN_SIZE",
    "TEACHER_AXIS",
    "TEACHER_AXIS_FIRST_KEYS",
    "batch_sharding",
    "batch_shardings",
    "host_batch_to_global",
    "initialize_distributed",
    "make_mesh",
    "process_batch_rows",
    "replicated",
    "shard_batch",
    "shard_state",
    "state_shardings",
]

PyTree = Any

DATA_AXIS = "data"
TEACHER_AXIS = "teacher"
AXIS_NAMES = (DATA_AXIS, TEACHER_AXIS)

# Batch entries whose batch axis is not the first: cached teacher outputs
# ``[K, B, ...]`` (see jaxkd.train_step). A 2-D ``teacher_logits`` ``[B, C]``
# (a single teacher) keeps its batch axis first; see `_batch_axis`.
TEACHER_AXIS_FIRST_KEYS = (
    "teacher_logits",
    "teacher_topk_logits",
    "teacher_topk_indices",
)

# Leaves smaller than this stay replicated under FSDP: splitting them saves
# little memory and costs a gather per use.
DEFAULT_FSDP_MIN_SIZE = 2**16


# ---------------------------------------------------------------------------
# Meshes and shardings.
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Batches.
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# The train state.
# ---------------------------------------------------------------------------


def _fsdp_spec(
    shape: Sequence[int],
    axis_size: int,
    *,
    min_size: int = DEFAULT_FSDP_MIN_SIZE,
    skip_leading: int = 0,
    axis_name: str = DATA_AXIS,
) -> tuple[str | None, ...]:
  """The FSDP partition of one array shape, as a tuple of axis names.

  An array of at least ``min_size`` elements is split over ``axis_name`` along
  its largest axis whose size ``axis_size`` divides (the last such axis on a
  tie); any other array stays replicated (all ``None``). The first
  ``skip_leading`` axes are never split (the stacked teacher axis).

  Examples:
    >>> from jaxkd import sharding
    >>> sharding._fsdp_spec((3, 512, 256), 8, min_size=1024)
    (None, 'data', None)
    >>> sharding._fsdp_spec((3, 5), 8, min_size=1)  # nothing divisible by 8
    (None, None)

  .. versionadded:: 0.1.0
  """
  shape = tuple(int(d) for d in shape)
  spec: list[str | None] = [None] * len(shape)
  if axis_size <= 1 or math.prod(shape) < min_size:
    return tuple(spec)
  candidates = [
      (size, axis)
      for axis, size in enumerate(shape)
      if axis >= skip_leading and size % axis_size == 0
  ]
  if candidates:
    _, axis = max(candidates)
    spec[axis] = axis_name
  return tuple(spec)


def _spec(axes: Sequence[str | None]) -> PartitionSpec:
  """A PartitionSpec without trailing ``None`` entries (``P()``: replicated)."""
  axes = list(axes)
  while axes and axes[-1] is None:
    axes.pop()
  return PartitionSpec(*axes)


def _check_teacher_split(state: DistillState, size: int) -> None:
  """Raises unless every group's K is divisible by the teacher-axis size."""
  for index, variables in enumerate(state.teachers):
    k = teachers_lib.num_stacked(variables, name=f"state.teachers[{index}]")
    if k % size:
      raise ValueError(
          f"The {k} teachers of group {index} cannot be split evenly over"
          f" mesh axis {TEACHER_AXIS!r} of size {size}: K must be divisible"
          f" by {size}."
      )


def state_shardings(
    state: DistillState,
    mesh: Mesh,
    *,
    fsdp: bool = False,
    fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE,
    fsdp_teachers: bool | None = None,
) -> DistillState:
  """The ``NamedSharding`` of every leaf of a train state.

  The rules of :func:`shard_state`, returned as a :class:`DistillState` of
  shardings. It reads only shapes, so ``state`` may be abstract (from
  ``jax.eval_shape``): pass the result as the target shardings when restoring
  a checkpoint onto a mesh, or as ``in_shardings``/``out_shardings`` of a
  ``jax.jit``.

  Args:
    state: The train state, concrete or abstract.
    mesh: A mesh with ``"data"`` (and optionally ``"teacher"``) axes.
    fsdp: See :func:`shard_state`.
    fsdp_min_size: See :func:`shard_state`.
    fsdp_teachers: See :func:`shard_state`.

  Returns:
    A :class:`DistillState` whose leaves are ``NamedSharding`` objects.

  .. versionadded:: 0.1.0
  """
  _check_mesh(mesh)
  if not isinstance(state, DistillState):
    raise TypeError(
        f"`state` must be a DistillState, got {type(state).__name__}."
    )
  if isinstance(fsdp_min_size, bool) or int(fsdp_min_size) < 0:
    raise ValueError(
        f"`fsdp_min_size` must be a non-negative integer, got"
        f" {fsdp_min_size!r}."
    )
  fsdp_teachers = fsdp if fsdp_teachers is None else fsdp_teachers
  data = _axis_size(mesh, DATA_AXIS)
  teacher = _axis_size(mesh, TEACHER_AXIS)

  def student_leaf(leaf):
    if not fsdp:
      return replicated(mesh)
    return NamedSharding(
        mesh, _spec(_fsdp_spec(np.shape(leaf), data, min_size=fsdp_min_size))
    )

  def teacher_leaf(leaf):
    shape = np.shape(leaf)
    spec = [None] * len(shape)
    if fsdp_teachers:
      spec = list(
          _fsdp_spec(shape, data, min_size=fsdp_min_size, skip_leading=1)
      )
    if teacher > 1:
      spec[0] = TEACHER_AXIS
    return NamedSharding(mesh, _spec(spec))

  if teacher > 1:
    _check_teacher_split(state, teacher)
  everything_else = jax.tree.map(
      lambda _: replicated(mesh), state.replace(teachers=())
  )
  return everything_else.replace(
      params=jax.tree.map(student_leaf, state.params),
      model_state=jax.tree.map(student_leaf, state.model_state),
      opt_state=jax.tree.map(student_leaf, state.opt_state),
      teachers=jax.tree.map(teacher_leaf, state.teachers),
  )


def shard_state(
    state: DistillState,
    mesh: Mesh,
    *,
    fsdp: bool = False,
    fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE,
    fsdp_teachers: bool | None = None,
) -> DistillState:
  """Places a train state on ``mesh``.

  * The student's parameters, the objective's adaptors, their optimiser
    state and the mutable model state (BatchNorm statistics, CRD queues) are
    replicated on every device; with ``fsdp=True``, each of their leaves of
    at least ``fsdp_min_size`` elements is instead split over ``"data"``
    along its largest axis divisible by the ``"data"`` size (see
    :func:`_fsdp_spec`). Adam's moments have their parameters' shapes and so
    their shardings.
  * The stacked teachers (``state.teachers``) are replicated, FSDP-split
    likewise (never along the stacked teacher axis) when ``fsdp_teachers``
    (by default ``fsdp``), and split along their teacher axis over
    ``"teacher"`` when that mesh axis is larger than 1 (as
    :func:`jaxkd.teachers.shard_teacher_axis` does; each device then runs
    ``K / teacher`` teachers under the ``"vmap"`` strategy).
  * The step counter, the PRNG key and the hyper-parameters are replicated.

  The step needs no change: ``jit`` follows these shardings, gathering FSDP
  leaves where they are used and all-reducing the gradients.

  Args:
    state: The train state (from ``Distillation.init``).
    mesh: A mesh with ``"data"`` (and optionally ``"teacher"``) axes of type
      ``AxisType.Auto`` (:func:`make_mesh`).
    fsdp: Whether to split large student-side leaves over ``"data"``.
    fsdp_min_size: Leaves with fewer elements stay replicated under FSDP.
    fsdp_teachers: Whether to split large teacher leaves over ``"data"``;
      ``None`` follows ``fsdp`` (say ``True`` for a large teacher and a small
      student).

  Returns:
    The placed state (a new pytree of ``jax.Array``).

  Raises:
    ValueError: If the mesh lacks an ``Auto`` ``"data"`` axis, or a teacher
      group's K is not divisible by the ``"teacher"`` axis size.

  .. versionadded:: 0.1.0
  """
  shardings = state_shardings(
      state,
      mesh,
      fsdp=fsdp,
      fsdp_min_size=fsdp_min_size,
      fsdp_teachers=fsdp_teachers,
  )
  return jax.device_put(state, shardings)


# ---------------------------------------------------------------------------
# Several processes.
# ---------------------------------------------------------------------------


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
