"""The train state on the mesh: replicated, FSDP-split, teachers split."""

from __future__ import annotations

from collections.abc import Sequence
import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxkd import teachers as teachers_lib
from jaxkd.sharding._mesh import _axis_size
from jaxkd.sharding._mesh import _check_mesh
from jaxkd.sharding._mesh import DATA_AXIS
from jaxkd.sharding._mesh import replicated
from jaxkd.sharding._mesh import TEACHER_AXIS
from jaxkd.state import DistillState

# Leaves smaller than this stay replicated under FSDP: splitting them saves
# little memory and costs a gather per use.
DEFAULT_FSDP_MIN_SIZE = 2**16


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
    >>> from jaxkd.sharding._state import _fsdp_spec
    >>> _fsdp_spec((3, 512, 256), 8, min_size=1024)
    (None, 'data', None)
    >>> _fsdp_spec((3, 5), 8, min_size=1)  # nothing divisible by 8
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
