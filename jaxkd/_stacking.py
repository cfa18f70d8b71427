"""Stacking same-structure pytrees on a new leading axis (K teachers as one).

Every leaf of the stacked tree has the K trees' leaves stacked on axis 0;
the structures, shapes and dtypes must agree leaf by leaf (the error names
the first leaf that differs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def _describe_leaf(leaf: Any) -> str:
  return f"shape {tuple(np.shape(leaf))} and dtype {jnp.result_type(leaf)}"


def _check_same_structure(
    name: str, reference: PyTree, tree: PyTree, index: int
) -> None:
  """Raises naming the first leaf path by which ``tree`` differs."""
  ref_treedef = jax.tree.structure(reference)
  treedef = jax.tree.structure(tree)
  if ref_treedef == treedef:
    return
  ref_paths = [
      jax.tree_util.keystr(p)
      for p, _ in jax.tree_util.tree_flatten_with_path(reference)[0]
  ]
  paths = [
      jax.tree_util.keystr(p)
      for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
  ]
  path_set, ref_path_set = set(paths), set(ref_paths)
  missing = [p for p in ref_paths if p not in path_set]
  extra = [p for p in paths if p not in ref_path_set]
  if missing:
    detail = f"leaf {missing[0]} of teacher 0 is missing from teacher {index}"
  elif extra:
    detail = f"teacher {index} has a leaf {extra[0]} that teacher 0 lacks"
  else:
    # Same leaf paths, different containers (say a tuple against a list).
    detail = f"teacher 0 is {ref_treedef} and teacher {index} is {treedef}"
  raise ValueError(
      f"`{name}`: teacher {index} has a different tree structure from teacher"
      f" 0: {detail}."
  )


def stack_params(trees: Sequence[PyTree], *, name: str = "trees") -> PyTree:
  """Stacks K pytrees of identical structure on a new leading axis.

  Used for the parameters and for the state (batch statistics) of K teachers
  of one architecture.

  Args:
    trees: A non-empty sequence of K pytrees with the same structure, and
      leaves of the same shapes and dtypes.
    name: What the trees are, for error messages (``"params"``, ``"state"``).

  Returns:
    One pytree of the same structure whose leaves have shape ``[K, ...]``.

  Raises:
    ValueError: If ``trees`` is empty, or a tree differs from the first in
      structure, or in the shape or dtype of a leaf. The message names the
      first such leaf by its key path, the teacher index and both shapes and
      dtypes.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import teachers
    >>> trees = [{"w": jnp.ones((2, 3)), "b": jnp.zeros(3)} for _ in range(4)]
    >>> stacked = teachers.stack_params(trees)
    >>> print(stacked["w"].shape, stacked["b"].shape)
    (4, 2, 3) (4, 3)
    >>> teachers.num_stacked(stacked)
    4
    >>> teachers.stack_params([{"w": jnp.ones(3)}, {"w": jnp.ones(2)}])
    Traceback (most recent call last):
      ...
    ValueError: `trees`: leaf ['w'] of teacher 1 has shape (2,) and dtype float32, but teacher 0 has shape (3,) and dtype float32.

  .. versionadded:: 0.1.0
  """
  trees = list(trees)
  if not trees:
    raise ValueError(f"`{name}` must hold at least one teacher's tree, got 0.")
  reference = trees[0]
  ref_leaves = jax.tree_util.tree_flatten_with_path(reference)[0]
  for index, tree in enumerate(trees[1:], start=1):
    _check_same_structure(name, reference, tree, index)
    leaves = jax.tree.leaves(tree)
    for (path, ref_leaf), leaf in zip(ref_leaves, leaves):
      if np.shape(ref_leaf) != np.shape(leaf) or jnp.result_type(
          ref_leaf
      ) != jnp.result_type(leaf):
        raise ValueError(
            f"`{name}`: leaf {jax.tree_util.keystr(path)} of teacher {index}"
            f" has {_describe_leaf(leaf)}, but teacher 0 has"
            f" {_describe_leaf(ref_leaf)}."
        )
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def num_stacked(stacked: PyTree, *, name: str = "stacked") -> int:
  """Returns K, the leading size shared by every leaf of a stacked pytree.

  Args:
    stacked: A pytree whose leaves all have shape ``[K, ...]``.
    name: What the tree is, for error messages.

  Returns:
    ``K``.

  Raises:
    ValueError: If the tree has no leaves, a leaf is a scalar, or two leaves
      have different leading sizes (the message names the first such leaf).

  .. versionadded:: 0.1.0
  """
  leaves = jax.tree_util.tree_flatten_with_path(stacked)[0]
  if not leaves:
    raise ValueError(
        f"`{name}` has no array leaves, so its number of teachers is unknown."
    )
  size = None
  first_path = None
  for path, leaf in leaves:
    shape = np.shape(leaf)
    if not shape:
      raise ValueError(
          f"`{name}`: leaf {jax.tree_util.keystr(path)} is a scalar; every"
          " leaf of a stacked tree needs a leading teacher axis."
      )
    if size is None:
      size, first_path = shape[0], path
    elif shape[0] != size:
      raise ValueError(
          f"`{name}`: leaf {jax.tree_util.keystr(path)} has leading size"
          f" {shape[0]}, but leaf {jax.tree_util.keystr(first_path)} has"
          f" {size}; every leaf must share the teacher axis."
      )
  return int(size)


def unstack_params(stacked: PyTree, *, name: str = "stacked") -> list[PyTree]:
  """Splits a stacked pytree into its K trees; inverse of :func:`stack_params`.

  Args:
    stacked: A pytree whose leaves all have shape ``[K, ...]``.
    name: What the tree is, for error messages.

  Returns:
    A list of K pytrees with the leading axis removed.

  .. versionadded:: 0.1.0
  """
  k = num_stacked(stacked, name=name)
  return [jax.tree.map(lambda leaf, i=i: leaf[i], stacked) for i in range(k)]
