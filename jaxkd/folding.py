"""Inference-time rewrites of frozen teachers: BatchNorm folding.

A teacher is never trained during distillation, so its BatchNorm layers only
ever apply their running statistics. A BatchNorm that directly follows a
convolution (or a dense layer) is then an affine map per output channel, and
can be folded into that layer once, at load time:

.. math::

  s = \\gamma / \\sqrt{\\sigma^2 + \\epsilon}, \\qquad
  W' = W \\cdot s, \\qquad b' = (b - \\mu) \\cdot s + \\beta,

where ``W`` is scaled along its output-channel (last) axis and ``b`` is the
layer's bias (zero when it has none). The folded teacher skips the BatchNorm
entirely: one convolution with a bias replaces a convolution, a subtraction,
a multiplication and an addition over the whole activation.

:func:`fold_batchnorm` works on any ``flax.linen`` module, by method
interception rather than by a rewrite of the model's code:

1. the module is traced once on abstract values (``jax.eval_shape``, nothing
   is computed) while every ``nn.Conv``/``nn.Dense`` and ``nn.BatchNorm``
   call is watched; a BatchNorm whose input *is* the array a convolution or
   dense layer just returned, normalising its last axis with running
   statistics, forms a pair with that layer;
2. each pair's kernel (and bias) is rewritten as above, and the BatchNorm's
   parameters and statistics are dropped;
3. the folded model runs the same module under an interceptor that adds the
   folded bias after each paired layer and turns each paired BatchNorm into
   a cast to its output dtype.

Scope and checks. Folding is exact only if the layer's output feeds nothing
but its BatchNorm. Interception sees which BatchNorm reads a layer's output,
not who else does, so :func:`fold_batchnorm` also runs the folded and the
original model on a random batch of the sample input's shape and raises if
their logits or features differ (``check=True``, the default). Every bundled
CNN (``jaxkd.models``: CIFAR ResNets, WRNs, VGGs, MobileNetV2, ShuffleNetV2)
folds completely; BatchNorms that follow anything else (the pre-activation
BatchNorms of a WRN, for example) are kept, with their statistics, in the
folded variables. The folded model is inference-only: it raises for
``train=True``.

With a bfloat16 compute dtype the folded layer rounds differently from a
float32 BatchNorm after a bfloat16 convolution; the results agree to
bfloat16 precision, not bit for bit.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
from flax.core import unfreeze
import jax
import jax.numpy as jnp
from jax.extend import core as jax_core
import numpy as np

from jaxkd.models import Model

__all__ = [
    "fold_batchnorm",
]

PyTree = Any
Path = tuple[str, ...]

_FOLDABLE_LAYERS = (nn.Conv, nn.Dense)


@dataclasses.dataclass(frozen=True)
class _Pair:
  layer: Path
  norm: Path
  norm_dtype: Any  # The dtype the BatchNorm returned.
  epsilon: float


# Marks each conv/dense output in the traced program, to count its consumers.
# It is only ever traced (jax.make_jaxpr), never executed.
_marker = jax_core.Primitive("jaxkd_fold_marker")
_marker.def_abstract_eval(lambda x, **_: x)


def _linen_module(model: Any) -> nn.Module:
  """The linen module of ``model``: itself, or the one a Model wraps."""
  if isinstance(model, nn.Module):
    return model
  if isinstance(model, Model):
    # `from_linen` (and so `models.create`) closes its apply over the module.
    for cell in getattr(model.apply, "__closure__", None) or ():
      try:
        value = cell.cell_contents
      except ValueError:  # An empty cell.
        continue
      if isinstance(value, nn.Module):
        return value
  raise TypeError(
      "`model` must be a flax.linen Module or a jaxkd Model made by"
      " `models.create`/`models.from_linen`, got"
      f" {type(model).__name__} {model!r}."
  )


def _batchnorm_input_and_mode(module: nn.BatchNorm, args, kwargs):
  x = args[0] if args else kwargs.get("x")
  use_running_average = (
      args[1] if len(args) > 1 else kwargs.get("use_running_average")
  )
  if use_running_average is None:
    use_running_average = module.use_running_average
  return x, use_running_average, kwargs.get("mask")


def _use_counts(jaxpr) -> dict[Any, int]:
  """How many times each variable is read, in ``jaxpr`` and its sub-jaxprs."""
  counts: dict[Any, int] = {}

  def visit(j):
    for eqn in j.eqns:
      for var in eqn.invars:
        if isinstance(var, jax_core.Var):
          counts[var] = counts.get(var, 0) + 1
      for sub in jax_core.jaxprs_in_params(eqn.params):
        visit(sub)
    for var in j.outvars:
      if isinstance(var, jax_core.Var):
        counts[var] = counts.get(var, 0) + 1

  visit(jaxpr)
  return counts


def _marker_outputs(jaxpr) -> dict[int, Any]:
  """``{index: output variable}`` of every marker in ``jaxpr``."""
  found = {}

  def visit(j):
    for eqn in j.eqns:
      if eqn.primitive is _marker:
        found[eqn.params["index"]] = eqn.outvars[0]
      for sub in jax_core.jaxprs_in_params(eqn.params):
        visit(sub)

  visit(jaxpr)
  return found


def _find_pairs(module: nn.Module, variables, sample_input) -> list[_Pair]:
  """Traces ``module`` and pairs each BatchNorm with the layer it reads.

  A pair needs the BatchNorm's input to be the very array the layer returned,
  that array to have no other reader in the traced program, and the
  BatchNorm to normalise the last axis with its running statistics.
  """
  layer_outputs: dict[int, tuple[Any, Path, int]] = {}
  active: set[Path] = set()
  candidates: dict[Path, tuple[_Pair, int]] = {}

  def interceptor(next_fun, args, kwargs, context):
    layer = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    path = tuple(layer.path)
    if isinstance(layer, _FOLDABLE_LAYERS):
      index = len(layer_outputs)
      out = _marker.bind(next_fun(*args, **kwargs), index=index)
      # The reference kept here also stops the id from being reused.
      layer_outputs[id(out)] = (out, path, index)
      return out
    if isinstance(layer, nn.BatchNorm) and path not in active:
      # The outermost call of this BatchNorm (a subclass's __call__ may call
      # nn.BatchNorm.__call__ on a cast copy of the input).
      x, running, mask = _batchnorm_input_and_mode(layer, args, kwargs)
      source = layer_outputs.get(id(x))
      active.add(path)
      try:
        out = next_fun(*args, **kwargs)
      finally:
        active.discard(path)
      axis = layer.axis if isinstance(layer.axis, int) else None
      if (
          source is not None
          and source[0] is x
          and running is True
          and mask is None
          and axis is not None
          and axis % x.ndim == x.ndim - 1
          and path not in candidates
      ):
        pair = _Pair(
            layer=source[1],
            norm=path,
            norm_dtype=out.dtype,
            epsilon=float(layer.epsilon),
        )
        candidates[path] = (pair, source[2])
      return out
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    closed = jax.make_jaxpr(
        lambda v, x: module.apply(v, x, train=False)
    )(variables, sample_input)
  counts = _use_counts(closed.jaxpr)
  outputs = _marker_outputs(closed.jaxpr)
  return [
      pair
      for pair, index in candidates.values()
      if index in outputs and counts.get(outputs[index], 0) == 1
  ]


def _get(tree: PyTree, path: Path) -> Any:
  for name in path:
    tree = tree[name]
  return tree


def _pop(tree: dict, path: Path) -> None:
  """Removes ``tree[path]`` and any dict it leaves empty."""
  *parents, name = path
  nodes = [tree]
  for parent in parents:
    if parent not in nodes[-1]:
      return
    nodes.append(nodes[-1][parent])
  nodes[-1].pop(name, None)
  for parent, node in zip(reversed(parents), reversed(nodes[:-1])):
    if not node[parent]:
      del node[parent]


def _along_last_axis(vector: jax.Array, ndim: int) -> jax.Array:
  """``vector`` shaped to broadcast over the last of ``ndim`` axes."""
  return vector.reshape((1,) * (ndim - 1) + vector.shape)


def _fold_variables(variables: dict, pairs: list[_Pair]) -> dict:
  variables = jax.tree.map(lambda leaf: leaf, unfreeze(variables))
  params = variables["params"]
  for pair in pairs:
    norm_params = _get(params, pair.norm)
    stats = _get(variables["batch_stats"], pair.norm)
    layer_params = _get(params, pair.layer)
    kernel = jnp.asarray(layer_params["kernel"])
    features = kernel.shape[-1]
    dtype = kernel.dtype
    mean = jnp.asarray(stats["mean"], dtype)
    var = jnp.asarray(stats["var"], dtype)
    gamma = jnp.asarray(norm_params.get("scale", jnp.ones(features)), dtype)
    beta = jnp.asarray(norm_params.get("bias", jnp.zeros(features)), dtype)
    bias = jnp.asarray(layer_params.get("bias", jnp.zeros(features)), dtype)
    scale = gamma * jax.lax.rsqrt(var + jnp.asarray(pair.epsilon, dtype))
    # Explicit broadcast over the output-channel (last) axis.
    layer_params["kernel"] = kernel * _along_last_axis(scale, kernel.ndim)
    layer_params["bias"] = (bias - mean) * scale + beta
    _pop(params, pair.norm)
    for collection in list(variables):
      if collection != "params":
        _pop(variables[collection], pair.norm)
        if not variables[collection]:
          del variables[collection]
  return variables


def _folded_apply_fn(module: nn.Module, pairs: list[_Pair]):
  by_layer = {pair.layer: pair for pair in pairs}
  by_norm = {pair.norm: pair for pair in pairs}

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    layer = context.module
    path = tuple(layer.path)
    if isinstance(layer, _FOLDABLE_LAYERS) and path in by_layer:
      out = next_fun(*args, **kwargs)
      if not layer.use_bias:
        bias = layer.get_variable("params", "bias")
        bias = jnp.asarray(bias).astype(out.dtype)
        out = out + _along_last_axis(bias, out.ndim)
      return out
    if isinstance(layer, nn.BatchNorm) and path in by_norm:
      x = args[0] if args else kwargs["x"]
      return x.astype(by_norm[path].norm_dtype)
    return next_fun(*args, **kwargs)

  def apply(params, state, x, *, train: bool, rng: jax.Array | None = None):
    if train:
      raise ValueError(
          "A model with folded BatchNorm is for inference only: call it with"
          " `train=False`."
      )
    if jax.tree.leaves(state):
      raise ValueError(
          "A folded model keeps what remains of its state in its params;"
          f" pass `state={{}}`, got {jax.tree.structure(state)}."
      )
    rngs = {"dropout": rng} if rng is not None else {}
    with nn.intercept_methods(interceptor):
      out = module.apply(params, x, train=False, rngs=rngs)
    logits, features = out if isinstance(out, tuple) else (out, {})
    return logits, dict(features), state

  return apply


def _max_relative_error(a, b) -> float:
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  scale = max(float(np.max(np.abs(b), initial=0.0)), 1e-6)
  return float(np.max(np.abs(a - b), initial=0.0)) / scale


def fold_batchnorm(
    model: nn.Module | Model,
    params: PyTree,
    state: PyTree,
    *,
    sample_input: Any = None,
    check: bool = True,
    rtol: float | None = None,
) -> tuple[Model, PyTree]:
  """Folds every BatchNorm that follows a conv or dense layer into it.

  For inference only (frozen teachers). See the module docstring for the
  arithmetic, what is folded and what is kept.

  Args:
    model: A ``flax.linen`` module whose ``__call__(x, train)`` returns
      ``logits`` or ``(logits, features)``, or a :class:`~jaxkd.models.Model`
      made from one by ``models.create`` or ``models.from_linen``.
    params: Its ``"params"`` collection (the ``params`` of the model
      contract).
    state: Its other collections (``{"batch_stats": ...}``).
    sample_input: An array (or ``jax.ShapeDtypeStruct``) of the input's
      shape and dtype, used to trace the model; by default a 32x32 RGB image
      batch ``[2, 32, 32, 3]`` float32, the input of the bundled CNNs.
    check: Compare the folded model with the original on a random batch of
      ``sample_input``'s shape, and raise if they differ.
    rtol: Tolerance of the check, relative to the largest absolute output;
      ``1e-4`` for a float32 model and ``5e-2`` otherwise.

  Returns:
    ``(folded_model, folded_params)``. ``folded_model`` follows the model
    contract and is stateless: call it with ``state={}`` and
    ``train=False``. ``folded_params`` holds the linen variables of the
    folded module: the ``"params"`` collection (paired layers carry the
    folded kernel and a ``"bias"``; paired BatchNorms are gone) and any
    statistics of BatchNorms that were not folded.

  Raises:
    TypeError: If ``model`` is neither a linen module nor a Model wrapping
      one.
    ValueError: If the model cannot be traced on ``sample_input``, or the
      check finds the folded model different from the original.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from jaxkd import folding, models
    >>> model = models.create("resnet8", num_classes=10)
    >>> x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    >>> params, state = model.init(jax.random.key(0), x)
    >>> folded, folded_params = folding.fold_batchnorm(model, params, state)
    >>> sorted(folded_params)
    ['params']
    >>> logits, _, _ = model.apply(params, state, x, train=False)
    >>> folded_logits, _, _ = folded.apply(folded_params, {}, x, train=False)
    >>> bool(jnp.allclose(logits, folded_logits, rtol=1e-4, atol=1e-5))
    True

  .. versionadded:: 0.1.0
  """
  module = _linen_module(model)
  name = getattr(model, "name", None) or type(module).__name__
  variables = {"params": params, **dict(state)}
  if sample_input is None:
    sample_input = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  sample = jax.ShapeDtypeStruct(
      tuple(np.shape(sample_input)), jnp.result_type(sample_input)
  )
  try:
    pairs = _find_pairs(module, variables, sample)
  except Exception as error:  # pylint: disable=broad-except
    raise ValueError(
        f"Could not trace {name!r} on an input of shape {sample.shape} and"
        f" dtype {sample.dtype} to find its BatchNorms; pass"
        " `sample_input=` with the model's input shape."
    ) from error
  folded_variables = _fold_variables(variables, pairs)
  apply = _folded_apply_fn(module, pairs)

  def init(key: jax.Array, x: jax.Array) -> tuple[PyTree, PyTree]:
    original = module.init(key, x, train=False)
    return _fold_variables(unfreeze(original), pairs), {}

  folded = Model(init=init, apply=apply, name=f"{name}/folded")
  if check:
    _check_folded(
        module, variables, folded, folded_variables, sample, name, rtol
    )
  return folded, folded_variables


def _check_folded(module, variables, folded, folded_variables, sample, name,
                  rtol):
  if not jnp.issubdtype(sample.dtype, jnp.floating):
    return  # Token ids and the like: no meaningful random probe.
  x = jax.random.normal(jax.random.key(0), sample.shape, sample.dtype)
  out = module.apply(variables, x, train=False)
  logits, features = out if isinstance(out, tuple) else (out, {})
  folded_logits, folded_features, _ = folded.apply(
      folded_variables, {}, x, train=False
  )
  if rtol is None:
    rtol = 1e-4 if jnp.result_type(logits) == jnp.float32 and all(
        jnp.result_type(f) == jnp.float32 for f in jax.tree.leaves(features)
    ) else 5e-2
  checks = {"logits": (folded_logits, logits)}
  checks.update(
      {f"feature {k!r}": (folded_features[k], v) for k, v in features.items()}
  )
  for what, (got, want) in checks.items():
    error = _max_relative_error(got, want)
    if not error <= rtol:
      raise ValueError(
          f"Folding the BatchNorms of {name!r} changed its {what} by"
          f" {error:.3g} (relative to the largest value; tolerance {rtol}):"
          " a folded layer's output is probably also used by something"
          " other than its BatchNorm. Use the model unfolded."
      )
