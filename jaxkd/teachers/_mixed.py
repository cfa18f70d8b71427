"""Teachers of different architectures: several groups on one batch.

Private module of :mod:`jaxkd.teachers`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd._stacking import num_stacked
from jaxkd.teachers._group import TeacherGroup
from jaxkd.teachers._group import TeacherOutputs
from jaxkd.teachers._group import TeacherVariables
from jaxkd.teachers._group import apply_teachers
from jaxkd.teachers._group import num_teachers

PyTree = Any


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
  sizes = [num_teachers(g, v) for g, v in zip(groups, variables)]
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
