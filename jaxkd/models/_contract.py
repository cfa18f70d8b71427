"""The model contract of the distillation engine.

The engine never imports a model class. A model is a pair of pure functions
over pytrees:

* ``init(key, x) -> (params, state)``: trainable parameters and mutable state
  (for example BatchNorm statistics; ``{}`` when there is none), for a sample
  batch ``x``;
* ``apply(params, state, x, *, train, rng) -> (logits, features, new_state)``:
  ``logits`` of shape ``[batch, num_classes]``, ``features`` a dict of named
  intermediate arrays (``"stage1"``, ..., ``"embedding"``), and the updated
  state (equal to ``state`` when ``train`` is ``False``). ``rng`` is a PRNG
  key for dropout and the like, or ``None``.

:func:`from_linen` and :func:`from_nnx` wrap Flax modules into this contract.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Mapping

import flax.linen as nn
from flax import nnx
import jax

PyTree = Any
Features = Mapping[str, jax.Array]
InitFn = Callable[[jax.Array, jax.Array], tuple[PyTree, PyTree]]
ApplyFn = Callable[..., tuple[jax.Array, Features, PyTree]]


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
  """A model as the engine sees it: ``init`` and ``apply`` plus a name.

  Instances compare and hash by identity, so they can be closed over by (or
  passed as static arguments to) ``jax.jit``.
  """

  init: InitFn
  apply: ApplyFn
  name: str = "model"

  def __repr__(self) -> str:
    return f"Model({self.name!r})"


def _split_linen_variables(variables: Mapping[str, Any]) -> tuple[Any, Any]:
  variables = dict(variables)
  params = variables.pop("params", {})
  return params, variables


def _takes_argument(fn: Callable[..., Any], name: str) -> bool:
  try:
    parameters = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return True  # Unknown: call it the documented way.
  return name in parameters or any(
      p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
  )


def from_linen(module: nn.Module, *, name: str | None = None) -> Model:
  """Wraps a ``flax.linen`` module into the :class:`Model` contract.

  The module's ``__call__(x, train: bool)`` returns either ``logits`` or
  ``(logits, features)`` with ``features`` a dict of arrays. A module whose
  ``__call__`` takes no ``train`` argument is called as ``module(x)`` in both
  modes (it then has no train/eval difference of its own). Every variable
  collection other than ``"params"`` (``"batch_stats"``, ...) is the mutable
  state, updated when ``train`` is ``True``. ``rng`` feeds the ``"dropout"``
  stream.

  Args:
    module: The linen module.
    name: A name for error messages and logs; the class name by default.

  Returns:
    The wrapped :class:`Model`.
  """

  if not isinstance(module, nn.Module):
    raise TypeError(
        "`module` must be a flax.linen Module (use `from_nnx` for an nnx"
        f" module), got {type(module).__name__}."
    )
  takes_train = _takes_argument(module.__call__, "train")

  def mode(train: bool) -> dict[str, bool]:
    return {"train": train} if takes_train else {}

  def init(key: jax.Array, x: jax.Array) -> tuple[PyTree, PyTree]:
    params_key, dropout_key = jax.random.split(key)
    variables = module.init(
        {"params": params_key, "dropout": dropout_key}, x, **mode(False)
    )
    return _split_linen_variables(variables)

  def apply(params, state, x, *, train: bool, rng: jax.Array | None = None):
    variables = {"params": params, **state}
    rngs = {"dropout": rng} if rng is not None else {}
    if train and state:
      out, new_state = module.apply(
          variables, x, rngs=rngs, mutable=list(state), **mode(True)
      )
      new_state = dict(new_state)
    else:
      out = module.apply(variables, x, rngs=rngs, **mode(train))
      new_state = state
    logits, features = out if isinstance(out, tuple) else (out, {})
    return logits, dict(features), new_state

  return Model(init=init, apply=apply, name=name or type(module).__name__)


def _nnx_rngs(key: jax.Array) -> nnx.Rngs:
  """Named ``params`` and ``dropout`` streams (and a ``default`` fallback)."""
  params_key, dropout_key, default_key = jax.random.split(key, 3)
  return nnx.Rngs(default_key, params=params_key, dropout=dropout_key)


def _reseed_all(module: nnx.Module, rng: jax.Array) -> None:
  """Reseeds every RNG stream stored in ``module`` from ``rng``.

  The ``dropout`` stream gets ``rng`` itself; any other stored stream (for
  example one a module took from the ``default`` stream) gets an independent
  key folded from it, so that ``rng`` drives all of the module's randomness.
  """
  tags = sorted({
      node.key.tag
      for _, node in nnx.iter_graph(module)
      if isinstance(node, nnx.RngStream)
  })
  keys = {
      tag: rng if tag == "dropout" else jax.random.fold_in(rng, index + 1)
      for index, tag in enumerate(tags)
  }
  if keys:
    nnx.reseed(module, **keys)


def from_nnx(
    make_module: Callable[[nnx.Rngs], nnx.Module], *, name: str | None = None
) -> Model:
  """Wraps a ``flax.nnx`` module into the :class:`Model` contract.

  ``make_module(rngs)`` builds the module; ``init`` calls it with an
  ``nnx.Rngs`` holding ``params`` and ``dropout`` streams (and a ``default``
  one) derived from ``key``, and splits it into its graph definition (kept
  static), its ``nnx.Param`` leaves (the params) and every other variable
  (the state: BatchNorm statistics, RNG keys and counters). ``apply`` merges
  copies of them, switches the module to train or eval mode, calls it, and
  splits the updated state out again; ``rng``, when given, reseeds every RNG
  stream stored in the module (the ``dropout`` stream gets ``rng`` itself).
  The caller's ``params`` and ``state`` are never mutated. The module's
  ``__call__(x)`` returns ``logits`` or ``(logits, features)``.

  Args:
    make_module: Builds the module from an ``nnx.Rngs``.
    name: A name for error messages and logs.

  Returns:
    The wrapped :class:`Model`.
  """
  # The graph definition is static; an abstract build gives it for free. It
  # must be built with the same stream names as ``init`` (RNG streams stored in
  # the module, as ``nnx.Dropout`` does, are part of the graph).
  abstract = nnx.eval_shape(lambda: make_module(_nnx_rngs(jax.random.key(0))))
  graphdef, _, _ = nnx.split(abstract, nnx.Param, ...)

  def init(key: jax.Array, x: jax.Array) -> tuple[PyTree, PyTree]:
    del x  # nnx modules are built with explicit shapes.
    _, params, state = nnx.split(make_module(_nnx_rngs(key)), nnx.Param, ...)
    return params, state

  def apply(params, state, x, *, train: bool, rng: jax.Array | None = None):
    # ``copy=True``: without it the merged module shares its Variables with
    # ``params`` and ``state``, and a training call would mutate the caller's
    # state in place (BatchNorm statistics, RNG counters).
    module = nnx.merge(graphdef, params, state, copy=True)
    if train:
      module.train()
    else:
      module.eval()
    if rng is not None:
      _reseed_all(module, rng)
    out = module(x)
    logits, features = out if isinstance(out, tuple) else (out, {})
    _, _, new_state = nnx.split(module, nnx.Param, ...)
    if not train:
      new_state = state
    return logits, dict(features), new_state

  return Model(
      init=init, apply=apply, name=name or type(abstract).__name__
  )
