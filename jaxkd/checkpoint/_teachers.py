"""Teachers: saved once, loaded by name.

The teachers of a run are frozen, usually much larger than the student, and
the same at every step, so they are not part of the step checkpoints:
:func:`save_teachers` writes a group once and :func:`load_teachers` reads it
back. Private module of :mod:`jaxkd.checkpoint`.
"""

from __future__ import annotations

import os
import re
from typing import Any

from etils import epath
import jax
import orbax.checkpoint as ocp

from jaxkd.checkpoint._trees import PyTree
from jaxkd.checkpoint._trees import _abstract_leaf
from jaxkd.checkpoint._trees import _as_path
from jaxkd.checkpoint._trees import _check_matches
from jaxkd.checkpoint._trees import _like_target
from jaxkd.checkpoint._trees import _to_savable
from jaxkd.teachers import TeacherVariables

__all__ = ["load_teachers", "save_teachers", "saved_teacher_names"]

_TEACHERS_DIR = "teachers"
_NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


def _check_name(name: Any) -> str:
  if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name):
    raise ValueError(
        "`name` must be a non-empty string of letters, digits, '_', '-' and"
        f" '.' (not starting with '.' or '-'), got {name!r}."
    )
  return name


def saved_teacher_names(directory: os.PathLike[str] | str) -> list[str]:
  """The names of the teacher groups saved under ``directory/teachers``.

  .. versionadded:: 0.1.0
  """
  root = _as_path(directory) / _TEACHERS_DIR
  if not root.exists():
    return []
  return sorted(
      p.name
      for p in root.iterdir()
      if p.is_dir()
      and _NAME_PATTERN.fullmatch(p.name)
      and ocp.utils.is_checkpoint_finalized(p)
  )


def _teacher_tree(variables: TeacherVariables) -> dict[str, PyTree]:
  return {"params": variables.params, "state": variables.state}


def save_teachers(
    directory: os.PathLike[str] | str,
    name: str,
    variables: TeacherVariables,
    *,
    overwrite: bool = False,
) -> epath.Path:
  """Saves a teacher group's stacked arrays once, under a name.

  Args:
    directory: The run's (or a shared) checkpoint directory; the teachers go
      to ``directory/teachers/<name>``.
    name: The group's name (letters, digits, ``_``, ``-``, ``.``).
    variables: The group's :class:`~jaxkd.teachers.TeacherVariables`.
    overwrite: Replace teachers already saved under ``name``.

  Returns:
    The directory written.

  Raises:
    ValueError: On a bad name, or when ``name`` is saved already and
      ``overwrite`` is False.

  .. versionadded:: 0.1.0
  """
  name = _check_name(name)
  if not isinstance(variables, TeacherVariables):
    raise TypeError(
        "`variables` must be a TeacherVariables, got"
        f" {type(variables).__name__}."
    )
  path = _as_path(directory) / _TEACHERS_DIR / name
  if path.exists() and not overwrite:
    raise ValueError(
        f"Teachers {name!r} are already saved in {path}; pass"
        " `overwrite=True` to replace them."
    )
  with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
    checkpointer.save(
        path,
        args=ocp.args.StandardSave(_to_savable(_teacher_tree(variables))),
        force=overwrite,
    )
  return path


def load_teachers(
    directory: os.PathLike[str] | str,
    name: str,
    *,
    like: TeacherVariables | None = None,
) -> TeacherVariables:
  """Loads a teacher group saved by :func:`save_teachers`.

  Args:
    directory: The directory given to :func:`save_teachers`.
    name: The group's name.
    like: Optional :class:`~jaxkd.teachers.TeacherVariables` (arrays or
      ``jax.ShapeDtypeStruct`` leaves with shardings) giving the tree types,
      dtypes and shardings to load into, e.g. to shard the teacher axis over
      a mesh. Without it the arrays come back as plain nested dicts with
      their saved dtypes, on the saved placement.

  Returns:
    The group's :class:`~jaxkd.teachers.TeacherVariables`.

  Raises:
    ValueError: If no teachers are saved under ``name`` (the message lists
      the saved names), or ``like`` differs from them in structure or shapes.

  Examples:
    >>> import tempfile
    >>> import jax.numpy as jnp
    >>> from jaxkd import checkpoint, teachers
    >>> variables = teachers.TeacherVariables(
    ...     params={"w": jnp.ones((4, 3))}, state={})
    >>> with tempfile.TemporaryDirectory() as workdir:
    ...   _ = checkpoint.save_teachers(workdir, "linear", variables)
    ...   print(checkpoint.saved_teacher_names(workdir))
    ...   loaded = checkpoint.load_teachers(workdir, "linear")
    ['linear']
    >>> print(loaded.params["w"].shape, loaded.state)
    (4, 3) {}

  .. versionadded:: 0.1.0
  """
  name = _check_name(name)
  names = saved_teacher_names(directory)
  if name not in names:
    listing = ", ".join(map(repr, names)) if names else "none"
    raise ValueError(
        f"No teachers named {name!r} in {_as_path(directory) / _TEACHERS_DIR};"
        f" saved names: {listing}."
    )
  path = _as_path(directory) / _TEACHERS_DIR / name
  with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
    if like is None:
      restored = checkpointer.restore(path, args=ocp.args.StandardRestore())
      return TeacherVariables(
          params=restored["params"], state=restored.get("state") or {}
      )
    target = _teacher_tree(like)
    abstract = jax.tree.map(_abstract_leaf, target)
    _check_matches(
        checkpointer.metadata(path).item_metadata,
        abstract,
        what=f"Teachers {name!r} in {path}",
    )
    restored = checkpointer.restore(
        path, args=ocp.args.StandardRestore(abstract)
    )
  tree = _like_target(target, restored)
  return TeacherVariables(params=tree["params"], state=tree["state"])
