"""A group of K same-architecture teachers and how it runs.

Private module of :mod:`jaxkd.teachers`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxkd._stacking import num_stacked
from jaxkd._stacking import stack_params
from jaxkd.models import Model
from jaxkd.teachers._strategy import check_strategy
from jaxkd.teachers._strategy import resolve_strategy

PyTree = Any
Array = jax.Array


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
    check_strategy(self.strategy)
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


def num_teachers(group: TeacherGroup, variables: TeacherVariables) -> int:
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
  k = num_teachers(group, variables)
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
