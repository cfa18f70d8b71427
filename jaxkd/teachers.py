"""Teachers: K frozen models of one architecture run by one compiled call.

Teachers of the same architecture are held with their parameters stacked on a
new leading axis of size ``K`` (:func:`stack_params`), so that K teachers are
one pytree and one call, whatever K. The configuration and the arrays are kept
apart on purpose:

* :class:`TeacherGroup` is static: the :class:`~jaxkd.models._contract.Model`,
  the execution strategy and a name. It hashes by identity and can be closed
  over by ``jax.jit`` or passed as a static argument.
* :class:`TeacherVariables` holds the stacked ``params`` and ``state`` arrays.
  It is a pytree and must travel as a jit *argument*: a closed-over array is
  embedded in the compiled program as a constant, which for large teachers
  bloats the HLO and the compile time.

:func:`apply_teachers` runs every teacher of a group in eval mode
(``train=False``, no dropout key) behind ``jax.lax.stop_gradient``, and returns
their logits ``[K, batch, num_classes]`` and features ``{name: [K, ...]}``.
Teachers never receive a gradient, and no gradient flows back through their
outputs into whatever produced their input.

Three strategies compute the same numbers:

* ``"vmap"``: ``jax.vmap`` over the stacked parameters. Matrix products become
  batched products and convolutions become grouped convolutions.
* ``"scan"``: ``jax.lax.scan`` over the teacher axis. Teachers run one after
  the other; the model is traced and compiled once whatever K, and only one
  teacher's activations are alive at a time.
* ``"unroll"``: a Python loop over the teachers inside the same jit. The
  program holds K copies of the model, each compiled as an ordinary
  (non-batched) model.
* ``"auto"``: picks one of the above from ``jax.default_backend()``
  (see ``_AUTO_STRATEGY``).

Teachers of different architectures form several groups, run together by
:func:`apply_teacher_groups`.

Example::

  group, variables = TeacherGroup.create(model, params_list, state_list)
  step = jax.jit(lambda variables, x: apply_teachers(group, variables, x))
  outputs = step(variables, x)  # outputs.logits: [K, batch, num_classes]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxkd._stacking import num_stacked
from jaxkd._stacking import stack_params
from jaxkd._stacking import unstack_params
from jaxkd.models import Model

__all__ = [
    "STRATEGIES",
    "TeacherGroup",
    "TeacherOutputs",
    "TeacherVariables",
    "apply_teacher_groups",
    "apply_teachers",
    "check_same_classes",
    "num_stacked",
    "resolve_strategy",
    "shard_teacher_axis",
    "stack_params",
    "unstack_params",
]

PyTree = Any
Array = jax.Array

STRATEGIES = ("auto", "vmap", "scan", "unroll")

# The strategy "auto" picks, by `jax.default_backend()`. Measured on XLA:CPU
# (jaxlib 0.10.2, a shared and noisy 2-core machine, resnet32x4 teachers,
# batch 64, benchmarks/throughput.py): "vmap" ran 2.3-3x slower than "scan"
# and "unroll" at K = 2, 4 and 8, because a vmapped convolution becomes a
# grouped convolution, which XLA:CPU executes far less efficiently than K
# ordinary ones (jaxlib 0.12, idle machine, 2026-12-03: the vmap step's
# overhead over its parts 1.43-2.23 at K = 2-8, scan's 0.96-1.04; the K = 8
# step compiled in 6.4 s with scan, 12.1 s unrolled). "scan" and "unroll" ran at the same speed (K = 4 forward:
# 10.2 s and 10.4 s for 4 x 64 images), but "scan" compiled 3x faster (2.3 s
# against 7.3 s at K = 4; 7.9 s against 27.9 s for the K = 8 distillation
# step) and keeps one teacher's activations alive at a time (about 600 MiB
# less resident memory at K = 4), so it is the CPU default. The GPU and TPU
# entries are not measured yet: accelerators are expected to prefer the
# batched program.
_AUTO_STRATEGY = {"cpu": "scan", "gpu": "vmap", "tpu": "vmap"}
# For a backend missing from the table.
_AUTO_FALLBACK = "vmap"


# ---------------------------------------------------------------------------
# Groups.
# ---------------------------------------------------------------------------


class TeacherVariables(NamedTuple):
  """The stacked arrays of a teacher group: pass them to jit as arguments.

  Attributes:
    params: The teachers' parameters, every leaf of shape ``[K, ...]``.
    state: Their mutable state (batch statistics), leaves ``[K, ...]``, or
      ``{}`` for models without state.
  """

  params: PyTree
  state: PyTree


class TeacherOutputs(NamedTuple):
  """What the teachers produce for one batch.

  Attributes:
    logits: ``[K, batch, num_classes]``.
    features: A dict of named features, each ``[K, ...]``.
  """

  logits: Array
  features: dict[str, Array]


@dataclasses.dataclass(frozen=True, eq=False)
class TeacherGroup:
  """Static configuration of K teachers sharing one architecture.

  The arrays are not part of the group; they live in a
  :class:`TeacherVariables` passed alongside it. Instances compare and hash by
  identity, so a group can be closed over by ``jax.jit`` or be a static
  argument.

  Attributes:
    model: The shared architecture (the :class:`Model` contract).
    strategy: How the K teachers are run: ``"vmap"``, ``"scan"``, ``"unroll"``
      or ``"auto"`` (chosen per backend).
    name: A name for error messages and for the feature keys of
      :func:`apply_teacher_groups`.

  .. versionadded:: 0.1.0
  """

  model: Model
  strategy: str = "auto"
  name: str = "teachers"

  def __post_init__(self):
    _check_strategy(self.strategy)
    if not isinstance(self.name, str) or not self.name:
      raise ValueError(
          f"`name` must be a non-empty string, got {self.name!r}."
      )

  @classmethod
  def create(
      cls,
      model: Model,
      params_list: Sequence[PyTree],
      state_list: Sequence[PyTree] | None = None,
      *,
      strategy: str = "auto",
      name: str = "teachers",
  ) -> tuple[TeacherGroup, TeacherVariables]:
    """Builds a group and stacks its K teachers' params and state.

    Args:
      model: The shared architecture.
      params_list: K parameter pytrees.
      state_list: K state pytrees, or ``None`` for stateless models.
      strategy: See :class:`TeacherGroup`.
      name: See :class:`TeacherGroup`.

    Returns:
      ``(group, variables)``.

    Raises:
      ValueError: If the lists are empty or of different lengths, or their
        trees do not stack (see :func:`stack_params`).
    """
    params_list = list(params_list)
    if state_list is None:
      state_list = [{} for _ in params_list]
    state_list = list(state_list)
    if len(params_list) != len(state_list):
      raise ValueError(
          f"`params_list` holds {len(params_list)} teachers but `state_list`"
          f" holds {len(state_list)}."
      )
    group = cls(model=model, strategy=strategy, name=name)
    variables = TeacherVariables(
        params=stack_params(params_list, name="params"),
        state=stack_params(state_list, name="state"),
    )
    return group, variables

  def __call__(
      self,
      variables: TeacherVariables,
      x: PyTree,
      *,
      strategy: str | None = None,
      per_teacher_inputs: bool = False,
  ) -> TeacherOutputs:
    """Same as :func:`apply_teachers` with this group."""
    return apply_teachers(
        self,
        variables,
        x,
        strategy=strategy,
        per_teacher_inputs=per_teacher_inputs,
    )

  def __repr__(self) -> str:
    return (
        f"TeacherGroup({self.name!r}, model={self.model!r},"
        f" strategy={self.strategy!r})"
    )


def _check_strategy(strategy: Any) -> None:
  if strategy not in STRATEGIES:
    raise ValueError(
        f"`strategy` must be one of {', '.join(map(repr, STRATEGIES))}; got"
        f" {strategy!r}."
    )


def resolve_strategy(strategy: str) -> str:
  _check_strategy(strategy)
  if strategy == "auto":
    return _AUTO_STRATEGY.get(jax.default_backend(), _AUTO_FALLBACK)
  return strategy


def _num_teachers(group: TeacherGroup, variables: TeacherVariables) -> int:
  if not isinstance(variables, TeacherVariables):
    raise TypeError(
        f"`variables` of group {group.name!r} must be a TeacherVariables, got"
        f" {type(variables).__name__}."
    )
  k = num_stacked(variables.params, name=f"{group.name}.params")
  if jax.tree.leaves(variables.state):
    k_state = num_stacked(variables.state, name=f"{group.name}.state")
    if k_state != k:
      raise ValueError(
          f"Group {group.name!r}: `params` stack {k} teachers but `state`"
          f" stacks {k_state}."
      )
  return k


def apply_teachers(
    group: TeacherGroup,
    variables: TeacherVariables,
    x: PyTree,
    *,
    strategy: str | None = None,
    per_teacher_inputs: bool = False,
) -> TeacherOutputs:
  """Runs the K teachers of a group in eval mode, without gradients.

  Every teacher is called as ``model.apply(params_k, state_k, x,
  train=False, rng=None)``: batch normalization uses its running statistics,
  dropout is off and the state is not updated. ``jax.lax.stop_gradient``
  wraps the parameters and the outputs, so the teachers get no gradient and no
  gradient flows back through their outputs into ``x``.

  Args:
    group: The teachers' static configuration.
    variables: Their stacked ``params`` and ``state`` (leaves ``[K, ...]``).
    x: The batch ``[batch, ...]`` shared by every teacher or, with
      ``per_teacher_inputs=True``, one batch per teacher ``[K, batch, ...]``
      (for input perturbations that differ between teachers). A pytree of
      arrays is accepted where the model takes one.
    strategy: Overrides ``group.strategy`` for this call.
    per_teacher_inputs: Whether ``x`` has a leading teacher axis.

  Returns:
    :class:`TeacherOutputs` with ``logits`` ``[K, batch, num_classes]`` and
    ``features`` ``{name: [K, ...]}``, in the model's output dtype.

  Raises:
    ValueError: On an unknown strategy, inconsistent teacher counts, or a
      per-teacher input whose leading size is not K.

  Examples:
    >>> import jax
    >>> from jaxkd import teachers
    >>> from jaxkd.models import Model
    >>> def apply(params, state, x, *, train, rng):
    ...   return x @ params["w"], {"input": x}, state
    >>> model = Model(init=None, apply=apply, name="linear")
    >>> x = jax.numpy.ones((2, 3))
    >>> params = [{"w": jax.random.normal(jax.random.key(k), (3, 5))}
    ...           for k in range(4)]
    >>> group, variables = teachers.TeacherGroup.create(
    ...     model, params, strategy="scan")
    >>> run = jax.jit(lambda v, x: teachers.apply_teachers(group, v, x))
    >>> outputs = run(variables, x)
    >>> print(outputs.logits.shape, outputs.features["input"].shape)
    (4, 2, 5) (4, 2, 3)

  .. versionadded:: 0.1.0
  """
  strategy = resolve_strategy(group.strategy if strategy is None else strategy)
  k = _num_teachers(group, variables)
  if per_teacher_inputs:
    k_x = num_stacked(x, name="x")
    if k_x != k:
      raise ValueError(
          f"With `per_teacher_inputs=True`, `x` needs a leading teacher axis of"
          f" size {k} (group {group.name!r}), got {k_x}."
      )
  params = jax.lax.stop_gradient(variables.params)
  state = jax.lax.stop_gradient(variables.state)
  x = jax.lax.stop_gradient(x)
  model = group.model

  def one_teacher(p, s, xi):
    logits, features, _ = model.apply(p, s, xi, train=False, rng=None)
    return logits, dict(features)

  x_axis = 0 if per_teacher_inputs else None
  if strategy == "vmap":
    logits, features = jax.vmap(one_teacher, in_axes=(0, 0, x_axis))(
        params, state, x
    )
  elif strategy == "scan":

    def body(carry, slices):
      p, s, xi = slices
      return carry, one_teacher(p, s, x if xi is None else xi)

    xs = (params, state, x if per_teacher_inputs else None)
    _, (logits, features) = jax.lax.scan(body, None, xs)
  else:  # "unroll"

    def take(tree, i):
      return jax.tree.map(lambda leaf: leaf[i], tree)

    outs = [
        one_teacher(
            take(params, i),
            take(state, i),
            take(x, i) if per_teacher_inputs else x,
        )
        for i in range(k)
    ]
    logits, features = jax.tree.map(lambda *leaves: jnp.stack(leaves), *outs)
  return TeacherOutputs(
      logits=jax.lax.stop_gradient(logits),
      features=jax.lax.stop_gradient(dict(features)),
  )


def _num_classes(value: Any, name: str) -> int:
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    return int(value)
  shape = getattr(value, "shape", None)
  if shape is None or len(shape) < 1:
    raise TypeError(
        f"`{name}` must be a number of classes or logits with a class axis"
        f" last, got {value!r}."
    )
  return int(shape[-1])


def check_same_classes(teacher: Any, student: Any) -> None:
  """Raises unless teachers and student predict the same number of classes.

  Meant to run once, before the first train step, on shapes only: each
  argument is a number of classes, or logits (an array or a
  ``jax.ShapeDtypeStruct`` from ``jax.eval_shape``) with the class axis last.

  Args:
    teacher: The teachers' class count or logits ``[..., num_classes]``.
    student: The student's class count or logits ``[..., num_classes]``.

  Raises:
    ValueError: ``"teachers produce N classes, student M"`` when they differ.

  Examples:
    >>> import jax
    >>> from jaxkd import teachers
    >>> teachers.check_same_classes(
    ...     jax.ShapeDtypeStruct((3, 8, 10), "float32"), 10)
    >>> teachers.check_same_classes(10, 100)
    Traceback (most recent call last):
      ...
    ValueError: teachers produce 10 classes, student 100.

  .. versionadded:: 0.1.0
  """
  n = _num_classes(teacher, "teacher")
  m = _num_classes(student, "student")
  if n != m:
    raise ValueError(f"teachers produce {n} classes, student {m}.")


def apply_teacher_groups(
    groups: Sequence[TeacherGroup],
    variables: Sequence[TeacherVariables],
    x: PyTree,
    *,
    per_teacher_inputs: bool = False,
) -> TeacherOutputs:
  """Runs several teacher groups (different architectures) on one batch.

  Each group runs with its own strategy (:func:`apply_teachers`). The logits
  are concatenated along the teacher axis in the order of ``groups``; the
  features are kept per group under the keys ``"{group.name}/{feature}"``,
  since different architectures have different feature shapes.

  Args:
    groups: The groups, with distinct names.
    variables: One :class:`TeacherVariables` per group, in the same order.
    x: The shared batch ``[batch, ...]`` or, with ``per_teacher_inputs=True``,
      ``[K_total, batch, ...]`` with the teachers of the groups in order
      (``K_total`` the sum of the group sizes).
    per_teacher_inputs: Whether ``x`` has a leading teacher axis.

  Returns:
    :class:`TeacherOutputs` with ``logits`` ``[K_total, batch, num_classes]``.

  Raises:
    ValueError: If there are no groups, ``groups`` and ``variables`` differ in
      length, two groups share a name, or the groups' class counts differ
      (the message names each group and its class count).

  .. versionadded:: 0.1.0
  """
  groups = list(groups)
  variables = list(variables)
  if not groups:
    raise ValueError("`groups` must hold at least one TeacherGroup, got 0.")
  if len(groups) != len(variables):
    raise ValueError(
        f"`groups` holds {len(groups)} groups but `variables` holds"
        f" {len(variables)}."
    )
  names = [g.name for g in groups]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise ValueError(
        f"Teacher group names must be distinct (they prefix the feature"
        f" keys); {', '.join(map(repr, duplicates))} is used more than once."
    )
  sizes = [_num_teachers(g, v) for g, v in zip(groups, variables)]
  if per_teacher_inputs:
    k_x = num_stacked(x, name="x")
    if k_x != sum(sizes):
      raise ValueError(
          "With `per_teacher_inputs=True`, `x` needs a leading teacher axis of"
          f" size {sum(sizes)} (groups {names} hold {sizes} teachers), got"
          f" {k_x}."
      )
    bounds = np.cumsum([0] + sizes)
    inputs = [
        jax.tree.map(lambda leaf, a=a, b=b: leaf[a:b], x)
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
  else:
    inputs = [x] * len(groups)

  outputs = [
      apply_teachers(g, v, xi, per_teacher_inputs=per_teacher_inputs)
      for g, v, xi in zip(groups, variables, inputs)
  ]
  classes = [out.logits.shape[-1] for out in outputs]
  if len(set(classes)) > 1:
    listing = ", ".join(f"{n!r}: {c}" for n, c in zip(names, classes))
    raise ValueError(
        "Teacher groups must produce the same number of classes, got"
        f" {listing}."
    )
  trailing = [out.logits.shape[1:] for out in outputs]
  if len(set(trailing)) > 1:
    listing = ", ".join(f"{n!r}: {t}" for n, t in zip(names, trailing))
    raise ValueError(
        f"Teacher groups must produce logits of one shape, got {listing}."
    )
  # Groups may compute in different float widths: concatenate in the widest.
  dtype = max((out.logits.dtype for out in outputs), key=lambda d: d.itemsize)
  logits = jnp.concatenate([out.logits.astype(dtype) for out in outputs])
  features = {
      f"{g.name}/{key}": value
      for g, out in zip(groups, outputs)
      for key, value in out.features.items()
  }
  return TeacherOutputs(logits=logits, features=features)


# ---------------------------------------------------------------------------
# Sharding.
# ---------------------------------------------------------------------------


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
