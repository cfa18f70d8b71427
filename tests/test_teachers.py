"""Tests for jaxkd.teachers: stacking, strategies, eval mode, groups, sharding."""

from __future__ import annotations

import dataclasses
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxkd import teachers
from jaxkd.models import Model, from_linen
from tests import helpers

NUM_CLASSES = 5
BATCH = 6
IMAGE_SHAPE = (BATCH, 6, 6, 3)
# Vmapped convolutions run as grouped convolutions, whose float32 sums may be
# ordered differently from K separate convolutions: allow a few ulps.
RTOL = 1e-5
ATOL = 1e-6
STRATEGIES = ("vmap", "scan", "unroll", "auto")


class TinyCNN(nn.Module):
  """Conv -> BatchNorm -> ReLU -> Dropout -> mean pool -> Dense."""

  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, x, train: bool):
    h = nn.Conv(4, (3, 3))(x)
    h = nn.BatchNorm(use_running_average=not train, momentum=0.5)(h)
    h = nn.relu(h)
    h = nn.Dropout(0.5, deterministic=not train)(h)
    embedding = jnp.mean(h, axis=(1, 2))
    logits = nn.Dense(self.num_classes)(embedding)
    return logits, {"stage1": h, "embedding": embedding}


class TinyMLP(nn.Module):
  """Flatten -> Dense -> BatchNorm -> ReLU -> Dense."""

  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, x, train: bool):
    h = x.reshape((x.shape[0], -1))
    h = nn.Dense(7)(h)
    h = nn.BatchNorm(use_running_average=not train, momentum=0.5)(h)
    h = nn.relu(h)
    return nn.Dense(self.num_classes)(h), {"embedding": h}


def _images(seed, shape=IMAGE_SHAPE):
  return jnp.asarray(
      np.random.default_rng(seed).normal(size=shape), jnp.float32
  )


def _random_teachers(model, k, seed=0):
  """K teachers with distinct params and non-trivial running statistics.

  The variables are drawn with NumPy in the shapes ``jax.eval_shape`` gives,
  which costs no compilation. Running means and variances far from (0, 1)
  make eval mode observably different from train mode.
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0), X)
  gen = np.random.default_rng(seed)

  def draw(path, leaf):
    if jax.tree_util.keystr(path).endswith("['var']"):
      values = gen.uniform(0.5, 2.0, leaf.shape)
    else:
      values = gen.normal(size=leaf.shape) * 0.5
    return jnp.asarray(values, leaf.dtype)

  variables = [
      jax.tree_util.tree_map_with_path(draw, shapes) for _ in range(k)
  ]
  return [p for p, _ in variables], [s for _, s in variables]


X = _images(7)
CNN = from_linen(TinyCNN(), name="cnn")
MLP = from_linen(TinyMLP(), name="mlp")
CNN_PARAMS, CNN_STATES = _random_teachers(CNN, 3)
MLP_PARAMS, MLP_STATES = _random_teachers(MLP, 2, seed=1)


@functools.cache
def _cnn_group(strategy="auto"):
  return teachers.TeacherGroup.create(
      CNN, CNN_PARAMS, CNN_STATES, strategy=strategy, name="cnn"
  )


# One jitted entry point shared by the tests: the group and the keyword
# arguments are static, the variables and the inputs are arguments.
_apply = jax.jit(
    teachers.apply_teachers,
    static_argnums=0,
    static_argnames=("strategy", "per_teacher_inputs"),
)


@functools.cache
def _eval_apply(model):
  return jax.jit(
      lambda p, s, x: model.apply(p, s, x, train=False, rng=None)[:2]
  )


def _loop(model, params_list, state_list, xs):
  """Reference: a Python loop of ``model.apply`` in eval mode."""
  outs = [
      _eval_apply(model)(p, s, x)
      for p, s, x in zip(params_list, state_list, xs)
  ]
  return jax.tree.map(lambda *a: jnp.stack(a), *outs)


# ---------------------------------------------------------------------------
# Stacking.
# ---------------------------------------------------------------------------


def test_stack_unstack_roundtrip():
  stacked = teachers.stack_params(CNN_PARAMS)
  assert teachers.num_stacked(stacked) == 3
  assert stacked["Conv_0"]["kernel"].shape == (3, 3, 3, 3, 4)
  back = teachers.unstack_params(stacked)
  assert len(back) == 3
  for original, restored in zip(CNN_PARAMS, back):
    assert jax.tree.structure(original) == jax.tree.structure(restored)
    jax.tree.map(np.testing.assert_array_equal, original, restored)


def test_stack_single_tree_and_mixed_dtypes():
  trees = [{"a": jnp.ones(2, jnp.bfloat16), "b": jnp.arange(3)}]
  stacked = teachers.stack_params(trees)
  assert stacked["a"].shape == (1, 2) and stacked["a"].dtype == jnp.bfloat16
  assert stacked["b"].dtype == trees[0]["b"].dtype


def test_stack_empty_is_an_error():
  with pytest.raises(ValueError, match=r"`params` must hold at least one"):
    teachers.stack_params([], name="params")


def _tree(**overrides):
  tree = {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}}
  tree["dense"].update(overrides)
  return tree


@pytest.mark.parametrize(
    "bad, pattern",
    [
        (
            _tree(kernel=jnp.ones((3, 5))),
            r"leaf \['dense'\]\['kernel'\] of teacher 2 has shape \(3, 5\) and"
            r" dtype float32, but teacher 0 has shape \(3, 4\) and dtype"
            r" float32",
        ),
        (
            _tree(bias=jnp.zeros(4, jnp.bfloat16)),
            r"leaf \['dense'\]\['bias'\] of teacher 2 has shape \(4,\) and"
            r" dtype bfloat16, but teacher 0 has shape \(4,\) and dtype"
            r" float32",
        ),
        (
            {"dense": {"kernel": jnp.ones((3, 4))}},
            r"teacher 2 has a different tree structure.*leaf"
            r" \['dense'\]\['bias'\] of teacher 0 is missing from teacher 2",
        ),
        (
            _tree(scale=jnp.ones(4)),
            r"teacher 2 has a leaf \['dense'\]\['scale'\] that teacher 0"
            r" lacks",
        ),
    ],
    ids=["shape", "dtype", "missing", "extra"],
)
def test_stack_mismatch_names_leaf_and_teacher(bad, pattern):
  with pytest.raises(ValueError, match=r"`params`: .*" + pattern):
    teachers.stack_params([_tree(), _tree(), bad], name="params")


def test_stack_container_mismatch():
  with pytest.raises(ValueError, match=r"teacher 1 has a different tree"):
    teachers.stack_params([[jnp.ones(2)], (jnp.ones(2),)])


def test_num_stacked_errors():
  with pytest.raises(ValueError, match=r"leaf \['b'\] has leading size 2, but"
                     r" leaf \['a'\] has 3"):
    teachers.num_stacked({"a": jnp.ones((3, 1)), "b": jnp.ones((2, 1))})
  with pytest.raises(ValueError, match=r"leaf \['a'\] is a scalar"):
    teachers.num_stacked({"a": jnp.ones(())})
  with pytest.raises(ValueError, match=r"`stacked` has no array leaves"):
    teachers.num_stacked({})
  with pytest.raises(ValueError, match=r"no array leaves"):
    teachers.unstack_params({})


# ---------------------------------------------------------------------------
# Group configuration.
# ---------------------------------------------------------------------------


def test_group_is_static_and_hashes_by_identity():
  group, variables = _cnn_group()
  twin = teachers.TeacherGroup(CNN, strategy="auto", name="cnn")
  assert group != twin and hash(group) != hash(twin)
  assert group == group
  with pytest.raises(dataclasses.FrozenInstanceError):
    group.strategy = "vmap"  # pytype: disable=attribute-error
  # The variables are a pytree of arrays: K-leading leaves only.
  leaves = jax.tree.leaves(variables)
  assert leaves and all(leaf.shape[0] == 3 for leaf in leaves)
  assert "cnn" in repr(group)


def test_group_create_errors():
  with pytest.raises(ValueError, match=r"`params_list` holds 3 teachers but"
                     r" `state_list` holds 2"):
    teachers.TeacherGroup.create(CNN, CNN_PARAMS, CNN_STATES[:2])
  with pytest.raises(ValueError, match=r"`params` must hold at least one"):
    teachers.TeacherGroup.create(CNN, [])
  with pytest.raises(ValueError, match=r"`name` must be a non-empty string"):
    teachers.TeacherGroup(CNN, name="")


def test_group_state_defaults_to_empty():
  model = Model(
      init=None,
      apply=lambda p, s, x, *, train, rng: (x @ p["w"], {}, s),
      name="linear",
  )
  group, variables = teachers.TeacherGroup.create(
      model, [{"w": jnp.eye(3)}, {"w": 2 * jnp.eye(3)}]
  )
  assert variables.state == {}
  out = _apply(group, variables, jnp.ones((2, 3)))
  np.testing.assert_array_equal(out.logits[1], 2 * np.ones((2, 3)))
  assert out.features == {}


def test_mismatched_state_count():
  group, variables = _cnn_group()
  bad = teachers.TeacherVariables(
      variables.params, jax.tree.map(lambda a: a[:2], variables.state)
  )
  with pytest.raises(ValueError, match=r"`params` stack 3 teachers but"
                     r" `state` stacks 2"):
    jax.eval_shape(lambda v: teachers.apply_teachers(group, v, X), bad)
  with pytest.raises(TypeError, match=r"must be a TeacherVariables"):
    teachers.apply_teachers(group, tuple(variables), X)


@pytest.mark.parametrize("where", ["group", "call"])
def test_unknown_strategy(where):
  pattern = r"`strategy` must be one of 'auto', 'vmap', 'scan', 'unroll'"
  with pytest.raises(ValueError, match=pattern):
    if where == "group":
      teachers.TeacherGroup(CNN, strategy="loop")
    else:
      group, variables = _cnn_group()
      teachers.apply_teachers(group, variables, X, strategy="loop")


def test_auto_strategy_table(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert teachers.resolve_strategy("auto") == "scan"
  assert teachers.resolve_strategy("scan") == "scan"
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert teachers.resolve_strategy("auto") == "vmap"
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert teachers.resolve_strategy("auto") == "vmap"
  monkeypatch.setattr(jax, "default_backend", lambda: "neuron")
  assert teachers.resolve_strategy("auto") == teachers._strategy._AUTO_FALLBACK


# ---------------------------------------------------------------------------
# Numbers: every strategy equals a loop of model.apply in eval mode.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategies_match_python_loop(strategy):
  group, variables = _cnn_group()
  out = _apply(group, variables, X, strategy=strategy)
  logits, features = _loop(CNN, CNN_PARAMS, CNN_STATES, [X] * 3)
  assert out.logits.shape == (3, BATCH, NUM_CLASSES)
  assert set(out.features) == {"stage1", "embedding"}
  assert out.features["stage1"].shape == (3, *IMAGE_SHAPE[:3], 4)
  helpers.assert_close(out.logits, logits, rtol=RTOL, atol=ATOL)
  helpers.assert_close(out.features, features, rtol=RTOL, atol=ATOL)


def _convolutions(hlo_text):
  """(output features, feature_group_count) of each StableHLO convolution."""
  found = []
  for line in hlo_text.splitlines():
    if "stablehlo.convolution" not in line:
      continue
    groups = int(re.search(r"feature_group_count = (\d+)", line).group(1))
    out_features = int(re.search(r"-> tensor<(?:\d+x)+?(\d+)xf32>", line)
                       .group(1))
    found.append((out_features, groups))
  return found


def test_vmapped_teachers_share_one_convolution_over_a_shared_input():
  """K teachers on one input: the first convolution is one convolution with
  K x the output channels (JAX's batching rule when only the kernel is
  batched), not a grouped one; on per-teacher inputs it is grouped."""
  group, variables = _cnn_group()
  shared = _apply.lower(group, variables, X, strategy="vmap").as_text()
  assert _convolutions(shared) == [(3 * 4, 1)]
  xs = jnp.stack([X] * 3)
  separate = _apply.lower(group, variables, xs, strategy="vmap",
                          per_teacher_inputs=True).as_text()
  assert _convolutions(separate) == [(3 * 4, 3)]


def test_group_call_matches_python_loop():
  group, variables = _cnn_group("scan")
  out = jax.jit(lambda v, x: group(v, x))(variables, X)
  logits, features = _loop(CNN, CNN_PARAMS, CNN_STATES, [X] * 3)
  helpers.assert_close(out.logits, logits, rtol=RTOL, atol=ATOL)
  helpers.assert_close(out.features, features, rtol=RTOL, atol=ATOL)


def test_eval_mode_uses_running_statistics():
  group, variables = _cnn_group()
  full = _apply(group, variables, X, strategy="vmap").logits
  # Eval mode: a sample's output does not depend on the rest of its batch.
  first = _apply(group, variables, X[:2], strategy="vmap").logits
  reordered = _apply(group, variables, X[::-1], strategy="vmap").logits
  helpers.assert_close(first, full[:, :2], rtol=RTOL, atol=ATOL)
  helpers.assert_close(reordered, full[:, ::-1], rtol=RTOL, atol=ATOL)


def _spy(model):
  """Wraps ``model.apply`` to count traces and record how it was called."""
  calls = []

  def apply(params, state, x, *, train, rng):
    calls.append((train, rng))
    return model.apply(params, state, x, train=train, rng=rng)

  return Model(init=model.init, apply=apply, name="spy"), calls


@pytest.mark.parametrize("strategy", ["vmap", "scan", "unroll"])
def test_called_in_eval_mode_and_state_untouched(strategy):
  spy, calls = _spy(CNN)
  group, variables = teachers.TeacherGroup.create(
      spy, CNN_PARAMS, CNN_STATES, strategy=strategy
  )
  before = jax.tree.map(np.array, variables)
  jax.jit(lambda v, x: group(v, x))(variables, X)
  assert calls and all(train is False and rng is None for train, rng in calls)
  jax.tree.map(np.testing.assert_array_equal, before, variables)


@pytest.mark.parametrize(
    "strategy, k, expected", [
        ("scan", 2, 1), ("scan", 5, 1), ("vmap", 5, 1), ("unroll", 2, 2),
        ("unroll", 5, 5),
    ],
)
def test_traces_of_apply(strategy, k, expected):
  spy, calls = _spy(MLP)
  x = X[:2]
  group, variables = teachers.TeacherGroup.create(
      spy, [MLP_PARAMS[0]] * k, [MLP_STATES[0]] * k, strategy=strategy
  )
  jax.jit(lambda v, x: group(v, x)).lower(variables, x)
  assert len(calls) == expected


# ---------------------------------------------------------------------------
# Gradients.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["vmap", "scan", "unroll"])
def test_no_gradient_to_teachers_or_through_outputs(strategy):
  group, variables = _cnn_group()

  def loss(params, x):
    out = teachers.apply_teachers(
        group, teachers.TeacherVariables(params, variables.state), x,
        strategy=strategy,
    )
    return jnp.sum(out.logits**2) + sum(
        jnp.sum(f**2) for f in out.features.values()
    )

  value, (g_params, g_x) = jax.jit(jax.value_and_grad(loss, (0, 1)))(
      variables.params, X
  )
  assert value > 0
  for leaf in jax.tree.leaves(g_params):
    np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
  np.testing.assert_array_equal(g_x, np.zeros_like(g_x))


def test_student_gradient_through_teacher_outputs_is_zero():
  group, variables = _cnn_group()

  def loss(w):
    # A "student" produces the input the teachers see (e.g. a generator or
    # a learned perturbation) and is compared with their outputs.
    x = X * w
    out = teachers.apply_teachers(group, variables, x, strategy="unroll")
    return jnp.sum(out.logits) * w + jnp.sum(jnp.mean(out.logits, 0) ** 2)

  w = jnp.float32(1.3)
  grad = jax.jit(jax.grad(loss))(w)
  out = _apply(group, variables, X * w, strategy="unroll")
  # Only the explicit `* w` term contributes.
  helpers.assert_close(grad, jnp.sum(out.logits), rtol=RTOL)


# ---------------------------------------------------------------------------
# Per-teacher inputs.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["vmap", "scan", "unroll"])
def test_per_teacher_inputs(strategy):
  group, variables = _cnn_group()
  xs = jnp.stack([X, X + 0.5, -X])
  out = _apply(group, variables, xs, strategy=strategy,
               per_teacher_inputs=True)
  logits, features = _loop(CNN, CNN_PARAMS, CNN_STATES, list(xs))
  helpers.assert_close(out.logits, logits, rtol=RTOL, atol=ATOL)
  helpers.assert_close(out.features, features, rtol=RTOL, atol=ATOL)


def test_per_teacher_inputs_wrong_count():
  group, variables = _cnn_group()
  with pytest.raises(ValueError, match=r"leading teacher axis of size 3"
                     r" \(group 'cnn'\), got 2"):
    jax.eval_shape(
        lambda v, x: teachers.apply_teachers(
            group, v, x, per_teacher_inputs=True
        ),
        variables, jnp.stack([X, X]),
    )


# ---------------------------------------------------------------------------
# Several groups.
# ---------------------------------------------------------------------------


def _mlp_group(strategy="scan", name="mlp", num_classes=NUM_CLASSES):
  if num_classes == NUM_CLASSES:
    model, params, states = MLP, MLP_PARAMS, MLP_STATES
  else:
    model = from_linen(TinyMLP(num_classes=num_classes))
    params, states = _random_teachers(model, 2)
  return teachers.TeacherGroup.create(
      model, params, states, strategy=strategy, name=name
  )


_apply_groups = jax.jit(
    teachers.apply_teacher_groups,
    static_argnums=0,
    static_argnames="per_teacher_inputs",
)


def test_groups_concatenate_logits_and_prefix_features():
  cnn, cnn_vars = _cnn_group("vmap")
  mlp, mlp_vars = _mlp_group()
  out = _apply_groups((cnn, mlp), (cnn_vars, mlp_vars), X)
  cnn_logits, cnn_features = _loop(CNN, CNN_PARAMS, CNN_STATES, [X] * 3)
  mlp_logits, mlp_features = _loop(MLP, MLP_PARAMS, MLP_STATES, [X] * 2)
  assert out.logits.shape == (5, BATCH, NUM_CLASSES)
  helpers.assert_close(
      out.logits, jnp.concatenate([cnn_logits, mlp_logits]), rtol=RTOL,
      atol=ATOL,
  )
  assert set(out.features) == {"cnn/stage1", "cnn/embedding", "mlp/embedding"}
  helpers.assert_close(
      out.features["cnn/stage1"], cnn_features["stage1"], rtol=RTOL, atol=ATOL
  )
  helpers.assert_close(
      out.features["mlp/embedding"], mlp_features["embedding"], rtol=RTOL,
      atol=ATOL,
  )


def test_groups_per_teacher_inputs_are_split_in_order():
  cnn, cnn_vars = _cnn_group("unroll")
  mlp, mlp_vars = _mlp_group()
  xs = jnp.stack([X + i for i in range(5)])
  out = _apply_groups(
      (cnn, mlp), (cnn_vars, mlp_vars), xs, per_teacher_inputs=True
  )
  cnn_logits, _ = _loop(CNN, CNN_PARAMS, CNN_STATES, list(xs[:3]))
  mlp_logits, _ = _loop(MLP, MLP_PARAMS, MLP_STATES, list(xs[3:]))
  helpers.assert_close(
      out.logits, jnp.concatenate([cnn_logits, mlp_logits]), rtol=RTOL,
      atol=ATOL,
  )
  with pytest.raises(ValueError, match=r"leading teacher axis of size 5"):
    jax.eval_shape(
        lambda v, x: teachers.apply_teacher_groups(
            (cnn, mlp), v, x, per_teacher_inputs=True
        ),
        (cnn_vars, mlp_vars), xs[:4],
    )


def test_groups_errors():
  cnn, cnn_vars = _cnn_group()
  mlp, mlp_vars = _mlp_group()
  wide, wide_vars = _mlp_group(name="wide", num_classes=7)
  with pytest.raises(ValueError, match=r"same number of classes, got 'cnn':"
                     r" 5, 'wide': 7"):
    jax.eval_shape(
        lambda v, x: teachers.apply_teacher_groups((cnn, wide), v, x),
        (cnn_vars, wide_vars), X,
    )
  twin, twin_vars = _mlp_group(name="cnn")
  with pytest.raises(ValueError, match=r"names must be distinct.*'cnn'"):
    jax.eval_shape(
        lambda v, x: teachers.apply_teacher_groups((cnn, twin), v, x),
        (cnn_vars, twin_vars), X,
    )
  with pytest.raises(ValueError, match=r"`groups` holds 2 groups but"
                     r" `variables` holds 1"):
    teachers.apply_teacher_groups((cnn, mlp), (cnn_vars,), X)
  with pytest.raises(ValueError, match=r"at least one TeacherGroup"):
    teachers.apply_teacher_groups((), (), X)


def test_check_same_classes():
  group, variables = _cnn_group()
  shapes = jax.eval_shape(
      lambda v, x: teachers.apply_teachers(group, v, x), variables, X
  )
  teachers.check_same_classes(shapes.logits, NUM_CLASSES)
  teachers.check_same_classes(NUM_CLASSES, jnp.zeros((2, NUM_CLASSES)))
  with pytest.raises(ValueError, match=r"^teachers produce 5 classes,"
                     r" student 10\.$"):
    teachers.check_same_classes(shapes.logits, jnp.zeros((BATCH, 10)))
  with pytest.raises(TypeError, match=r"`student` must be a number of"):
    teachers.check_same_classes(5, "ten")


# ---------------------------------------------------------------------------
# Sharding over the teacher axis.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh():
  if len(jax.devices()) < 8:
    pytest.skip("needs the 8 CPU devices of conftest")
  return jax.make_mesh(
      (4,), ("teacher",), (jax.sharding.AxisType.Auto,),
      devices=jax.devices()[:4],
  )


@pytest.fixture(scope="module")
def four_teachers():
  return teachers.TeacherGroup.create(
      CNN, CNN_PARAMS + CNN_PARAMS[:1], CNN_STATES + CNN_STATES[:1],
      name="four",
  )


@pytest.mark.parametrize("strategy", ["vmap", "scan", "unroll"])
def test_shard_teacher_axis(mesh, four_teachers, strategy):
  group, variables = four_teachers
  sharded = teachers.shard_teacher_axis(variables, mesh)
  for leaf in jax.tree.leaves(sharded):
    assert isinstance(leaf.sharding, NamedSharding)
    assert leaf.sharding.spec == PartitionSpec("teacher")
    assert leaf.sharding.mesh.shape == {"teacher": 4}
    assert {s.data.shape[0] for s in leaf.addressable_shards} == {1}
  expected = _apply(group, variables, X, strategy="unroll")
  out = _apply(group, sharded, X, strategy=strategy)
  helpers.assert_close(out, expected, rtol=RTOL, atol=ATOL)
  if strategy == "vmap":  # The computation itself is split over teachers.
    assert out.logits.sharding.spec == PartitionSpec("teacher")


def test_shard_teacher_axis_errors(mesh):
  _, variables = _cnn_group()
  with pytest.raises(ValueError, match=r"The 3 teachers cannot be split"
                     r" evenly over mesh axis 'teacher' of size 4"):
    teachers.shard_teacher_axis(variables, mesh)
  with pytest.raises(ValueError, match=r"`axis_name` 'model' is not an axis"):
    teachers.shard_teacher_axis(variables, mesh, axis_name="model")
  explicit = jax.make_mesh(
      (4,), ("teacher",), (jax.sharding.AxisType.Explicit,),
      devices=jax.devices()[:4],
  )
  with pytest.raises(ValueError, match=r"Mesh axis 'teacher' has type"
                     r" .*Explicit.*needs AxisType.Auto"):
    teachers.shard_teacher_axis(variables, explicit)
