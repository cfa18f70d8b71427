"""Checkpoints: exact resume, what is kept, the NaN guard, resharding."""

from __future__ import annotations

import functools
import json
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jaxkd import checkpoint
from jaxkd import losses
from jaxkd import objective
from jaxkd import teachers
from jaxkd import train_step
from jaxkd.models import from_linen

K = 2  # teachers


class Student(nn.Module):
  """Dense-BN-relu-dropout-dense: BatchNorm state and dropout randomness."""

  width: int = 16

  @nn.compact
  def __call__(self, x, train: bool):
    h = nn.Dense(self.width)(x.reshape(x.shape[0], -1))
    h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(h))
    h = nn.Dropout(0.5, deterministic=not train)(h)
    return nn.Dense(10)(h), {"embedding": h}


class Teacher(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool):
    h = nn.Dense(32)(x.reshape(x.shape[0], -1))
    h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(h))
    return nn.Dense(10)(h), {"embedding": h}


def make_spec(width=16):
  return train_step.Distillation(
      student=from_linen(Student(width), name="student"),
      teachers=[GROUP],
      objective=[
          objective.LabelTerm(weight=0.1),
          objective.LogitTerm(weight=0.9, temperature=4.0),
          objective.FeatureTerm(loss_fn=losses.hint_loss, adaptor="auto",
                                name="hint", weight=0.5),
          objective.CRDTerm(dim=8, queue_size=32, weight=0.1),
      ],
      optimizer=optax.adam(1e-2),
  )


def make_batches(n, seed=0):
  rng = np.random.default_rng(seed)
  return [{"image": jnp.asarray(rng.standard_normal((16, 8, 8, 1)),
                                jnp.float32),
           "label": jnp.asarray(rng.integers(0, 10, 16), jnp.int32)}
          for _ in range(n)]


_teacher = from_linen(Teacher(), name="teacher")
_x = make_batches(1)[0]["image"]
_tps = [jax.jit(_teacher.init)(jax.random.key(100 + i), _x) for i in range(K)]
GROUP, TVARS = teachers.TeacherGroup.create(
    _teacher, [p for p, _ in _tps], [s for _, s in _tps], name="mlps")
SPEC = make_spec()
BATCHES = make_batches(6)


@functools.lru_cache(maxsize=None)
def train_fn():
  # Donating, as in real runs: the async save must not read donated buffers.
  return train_step.make_train_step(SPEC)


# One compiled program instead of many eagerly compiled small ones.
_init = jax.jit(SPEC.init)


def fresh_state(key=0):
  # The donating step deletes the state's buffers, teachers included: each
  # state gets its own copy of the teachers' arrays. Committed to a device,
  # as restored arrays are (jit compiles anew for a change of committedness).
  state = _init(jax.random.key(key), BATCHES[0],
                [jax.tree.map(jnp.copy, TVARS)])
  return jax.device_put(state, jax.devices()[0])


def host(tree):
  return jax.tree.map(lambda x: np.array(jax.device_get(x)), tree)


def student_arrays(state):
  return host({f: getattr(state, f) for f in checkpoint.STATE_FIELDS})


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert np.asarray(x).dtype == np.asarray(y).dtype


def with_step(state, step):
  return state.replace(step=jnp.asarray(step, jnp.int32))


@functools.lru_cache(maxsize=None)
def trained_state_arrays():
  """Host copies of a state after two steps (shared by several tests)."""
  state = fresh_state()
  step = train_fn()
  for batch in BATCHES[:2]:
    state, _ = step(state, batch)
  return student_arrays(state)


def trained_state():
  """A state after two steps, with teachers of its own."""
  arrays = trained_state_arrays()
  return fresh_state(key=7).replace(**jax.tree.map(jnp.asarray, arrays))


# ---------------------------------------------------------------------------
# 1. Exact resume.
# ---------------------------------------------------------------------------


def test_resume_is_bit_exact(tmp_path):
  step = train_fn()
  straight = fresh_state()
  for batch in BATCHES:
    straight, _ = step(straight, batch)
  expected = student_arrays(straight)

  state = fresh_state()
  for batch in BATCHES[:3]:
    state, metrics = step(state, batch)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert ckpt.save(state, metrics=metrics, data_state={"position": 3})
    # Keep training right away: the step donates the buffers being saved.
    for batch in BATCHES[3:]:
      state, _ = step(state, batch)
    assert_trees_equal(student_arrays(state), expected)

    target = fresh_state(key=1)  # other params and another rng
    assert not np.array_equal(host(target.rng), expected["rng"])
    restored, data_state, saved_metrics = ckpt.restore(target)
  assert data_state == {"position": 3}
  assert saved_metrics["loss"] == pytest.approx(float(metrics["loss"]))
  assert int(restored.step) == 3
  for batch in BATCHES[3:]:
    restored, _ = step(restored, batch)
  assert step._cache_size() == 1  # restored arrays did not force a recompile
  got = student_arrays(restored)
  for field in ("params", "opt_state", "model_state", "rng", "step"):
    assert_trees_equal(got[field], expected[field])


def test_restore_into_an_abstract_target(tmp_path):
  state = trained_state()
  expected = student_arrays(state)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(state)
    abstract = jax.eval_shape(lambda s: s, fresh_state(key=3))
    restored, data_state, metrics = ckpt.restore(abstract)
  assert data_state is None and metrics is None
  assert_trees_equal(student_arrays(restored), expected)
  assert restored.teachers is abstract.teachers


# ---------------------------------------------------------------------------
# 2. Teachers are not in the checkpoint.
# ---------------------------------------------------------------------------


def test_teachers_are_not_saved_and_restore_keeps_targets(tmp_path):
  state = trained_state()
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert ckpt.save(state)
    ckpt.wait_until_finished()
    target = fresh_state(key=5).replace(hparams={"w": jnp.float32(0.5)})
    restored, _, _ = ckpt.restore(target)
  assert restored.teachers is target.teachers
  assert restored.hparams is target.hparams
  step_dir = tmp_path / "2"
  assert sorted(p.name for p in step_dir.iterdir() if p.is_dir()) == [
      "extra", "state"]
  tree = ocp.StandardCheckpointHandler().metadata(step_dir / "state").tree
  assert set(tree) == set(checkpoint.STATE_FIELDS)
  saved_shapes = {leaf.shape for leaf in jax.tree.leaves(tree)}
  teacher_shapes = {x.shape for x in jax.tree.leaves(TVARS)}
  assert not saved_shapes & teacher_shapes  # no [K, ...] teacher array


# ---------------------------------------------------------------------------
# 3. What is kept; data state.
# ---------------------------------------------------------------------------


def save_steps(ckpt, state, accuracies):
  for step, accuracy in accuracies.items():
    metrics = None if accuracy is None else {"accuracy": accuracy,
                                             "nonfinite": 0}
    assert ckpt.save(with_step(state, step), metrics=metrics)
  ckpt.wait_until_finished()


def test_keep_last_n(tmp_path):
  state = trained_state()
  with checkpoint.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
    save_steps(ckpt, state, {1: 0.9, 2: 0.1, 3: 0.2, 4: 0.3})
    assert ckpt.all_steps() == [3, 4]
    assert ckpt.latest_step() == 4
    assert ckpt.best_step() is None  # no best_metric
    assert ckpt.metrics(3) == {"accuracy": 0.2, "nonfinite": 0}


@pytest.mark.parametrize("mode", ["max", "min"])
def test_keep_last_n_and_the_best(tmp_path, mode):
  state = trained_state()
  accuracies = {1: 0.5, 2: 0.9, 3: 0.05, 4: None, 5: 0.4, 6: 0.3}
  best = 2 if mode == "max" else 3
  with checkpoint.Checkpointer(tmp_path, max_to_keep=2,
                               best_metric="accuracy", best_mode=mode) as ckpt:
    save_steps(ckpt, state, accuracies)
    assert ckpt.all_steps() == sorted({best, 5, 6})
    assert ckpt.best_step() == best
    _, _, metrics = ckpt.restore(fresh_state(), step=best)
    assert metrics["accuracy"] == accuracies[best]
  # A new Checkpointer on the directory (a resumed run) carries on.
  with checkpoint.Checkpointer(tmp_path, max_to_keep=2,
                               best_metric="accuracy", best_mode=mode) as ckpt:
    assert ckpt.best_step() == best
    save_steps(ckpt, state, {7: 0.99 if mode == "max" else 0.01, 8: None})
    assert ckpt.all_steps() == [7, 8]
    assert ckpt.best_step() == 7


def test_steps_without_the_metric_are_never_best(tmp_path):
  state = trained_state()
  with checkpoint.Checkpointer(tmp_path, max_to_keep=1,
                               best_metric="accuracy") as ckpt:
    save_steps(ckpt, state, {1: None, 2: None})
    assert ckpt.all_steps() == [2]
    assert ckpt.best_step() is None
    assert ckpt.save(with_step(state, 3), metrics={"accuracy": float("nan")})
    assert ckpt.save(with_step(state, 4), metrics={"loss": 1.0})
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [4]
    assert ckpt.best_step() is None


def test_save_interval_and_force(tmp_path):
  state = trained_state()
  with checkpoint.Checkpointer(tmp_path, max_to_keep=None,
                               save_interval_steps=3) as ckpt:
    saved = [ckpt.save(with_step(state, s)) for s in range(1, 8)]
    assert ckpt.save(with_step(state, 8), force=True)
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [s for s, ok in zip(range(1, 8), saved) if ok
                                ] + [8]
    assert saved[2] and saved[5] and not saved[3] and not saved[4]


def test_a_step_is_never_overwritten(tmp_path, caplog):
  state = trained_state()
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert ckpt.save(state, data_state={"first": True})
    with caplog.at_level(logging.WARNING, logger="jaxkd.checkpoint"):
      assert not ckpt.save(state, data_state={"first": False}, force=True)
    assert "already exists" in caplog.text
    _, data_state, _ = ckpt.restore(fresh_state())
  assert data_state == {"first": True}


@pytest.mark.parametrize("data_state", [
    {"next_index": 3, "epoch": [1, 2], "name": "train", "nested": {"x": 0.5}},
    b'{"next_index": 3}\x00\xff raw bytes',
    None,
    "a string",
])
def test_data_state_round_trip(tmp_path, data_state):
  state = trained_state()
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert ckpt.save(state, data_state=data_state)
    _, restored, _ = ckpt.restore(fresh_state())
  assert restored == data_state
  assert type(restored) is type(data_state)


def test_grain_iterator_state_round_trip(tmp_path):
  grain = pytest.importorskip("grain")
  iterator = iter(grain.MapDataset.range(10).shuffle(seed=0)
                  .to_iter_dataset())
  for _ in range(4):
    next(iterator)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(trained_state(), data_state=iterator.get_state())
    expected = [next(iterator) for _ in range(3)]
    _, data_state, _ = ckpt.restore(fresh_state())
  resumed = iter(grain.MapDataset.range(10).shuffle(seed=0)
                 .to_iter_dataset())
  resumed.set_state(data_state)
  assert [next(resumed) for _ in range(3)] == expected


def test_metrics_and_data_state_must_be_json(tmp_path):
  state = trained_state()
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    with pytest.raises(TypeError, match="data_state"):
      ckpt.save(state, data_state={"obj": object()})
    with pytest.raises(TypeError, match="metrics"):
      ckpt.save(state, metrics={"obj": object()})
    assert ckpt.all_steps() == []
    # Arrays (as the train step returns them) become numbers and lists.
    assert ckpt.save(state, metrics={"loss": jnp.float32(0.5),
                                     "per_teacher": jnp.arange(2)})
    assert ckpt.metrics(2) == {"loss": 0.5, "per_teacher": [0, 1]}


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="max_to_keep"):
    checkpoint.Checkpointer(tmp_path, max_to_keep=0)
  with pytest.raises(ValueError, match="best_mode"):
    checkpoint.Checkpointer(tmp_path, best_mode="best")
  with pytest.raises(ValueError, match="save_interval_steps"):
    checkpoint.Checkpointer(tmp_path, save_interval_steps=0)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    with pytest.raises(ValueError, match="No checkpoint to restore"):
      ckpt.restore(fresh_state())
    ckpt.save(trained_state())
    with pytest.raises(ValueError, match=r"step 5 .*saved steps: \[2\]"):
      ckpt.restore(fresh_state(), step=5)


# ---------------------------------------------------------------------------
# 4. The NaN guard.
# ---------------------------------------------------------------------------


def poison(state, value):
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x.at[0, 0].set(value)
      if "Dense_1" in jax.tree_util.keystr(path) and x.ndim == 2 else x,
      state.params)
  return state.replace(params=params)


@pytest.mark.parametrize("bad", ["nan", "inf", "metric"])
def test_nonfinite_state_is_not_saved(tmp_path, caplog, bad):
  good = trained_state()
  expected = student_arrays(good)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert ckpt.save(good, data_state={"at": 2})
    if bad == "metric":
      bad_state, metrics = with_step(good, 3), {"nonfinite": jnp.int32(1)}
    else:
      bad_state = poison(with_step(good, 3), float(bad))
      metrics = {"nonfinite": 0}
    with caplog.at_level(logging.WARNING, logger="jaxkd.checkpoint"):
      assert not ckpt.save(bad_state, metrics=metrics, data_state={"at": 3},
                           force=True)
    assert "Not saving step 3" in caplog.text
    if bad != "metric":
      assert "student/Dense_1/kernel is not finite" in caplog.text
    assert ckpt.all_steps() == [2]
    restored, data_state, _ = ckpt.restore(fresh_state())
  assert data_state == {"at": 2}
  assert_trees_equal(student_arrays(restored), expected)


# ---------------------------------------------------------------------------
# 5. Another model; other device counts.
# ---------------------------------------------------------------------------


def test_checkpoint_of_another_model_is_rejected(tmp_path):
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(trained_state())
    wider = make_spec(width=32)
    target = jax.eval_shape(
        lambda key: wider.initial_state(key, BATCHES[0], [TVARS], None),
        jax.random.key(0))
    with pytest.raises(
        ValueError,
        match=r"leaf model_state/student/batch_stats/BatchNorm_0/mean has"
              r" shape \(16,\) in the checkpoint but shape \(32,\) in the"
              r" target"):
      ckpt.restore(target)

    target = fresh_state()
    extra = {**target.params, "student": {**target.params["student"],
                                          "Dense_9": {"b": jnp.zeros(3)}}}
    with pytest.raises(ValueError, match=r"params/student/Dense_9/b \(shape"
                                         r" \(3,\)\) is missing from the"):
      ckpt.restore(target.replace(params=extra))
    fewer = dict(target.model_state)
    del fewer["terms"]
    with pytest.raises(ValueError, match=r"checkpoint has a leaf"
                                         r" model_state/terms/crd/"):
      ckpt.restore(target.replace(model_state=fewer))


def sharded_like(tree, mesh):
  """Leading axes divisible by 8 split over "data"; the rest replicated."""

  def place(x):
    spec = (PartitionSpec("data") if x.ndim and x.shape[0] % 8 == 0
            else PartitionSpec())
    return jax.device_put(x, NamedSharding(mesh, spec))

  return jax.tree.map(place, tree)


def test_restore_onto_eight_devices_and_back(tmp_path):
  assert jax.device_count() >= 8
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  state = trained_state()
  expected = student_arrays(state)
  with checkpoint.Checkpointer(tmp_path / "one") as ckpt:
    ckpt.save(state, data_state={"at": 2})
    fresh = fresh_state(key=4)
    target = fresh.replace(**sharded_like(
        {f: getattr(fresh, f) for f in checkpoint.STATE_FIELDS}, mesh))
    on_eight, data_state, _ = ckpt.restore(target)
  assert data_state == {"at": 2}
  assert_trees_equal(student_arrays(on_eight), expected)
  for got, want in zip(jax.tree.leaves(student_arrays(target)),
                       jax.tree.leaves(student_arrays(on_eight))):
    assert got.shape == want.shape
  kernel = on_eight.params["student"]["Dense_0"]["kernel"]  # [64, 16]
  assert kernel.sharding == NamedSharding(mesh, PartitionSpec("data"))
  assert len(kernel.addressable_shards) == 8
  assert kernel.addressable_shards[0].data.shape == (8, 16)
  assert on_eight.rng.sharding == NamedSharding(mesh, PartitionSpec())

  # And back: saved from eight devices, restored onto one.
  with checkpoint.Checkpointer(tmp_path / "eight") as ckpt:
    ckpt.save(on_eight)
    back, _, _ = ckpt.restore(fresh_state(key=6))
  assert_trees_equal(student_arrays(back), expected)
  device = jax.devices()[0]
  for leaf in jax.tree.leaves(back.params):
    assert leaf.sharding.device_set == {device}


# ---------------------------------------------------------------------------
# 6. Teachers by name.
# ---------------------------------------------------------------------------


def test_teachers_round_trip(tmp_path):
  path = checkpoint.save_teachers(tmp_path, "mlps", TVARS)
  assert path == tmp_path / "teachers" / "mlps"
  checkpoint.save_teachers(tmp_path, "other", TVARS)
  assert checkpoint.saved_teacher_names(tmp_path) == ["mlps", "other"]

  loaded = checkpoint.load_teachers(tmp_path, "mlps")
  assert isinstance(loaded, teachers.TeacherVariables)
  assert_trees_equal(host(loaded), host(TVARS))

  mesh = jax.make_mesh((2,), ("teacher",), axis_types=(AxisType.Auto,))
  like = teachers.shard_teacher_axis(TVARS, mesh)
  loaded = checkpoint.load_teachers(tmp_path, "mlps", like=like)
  assert_trees_equal(host(loaded), host(TVARS))
  for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(like)):
    assert got.sharding == want.sharding


def test_teachers_errors(tmp_path):
  with pytest.raises(ValueError, match=r"saved names: none"):
    checkpoint.load_teachers(tmp_path, "mlps")
  checkpoint.save_teachers(tmp_path, "mlps", TVARS)
  checkpoint.save_teachers(tmp_path, "cnns", TVARS)
  with pytest.raises(ValueError,
                     match=r"No teachers named 'resnets'.*'cnns', 'mlps'"):
    checkpoint.load_teachers(tmp_path, "resnets")
  with pytest.raises(ValueError, match="already saved"):
    checkpoint.save_teachers(tmp_path, "mlps", TVARS)
  doubled = jax.tree.map(lambda x: 2 * x, TVARS)
  checkpoint.save_teachers(tmp_path, "mlps", doubled, overwrite=True)
  assert_trees_equal(host(checkpoint.load_teachers(tmp_path, "mlps")),
                     host(doubled))
  for bad in ["", "a/b", "../x", ".hidden"]:
    with pytest.raises(ValueError, match="`name`"):
      checkpoint.save_teachers(tmp_path, bad, TVARS)
  with pytest.raises(TypeError, match="TeacherVariables"):
    checkpoint.save_teachers(tmp_path, "raw", TVARS.params)
  like = jax.eval_shape(  # three teachers instead of two
      lambda v: jax.tree.map(lambda x: jnp.concatenate([x, x[:1]]), v), TVARS)
  with pytest.raises(ValueError,
                     match=r"Teachers 'mlps'.*leaf params/BatchNorm_0/bias"
                           r" has shape \(2, 32\) in the checkpoint but"
                           r" shape \(3, 32\)"):
    checkpoint.load_teachers(tmp_path, "mlps", like=like)


def test_typed_keys_round_trip(tmp_path):
  state = trained_state()
  keys = {"key": jax.random.key(3), "keys": jax.random.split(
      jax.random.key(4), 4)}
  state = state.replace(model_state={**state.model_state, "keys": keys})
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(state)
    target = state.replace(model_state={
        **state.model_state,
        "keys": jax.tree.map(lambda k: jax.random.split(jax.random.key(0),
                                                          k.shape), keys)})
    restored, _, _ = ckpt.restore(target)
    abstract, _, _ = ckpt.restore(jax.eval_shape(lambda s: s, target))
  for got in (restored, abstract):
    for name, key in keys.items():
      assert got.model_state["keys"][name].dtype == key.dtype
      np.testing.assert_array_equal(
          jax.random.key_data(got.model_state["keys"][name]),
          jax.random.key_data(key))


def test_json_files_are_readable(tmp_path):
  with checkpoint.Checkpointer(tmp_path, best_metric="accuracy") as ckpt:
    ckpt.save(trained_state(), metrics={"accuracy": 0.5},
              data_state=b"\x00")
  extra = json.loads((tmp_path / "2" / "extra" / "metadata").read_text())
  assert extra["metrics"] == {"accuracy": 0.5}
  assert extra["data_state"] == {"kind": "bytes", "value": "AA=="}


# ---------------------------------------------------------------------------
# 7. The run's config: a resume knows what it resumes.
# ---------------------------------------------------------------------------


CONFIG = {"kd": {"temperature": 4.0, "alpha": 0.9}, "method": "kd",
          "num_epochs": 10, "schedule": [1, 2]}


def history(directory):
  return [json.loads(line) for line in
          (directory / "config_history.jsonl").read_text().splitlines()]


def test_config_is_stored_and_a_change_is_refused(tmp_path):
  with checkpoint.Checkpointer(tmp_path, config=CONFIG) as ckpt:
    ckpt.save(trained_state())
  assert json.loads((tmp_path / "config.json").read_text()) == CONFIG
  assert [e["event"] for e in history(tmp_path)] == ["start"]
  # The same config again: nothing to record.
  checkpoint.Checkpointer(tmp_path, config=dict(CONFIG)).close()
  assert len(history(tmp_path)) == 1
  changed = {**CONFIG, "kd": {"temperature": 2.0, "alpha": 0.9},
             "method": "dkd", "schedule": [1, 3], "new": True}
  with pytest.raises(
      checkpoint.ConfigMismatchError,
      match=r"latest step 2\) were saved with another config\. Changed:"
            r' kd\.temperature: 4\.0 -> 2\.0; method: "kd" -> "dkd"; new:'
            r" <absent> -> true; schedule: \[1, 2\] -> \[1, 3\]\."):
    checkpoint.Checkpointer(tmp_path, config=changed)
  assert len(history(tmp_path)) == 1  # nothing written


def test_an_allowed_change_is_recorded(tmp_path, caplog):
  with checkpoint.Checkpointer(tmp_path, config=CONFIG) as ckpt:
    ckpt.save(trained_state())
  longer = {**CONFIG, "num_epochs": 20}
  # A changeable key needs no permission.
  checkpoint.Checkpointer(tmp_path, config=longer,
                          changeable_config_keys=["num_*"]).close()
  hotter = {**longer, "kd": {"temperature": 8.0, "alpha": 0.9}}
  with caplog.at_level(logging.WARNING, logger="jaxkd.checkpoint"):
    with checkpoint.Checkpointer(tmp_path, config=hotter,
                                 allow_config_change=True) as ckpt:
      assert ckpt.restore(fresh_state()).step == 2
  assert "changed config (allowed): kd.temperature: 4.0 -> 8.0" in caplog.text
  events = history(tmp_path)
  assert [(e["event"], e.get("forced")) for e in events] == [
      ("start", None), ("change", False), ("change", True)]
  assert events[1]["changes"] == {"num_epochs": {"old": 10, "new": 20}}
  assert events[2]["changes"] == {"kd.temperature": {"old": 4.0, "new": 8.0}}
  assert events[2]["step"] == 2 and events[2]["config"] == hotter
  # config.json keeps the first config; the next start compares with the
  # last accepted one.
  assert json.loads((tmp_path / "config.json").read_text()) == CONFIG
  checkpoint.Checkpointer(tmp_path, config=hotter).close()
  with pytest.raises(checkpoint.ConfigMismatchError,
                     match=r"Changed: kd\.temperature: 8\.0 -> 4\.0;"
                           r" num_epochs: 20 -> 10\. Resume"):
    checkpoint.Checkpointer(tmp_path, config=CONFIG)


def test_a_directory_without_steps_takes_the_new_config(tmp_path):
  checkpoint.Checkpointer(tmp_path, config=CONFIG).close()
  other = {**CONFIG, "method": "dkd"}
  checkpoint.Checkpointer(tmp_path, config=other).close()
  assert json.loads((tmp_path / "config.json").read_text()) == other
  assert [e["event"] for e in history(tmp_path)] == ["start", "restart"]
  with pytest.raises(TypeError, match="`config` must be JSON-serializable"):
    checkpoint.Checkpointer(tmp_path / "x", config={"f": object()})
