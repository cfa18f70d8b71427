"""Tests for jaxkd.sharding: data parallelism, FSDP, teacher axis, multi-host.

The conftest gives 8 CPU devices. Every sharded run is compared with the same
run on one device. The batch size 24 is a dimension of no parameter, so that
an all-gather along an axis of size 24 in the compiled program can only be a
gather of the batch (or of activations along the batch axis).
"""

from __future__ import annotations

import functools
import json
import os
import re
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from jaxkd import objective
from jaxkd import sharding
from jaxkd import teachers
from jaxkd import train_step
from jaxkd.models import from_linen

BATCH = 24
NUM_STEPS = 2
NUM_TEACHERS = 2


class Net(nn.Module):
  """dense-BatchNorm-relu-dense: BatchNorm couples the examples of a batch.

  (Dense rather than convolutional layers: the step compiles in two thirds
  of the time, and compiles dominate this file.)
  """

  width: int

  @nn.compact
  def __call__(self, x, train: bool):
    h = nn.Dense(self.width)(x.reshape(x.shape[0], -1))
    h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(h))
    return nn.Dense(10)(h), {"embedding": h}


STUDENT = from_linen(Net(8), name="student")
TEACHER = from_linen(Net(16), name="teacher")
# Shared tolerance of sharded against single-device runs: the programs differ
# only in the order of floating-point reductions.
TOL = dict(rtol=1e-5, atol=1e-6)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def host_batches(num=NUM_STEPS, batch=BATCH, seed=0):
  """Seeded NumPy batches (host data, as a data loader gives them)."""
  rng = np.random.default_rng(seed)
  return [
      {
          "image": rng.standard_normal((batch, 8, 8, 1)).astype(np.float32),
          "label": rng.integers(0, 10, batch).astype(np.int32),
      }
      for _ in range(num)
  ]


def numpy_fill(abstract, seed):
  """Concrete values for an abstract model or train state, from NumPy.

  Flax's initialisers draw with threefry, whose programs take seconds each to
  compile on XLA:CPU; these tests need valid values, not Flax's: kernels
  ``[(K,) in, out]`` from ``N(0, 1 / in)``, other parameters
  ``N(0, 0.1^2)``, BatchNorm statistics 0 and 1, optimiser state, step and
  key 0.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if not jnp.issubdtype(leaf.dtype, jnp.floating) or "opt_state" in name \
        or "mean" in name:
      return np.zeros(leaf.shape, leaf.dtype)
    if "var" in name:
      return np.ones(leaf.shape, leaf.dtype)
    scale = 1 / np.sqrt(leaf.shape[-2]) if "kernel" in name else 0.1
    return (scale * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


@functools.lru_cache(maxsize=None)
def setup(strategy: str = "unroll"):
  """(spec, initial state, batches): a student, two stacked teachers."""
  batches = host_batches()
  abstract = jax.eval_shape(TEACHER.init, jax.random.key(0),
                            batches[0]["image"])
  variables = [numpy_fill(abstract, 10 + i) for i in range(NUM_TEACHERS)]
  group, stacked = teachers.TeacherGroup.create(
      TEACHER, [p for p, _ in variables], [s for _, s in variables],
      strategy=strategy,
  )
  spec = train_step.Distillation(
      student=STUDENT,
      teachers=[group],
      objective=[
          objective.LabelTerm(weight=0.1),
          objective.LogitTerm(weight=0.9, temperature=4.0),
          objective.FeatureTerm(adaptor="auto", name="hint", weight=0.5),
      ],
      # Not Adam: its first update is about lr * sign(gradient), which turns
      # float noise on a zero gradient (the bias before BatchNorm) into
      # differences of lr between equally correct programs.
      optimizer=optax.sgd(0.1, momentum=0.9),
  )
  # The state `spec.init` builds, filled from NumPy (see numpy_fill).
  abstract = jax.eval_shape(
      lambda v: spec.initial_state(jax.random.key(0), batches[0], (v,), None),
      stacked,
  )
  state = jax.tree.map(jnp.asarray, numpy_fill(abstract, seed=0))
  return spec, state.replace(teachers=(stacked,)), batches


def run_steps(step, state, batches, place=lambda batch: batch):
  for batch in batches:
    state, metrics = step(state, place(batch))
    assert int(metrics["nonfinite"]) == 0
  return state


@functools.lru_cache(maxsize=None)
def single_device_result():
  spec, state, batches = setup()
  return run_steps(train_step.make_train_step(spec, donate=False), state,
                   batches)


@functools.lru_cache(maxsize=None)
def data_parallel_compiled():
  """The step compiled for a replicated state and a batch over 8 devices."""
  spec, state, batches = setup()
  mesh = sharding.make_mesh()
  placed = sharding.shard_state(state, mesh)
  batch = sharding.shard_batch(batches[0], mesh)
  step = train_step.make_train_step(spec, donate=False)
  return mesh, placed, step.lower(placed, batch).compile()


@functools.lru_cache(maxsize=None)
def data_parallel_result():
  spec, _, batches = setup()
  mesh, placed, compiled = data_parallel_compiled()
  return run_steps(compiled, placed, batches,
                   lambda b: sharding.shard_batch(b, mesh))


def assert_trees_close(actual, expected, **tol):
  tol = tol or TOL
  leaves_a = jax.tree_util.tree_flatten_with_path(actual)[0]
  leaves_e = jax.tree.leaves(expected)
  assert len(leaves_a) == len(leaves_e)
  for (path, a), e in zip(leaves_a, leaves_e):
    np.testing.assert_allclose(
        np.asarray(a), np.asarray(e), err_msg=jax.tree_util.keystr(path),
        **tol,
    )


def checksum(params) -> list[float]:
  """Per-leaf float64 sums of a replicated (or single-device) pytree."""
  return [float(np.sum(np.asarray(leaf.addressable_data(0), np.float64)))
          for leaf in jax.tree.leaves(params)]


# ---------------------------------------------------------------------------
# The HLO check: gathers of the batch.
# ---------------------------------------------------------------------------

_SHAPE = re.compile(r"\b[a-z]+\d*\[([\d,]*)\]")
_GATHER_DIMS = re.compile(r"dimensions=\{(\d+)\}")


def batch_all_gathers(hlo_text: str, batch_size: int) -> list[str]:
  """The all-gathers of a compiled program along an axis of ``batch_size``.

  An HLO all-gather reads ``%name = f32[24,8]{...} all-gather(%x), ...,
  dimensions={0}`` (or a tuple of result shapes for a combined gather, or
  ``all-gather-start`` when asynchronous). It gathers the batch when its
  gathered dimension has the global batch size in the result.
  """
  found = []
  for line in hlo_text.splitlines():
    match = re.search(r"=\s*(.*?)\s+all-gather(?:-start)?\(", line)
    if not match:
      continue
    dims = _GATHER_DIMS.search(line)
    assert dims, f"all-gather without dimensions: {line}"
    axis = int(dims.group(1))
    for shape in _SHAPE.findall(match.group(1)):
      sizes = [int(d) for d in shape.split(",") if d]
      if axis < len(sizes) and sizes[axis] == batch_size:
        found.append(line.strip())
  return found


def test_batch_all_gathers_parses_hlo_lines():
  lines = [
      "%all-gather.1 = f32[24,8,8,1]{3,2,1,0} all-gather(%p), channel_id=1,"
      " dimensions={0}, use_global_device_ids=true",
      "%all-gather.2 = f32[8,24]{1,0} all-gather(%q), dimensions={0}",
      "%ag = (f32[3,24]{1,0}, s32[24]{0}) all-gather-start(%a, %b),"
      " dimensions={1}",
      "%ar = f32[24,8]{1,0} all-reduce(%r), to_apply=%add",
  ]
  found = batch_all_gathers("\n".join(lines), 24)
  assert found == [lines[0], lines[2]]


# ---------------------------------------------------------------------------
# Meshes and batches.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, shape",
    [({}, (8, 1)), ({"teacher": 2}, (4, 2)), ({"data": 2, "teacher": 4},
                                              (2, 4))],
)
def test_make_mesh(kwargs, shape):
  mesh = sharding.make_mesh(**kwargs)
  assert mesh.axis_names == ("data", "teacher")
  assert tuple(mesh.devices.shape) == shape
  assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_make_mesh_on_some_devices():
  mesh = sharding.make_mesh(devices=jax.devices()[:4], teacher=2)
  assert dict(mesh.shape) == {"data": 2, "teacher": 2}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"data": 3}, r"data=3 x teacher=1 = 3 devices cannot be built from 8"),
        ({"data": 8, "teacher": 2}, r"= 16 devices cannot be built from 8"),
        ({"teacher": 3}, r"8 devices cannot be split into a teacher axis of"
                         r" size 3"),
        ({"data": 0}, r"`data` must be a positive integer, got 0"),
        ({"teacher": 1.5}, r"`teacher` must be a positive integer, got 1.5"),
        ({"devices": []}, r"`devices` must hold at least one device"),
    ],
)
def test_make_mesh_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sharding.make_mesh(**kwargs)


def test_shard_batch_splits_the_batch_axis():
  mesh = sharding.make_mesh(teacher=2)
  batch = dict(host_batches(1, batch=8)[0])
  batch["teacher_logits"] = np.ones((3, 8, 10), np.float32)
  batch["mask"] = np.ones(8, bool)
  batch["step_weight"] = np.float32(0.5)
  batch["tokens"] = np.zeros((2, 8), np.int32)
  placed = sharding.shard_batch(batch, mesh, batch_axes={"tokens": 1})
  expected = {"image": P("data"), "label": P("data"), "mask": P("data"),
              "teacher_logits": P(None, "data"), "step_weight": P(),
              "tokens": P(None, "data")}
  assert {k: v.sharding.spec for k, v in placed.items()} == expected
  for key, value in placed.items():
    assert isinstance(value, jax.Array)
    np.testing.assert_array_equal(np.asarray(value), batch[key])
  # Four data shards of 2 examples, each held by the 2 teacher-axis devices.
  shards = placed["image"].addressable_shards
  assert {s.data.shape for s in shards} == {(2, 8, 8, 1)}
  assert len(shards) == 8
  assert {s.data.shape for s in placed["teacher_logits"].addressable_shards} \
      == {(3, 2, 10)}
  # A single teacher's cached logits [B, C] keep their batch axis first.
  single = sharding.shard_batch({"teacher_logits": np.ones((8, 10))}, mesh)
  assert single["teacher_logits"].sharding.spec == P("data")


def test_shard_batch_errors():
  mesh = sharding.make_mesh()
  with pytest.raises(ValueError, match=r"batch size 30 is not divisible by"
                     r" the 8 devices of mesh axis 'data'"):
    sharding.shard_batch(host_batches(1, batch=30)[0], mesh)
  bad = {"image": np.ones((16, 2)), "label": np.ones(8, np.int32)}
  with pytest.raises(ValueError, match=r"disagree on the batch size: 'image':"
                     r" 16, 'label': 8"):
    sharding.shard_batch(bad, mesh)
  with pytest.raises(ValueError, match=r"'label' of shape \(8,\) has no batch"
                     r" axis 1"):
    sharding.shard_batch({"label": np.ones(8)}, mesh, batch_axes={"label": 1})
  explicit = jax.make_mesh((8,), ("data",), (AxisType.Explicit,))
  with pytest.raises(ValueError, match=r"Mesh axis 'data' has type"):
    sharding.shard_batch(host_batches(1, batch=8)[0], explicit)
  other = jax.make_mesh((8,), ("batch",), (AxisType.Auto,))
  with pytest.raises(ValueError, match=r"The mesh has no axis 'data'"):
    sharding.shard_batch(host_batches(1, batch=8)[0], other)


# ---------------------------------------------------------------------------
# Data parallelism.
# ---------------------------------------------------------------------------


def test_data_parallel_step_matches_one_device():
  single = single_device_result()
  sharded = data_parallel_result()
  assert int(sharded.step) == NUM_STEPS
  # BatchNorm statistics are those of the global batch.
  assert_trees_close(sharded.model_state, single.model_state)
  assert_trees_close(sharded.params, single.params)
  assert_trees_close(sharded.opt_state, single.opt_state)
  # The parameters moved: the comparison is not of two initial states. (The
  # bias before BatchNorm gets no gradient.)
  _, initial, _ = setup()
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                       single.params, initial.params)
  moved["student"]["Dense_0"].pop("bias")
  assert min(jax.tree.leaves(moved)) > 1e-4, moved
  for leaf in jax.tree.leaves(sharded.params):
    assert leaf.sharding.is_fully_replicated
    assert len(leaf.sharding.device_set) == 8


def test_data_parallel_step_does_not_gather_the_batch():
  spec, state, batches = setup()
  mesh, placed, compiled = data_parallel_compiled()
  hlo = compiled.as_text()
  # The program is partitioned: the gradients are all-reduced ...
  assert re.search(r" all-reduce(-start)?\(", hlo)
  # ... and no batch-sized axis is ever gathered.
  assert batch_all_gathers(hlo, BATCH) == []

  # The check can fail: the same step with the batch deliberately replicated
  # inside the program gathers it.
  def replicating_step(state, batch):
    batch = jax.lax.with_sharding_constraint(batch, sharding.replicated(mesh))
    return spec._train_step(state, batch)  # pylint: disable=protected-access

  batch = sharding.shard_batch(batches[0], mesh)
  bad = jax.jit(replicating_step).lower(placed, batch).compile().as_text()
  gathered = batch_all_gathers(bad, BATCH)
  assert gathered, bad


# ---------------------------------------------------------------------------
# FSDP and the teacher axis.
# ---------------------------------------------------------------------------


def test_fsdp_and_teacher_axis_match_one_device():
  # One compiled program for both (compiles dominate this file's time): a
  # 4 x 2 mesh, FSDP over "data" and the teachers split over "teacher".
  spec, state, batches = setup("vmap")
  mesh = sharding.make_mesh(teacher=2)
  shardings = sharding.state_shardings(state, mesh, fsdp=True,
                                       fsdp_min_size=64)
  placed = sharding.shard_state(state, mesh, fsdp=True, fsdp_min_size=64)
  assert jax.tree.map(lambda a: a.sharding, placed) == shardings
  student = placed.params["student"]
  # [64, 8]: split along its largest axis divisible by 4.
  kernel = student["Dense_0"]["kernel"]
  assert kernel.sharding.spec == P("data")
  assert {s.data.shape for s in kernel.addressable_shards} == {(16, 8)}
  assert student["Dense_1"]["kernel"].sharding.spec == P("data")  # [8, 10]
  # Too small (8 elements): replicated.
  assert student["Dense_0"]["bias"].sharding.spec == P()
  assert student["BatchNorm_0"]["scale"].sharding.spec == P()
  assert placed.model_state["student"]["batch_stats"]["BatchNorm_0"][
      "mean"].sharding.spec == P()
  assert placed.params["terms"]["hint"]["dense"]["kernel"].sharding.spec == P(
      None, "data")  # [8, 16]: the larger axis
  # The momentum follows its parameters.
  trace = placed.opt_state[0].trace
  assert trace["student"]["Dense_0"]["kernel"].sharding.spec == P("data")
  # Teachers [K, ...]: K over "teacher", FSDP never along K.
  for leaf in jax.tree.leaves(placed.teachers):
    assert leaf.sharding.spec[0] == "teacher"
  t_kernel = placed.teachers[0].params["Dense_0"]["kernel"]  # [2, 64, 16]
  assert t_kernel.sharding.spec == P("teacher", "data")
  assert {s.data.shape for s in t_kernel.addressable_shards} == {(1, 16, 16)}
  assert placed.teachers[0].params["BatchNorm_0"]["scale"].sharding.spec == P(
      "teacher")  # [2, 16]: too small for FSDP
  assert placed.step.sharding.spec == P()
  assert placed.rng.sharding.spec == P()

  step = train_step.make_train_step(spec, state_shardings=shardings)
  result = run_steps(step, placed, batches,
                     lambda b: sharding.shard_batch(b, mesh))
  # The state keeps its layout from step to step (and was donated).
  assert jax.tree.map(lambda a: a.sharding, result) == shardings
  assert kernel.is_deleted()
  # "vmap" and the reference's "unroll" compute the same numbers.
  single = single_device_result()
  assert_trees_close(result.params, single.params)
  assert_trees_close(result.model_state, single.model_state)


def test_fsdp_min_size_and_teacher_only_fsdp():
  _, state, _ = setup()
  mesh = sharding.make_mesh()
  shardings = sharding.state_shardings(state, mesh, fsdp=True)
  # Every leaf of the tiny models is below the default 2**16 elements.
  assert all(s.spec == P() for s in jax.tree.leaves(shardings))
  shardings = sharding.state_shardings(state, mesh, fsdp_teachers=True,
                                       fsdp_min_size=64)
  assert all(s.spec == P() for s in jax.tree.leaves(shardings.params))
  assert shardings.teachers[0].params["Dense_0"]["kernel"].spec == P(
      None, "data")  # [2, 64, 16]


def test_fsdp_spec():
  assert sharding._state._fsdp_spec((3, 512, 256), 8, min_size=1024) == (
      None, "data", None)
  assert sharding._state._fsdp_spec((256, 256), 8, min_size=1) == (None, "data")
  assert sharding._state._fsdp_spec((16, 3), 8, min_size=1) == ("data", None)
  assert sharding._state._fsdp_spec((16, 3), 8, min_size=49) == (None, None)
  assert sharding._state._fsdp_spec((16, 8), 8, min_size=1, skip_leading=1) == (
      None, "data")
  assert sharding._state._fsdp_spec((16, 3), 1, min_size=1) == (None, None)
  assert sharding._state._fsdp_spec((), 8, min_size=0) == ()


def test_state_shardings_of_an_abstract_state():
  _, state, _ = setup()
  mesh = sharding.make_mesh(teacher=2)
  abstract = jax.eval_shape(lambda: state)
  for kwargs in [{}, {"fsdp": True, "fsdp_min_size": 64}]:
    assert sharding.state_shardings(abstract, mesh, **kwargs) == \
        sharding.state_shardings(state, mesh, **kwargs)


def test_shard_state_errors():
  _, state, _ = setup()
  with pytest.raises(ValueError, match=r"The 2 teachers of group 0 cannot be"
                     r" split evenly over mesh axis 'teacher' of size 4"):
    sharding.shard_state(state, sharding.make_mesh(teacher=4))
  explicit = jax.make_mesh((8, 1), ("data", "teacher"),
                           (AxisType.Auto, AxisType.Explicit))
  with pytest.raises(ValueError, match=r"Mesh axis 'teacher' has type"):
    sharding.shard_state(state, explicit)
  with pytest.raises(TypeError, match=r"`state` must be a DistillState"):
    sharding.shard_state(state.params, sharding.make_mesh())
  with pytest.raises(ValueError, match=r"`fsdp_min_size` must be"):
    sharding.shard_state(state, sharding.make_mesh(), fsdp_min_size=-1)


# ---------------------------------------------------------------------------
# Several processes.
# ---------------------------------------------------------------------------


def test_process_batch_rows():
  slices = [sharding.process_batch_rows(12, process_index=i, process_count=3)
            for i in range(3)]
  assert slices == [slice(0, 4), slice(4, 8), slice(8, 12)]
  assert sharding.process_batch_rows(10) == slice(0, 10)  # one process
  with pytest.raises(ValueError, match=r"`process_index` must lie in"
                     r" \[0, 2\), got 2"):
    sharding.process_batch_rows(10, process_index=2, process_count=2)
  with pytest.raises(ValueError, match=r"`batch_size`=5 is not divisible"):
    sharding.process_batch_rows(5, process_index=0, process_count=2)


def test_host_batch_to_global_in_one_process_is_shard_batch():
  mesh = sharding.make_mesh(teacher=2)
  batch = dict(host_batches(1, batch=8)[0])
  batch["teacher_logits"] = np.ones((2, 8, 10), np.float32)
  placed = sharding.host_batch_to_global(batch, mesh)
  expected = sharding.shard_batch(batch, mesh)
  for key in batch:
    assert placed[key].sharding == expected[key].sharding
    np.testing.assert_array_equal(np.asarray(placed[key]), batch[key])
  with pytest.raises(ValueError, match=r"local batch size 6 is not divisible"
                     r" by the 4 positions of mesh axis 'data' that process 0"):
    sharding.host_batch_to_global(host_batches(1, batch=6)[0], mesh)


def test_initialize_distributed_is_a_noop_for_one_process():
  assert sharding.initialize_distributed(num_processes=1) is False


def _multihost_worker() -> list[float]:
  """One process of the 2-process run: feeds its half of every batch."""
  assert (jax.process_count(), jax.device_count(), jax.local_device_count()) \
      == (2, 8, 4)
  spec, state, batches = setup()
  mesh = sharding.make_mesh()
  state = sharding.shard_state(state, mesh)
  step = train_step.make_train_step(spec, donate=False)
  rows = sharding.process_batch_rows(BATCH)
  assert rows.stop - rows.start == BATCH // 2
  state = run_steps(
      step, state, batches,
      lambda b: sharding.host_batch_to_global(
          {k: v[rows] for k, v in b.items()}, mesh),
  )
  return checksum(state.params)


_WORKER = """
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
from jaxkd import sharding
process_id, port = int(sys.argv[1]), sys.argv[2]
# Without arguments or a cluster, a lone process is left alone ...
assert sharding.initialize_distributed() is False
assert sharding.initialize_distributed(
    coordinator_address=f"127.0.0.1:{port}", num_processes=2,
    process_id=process_id, initialization_timeout=60)
# ... and an initialised one too.
assert sharding.initialize_distributed() is False
from tests import test_sharding
print("CHECKSUM", json.dumps(test_sharding._multihost_worker()), flush=True)
"""

def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def test_two_processes_agree_with_one():
  env = {**os.environ, "PYTHONPATH": REPO}
  env.pop("JAX_COORDINATOR_ADDRESS", None)
  port = str(_free_port())
  commands = [[sys.executable, "-c", _WORKER, str(i), port] for i in range(2)]
  procs = [subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
           for c in commands]
  # The in-process 8-device reference compiles while the workers run.
  expected = checksum(data_parallel_result().params)
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=120))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.communicate()
  for proc, (out, err) in zip(procs, outputs):
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{err[-3000:]}"
  sums = [json.loads(out.split("CHECKSUM", 1)[1]) for out, _ in outputs]
  np.testing.assert_array_equal(sums[0], sums[1])
  np.testing.assert_allclose(sums[0], expected, **TOL)
