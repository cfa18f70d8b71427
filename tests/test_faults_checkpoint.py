"""Damaged checkpoints: detected, renamed aside, the previous step restored.

Each test damages a copy of one saved directory (steps 1 and 2 of a small
state) the way disks and people do: a truncated data file, one flipped bit,
a deleted metadata file, a full disk during the background save.
"""

from __future__ import annotations

import errno
import gc
import logging
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from orbax.checkpoint._src.handlers import json_checkpoint_handler

from jaxkd import checkpoint
from jaxkd.checkpoint import _integrity
from jaxkd.state import DistillState


def make_state(step, seed):
  rng = np.random.default_rng(seed)
  return DistillState(
      step=jnp.int32(step),
      params={"student": {
          "w": jnp.asarray(rng.standard_normal((64, 16)), jnp.float32),
          "b": jnp.asarray(rng.standard_normal(16), jnp.float32)}},
      model_state={"student": {"mean": jnp.arange(16, dtype=jnp.float32)}},
      opt_state={"mu": jnp.asarray(rng.standard_normal((64, 16)),
                                   jnp.float32)},
      rng=jax.random.key_data(jax.random.key(seed)))


def target():
  return make_state(0, seed=99)


def arrays(state):
  return {k: np.asarray(v) for k, v in (
      ("w", state.params["student"]["w"]), ("b", state.params["student"]["b"]),
      ("mean", state.model_state["student"]["mean"]),
      ("mu", state.opt_state["mu"]), ("rng", state.rng),
      ("step", state.step))}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """Steps 1 and 2, each with its data state; written once, copied per test."""
  directory = tmp_path_factory.mktemp("saved") / "ckpt"
  with checkpoint.Checkpointer(directory) as ckpt:
    for step in (1, 2):
      assert ckpt.save(make_state(step, seed=step), data_state={"at": step},
                       metrics={"loss": 1.0 / step})
  return directory


@pytest.fixture
def run_dir(saved, tmp_path):
  directory = tmp_path / "ckpt"
  shutil.copytree(saved, directory)
  return directory


def files_of(directory):
  return sorted(p.relative_to(directory).as_posix()
                for p in directory.rglob("*") if p.is_file())


def data_file(step_dir):
  """The largest OCDBT data file of a step (it holds ``w`` and ``mu``)."""
  return max((step_dir / "state").glob("ocdbt.process_*/d/*"),
             key=lambda p: p.stat().st_size)


def flip_bit(path, offset, bit=4):
  data = bytearray(path.read_bytes())
  data[offset] ^= 1 << bit
  path.write_bytes(bytes(data))


def restore_expecting_fallback(run_dir, caplog, capfd):
  """Restores ``run_dir``: step 2 is damaged, step 1 must come back."""
  before = files_of(run_dir / "2")
  with caplog.at_level(logging.WARNING):
    with checkpoint.Checkpointer(run_dir) as ckpt:
      restored = ckpt.restore(target())
      assert ckpt.all_steps() == [1]
  # Late TensorStore callbacks of a failed read would surface here.
  time.sleep(0.2)
  gc.collect()
  assert restored.step == 1 and restored.data_state == {"at": 1}
  for name, value in arrays(make_state(1, seed=1)).items():
    np.testing.assert_array_equal(arrays(restored.state)[name], value)
  warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
  assert len(warnings) == 1, [r.getMessage() for r in warnings]
  message = warnings[0].getMessage()
  assert "\n" not in message
  assert f"step 2 in {run_dir / '2'} is damaged" in message
  assert "2.corrupt-1" in message
  # Renamed aside, every file kept; Orbax no longer lists it.
  assert not (run_dir / "2").exists()
  assert files_of(run_dir / "2.corrupt-1") == before
  err = capfd.readouterr().err
  assert "Event loop is closed" not in err and "Traceback" not in err, err
  return message


# -- Detected, with the manifest -----------------------------------------------


def test_truncated_data_file(run_dir, caplog, capfd):
  path = data_file(run_dir / "2")
  size = path.stat().st_size
  with path.open("r+b") as f:
    f.truncate(size // 2)
  message = restore_expecting_fallback(run_dir, caplog, capfd)
  assert f"has {size // 2} bytes, {size} when saved" in message


@pytest.mark.parametrize("index", range(12))
def test_one_flipped_bit_anywhere_in_the_data_file(run_dir, caplog, capfd,
                                                   index):
  path = data_file(run_dir / "2")
  offset = int(np.linspace(0, path.stat().st_size - 1, 12).astype(int)[index])
  flip_bit(path, offset)
  message = restore_expecting_fallback(run_dir, caplog, capfd)
  assert "does not match its checksum" in message


@pytest.mark.parametrize("name", ["state/_METADATA", "extra/metadata"])
def test_deleted_metadata(run_dir, caplog, capfd, name):
  (run_dir / "2" / name).unlink()
  message = restore_expecting_fallback(run_dir, caplog, capfd)
  assert f"file {name} is missing" in message
  assert "another model" not in message


# -- Detected without the manifest (a step its process did not seal) ----------


def unseal(step_dir):
  (step_dir / _integrity.MANIFEST).unlink()


@pytest.mark.parametrize("name,expected", [
    ("state/_METADATA", "state/_METADATA is missing"),
    ("extra/metadata", "extra/metadata is unreadable"),
])
def test_deleted_metadata_of_an_unsealed_step(run_dir, caplog, capfd, name,
                                              expected):
  unseal(run_dir / "2")
  (run_dir / "2" / name).unlink()
  assert expected in restore_expecting_fallback(run_dir, caplog, capfd)


def test_orbax_failing_to_read_is_quiet(run_dir, caplog, capfd):
  unseal(run_dir / "2")
  path = data_file(run_dir / "2")
  with path.open("r+b") as f:
    f.truncate(path.stat().st_size // 2)
  message = restore_expecting_fallback(run_dir, caplog, capfd)
  assert "Orbax could not read the arrays" in message


def test_flipped_bits_never_restore_other_values(saved, tmp_path):
  """Unsealed: every flip is either caught or changes no restored value."""
  size = data_file(saved / "2").stat().st_size
  expected = arrays(make_state(2, seed=2))
  outcomes = set()
  for i, offset in enumerate(np.linspace(0, size - 1, 12).astype(int)):
    directory = tmp_path / str(i)
    shutil.copytree(saved, directory)
    unseal(directory / "2")
    flip_bit(data_file(directory / "2"), int(offset))
    with checkpoint.Checkpointer(directory) as ckpt:
      restored = ckpt.restore(target())
    if restored.step == 2:
      outcomes.add("unchanged")
      for name, value in expected.items():
        np.testing.assert_array_equal(arrays(restored.state)[name], value)
    else:
      outcomes.add("caught")
      assert (directory / "2.corrupt-1").is_dir()
  assert "caught" in outcomes
  time.sleep(0.2)
  gc.collect()


def test_edited_extra_is_caught_by_its_checksum(run_dir, caplog, capfd):
  unseal(run_dir / "2")
  path = run_dir / "2" / "extra" / "metadata"
  path.write_text(path.read_text().replace('"at": 2', '"at": 7'))
  message = restore_expecting_fallback(run_dir, caplog, capfd)
  assert "extra/metadata does not match its checksum" in message


# -- When nothing is intact; an explicit step --------------------------------


def test_no_intact_step_is_a_clear_error(run_dir, caplog):
  for step in (1, 2):
    (run_dir / str(step) / "state" / "_METADATA").unlink()
  with caplog.at_level(logging.WARNING):
    with checkpoint.Checkpointer(run_dir) as ckpt:
      with pytest.raises(checkpoint.CorruptCheckpointError,
                         match=r"No intact checkpoint in .*step 2: .*step 1:"):
        ckpt.restore(target())
      assert ckpt.all_steps() == []
  assert sorted(p.name for p in run_dir.iterdir()) == [
      "1.corrupt-1", "2.corrupt-1"]


def test_a_damaged_explicit_step_raises_and_stays(run_dir):
  (run_dir / "2" / "extra" / "metadata").unlink()
  with checkpoint.Checkpointer(run_dir) as ckpt:
    with pytest.raises(checkpoint.CorruptCheckpointError,
                       match=r"step 2 in .*/2 is damaged: file"
                             r" extra/metadata is missing"):
      ckpt.restore(target(), step=2)
    assert ckpt.all_steps() == [1, 2]
    assert ckpt.restore(target(), step=1).step == 1


def test_another_model_is_not_damage(run_dir):
  wider = target().replace(params={"student": {
      "w": jnp.zeros((64, 32)), "b": jnp.zeros(16)}})
  with checkpoint.Checkpointer(run_dir) as ckpt:
    with pytest.raises(ValueError, match=r"leaf params/student/w has shape"
                                         r" \(64, 16\) in the checkpoint"):
      ckpt.restore(wider)
    assert ckpt.all_steps() == [1, 2]


def test_a_second_corrupt_copy_gets_the_next_name(run_dir):
  (run_dir / "2.corrupt-1").mkdir()
  (run_dir / "2" / "state" / "_METADATA").unlink()
  with checkpoint.Checkpointer(run_dir) as ckpt:
    assert ckpt.restore(target()).step == 1
  assert (run_dir / "2.corrupt-2" / "state").is_dir()


# -- What restore returns; dtypes ---------------------------------------------


def test_restored_is_a_named_tuple(run_dir):
  with checkpoint.Checkpointer(run_dir) as ckpt:
    restored = ckpt.restore(target())
  state, data_state, metrics = restored
  assert isinstance(restored, checkpoint.Restored)
  assert restored.state is state and restored.step == 2
  assert data_state == {"at": 2} and metrics == {"loss": 0.5}


def test_checked_in_the_saved_dtype_then_cast(run_dir):
  half = target()
  half = half.replace(params=jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                                          half.params))
  with checkpoint.Checkpointer(run_dir) as ckpt:
    restored = ckpt.restore(half)
  w = restored.state.params["student"]["w"]
  assert w.dtype == jnp.bfloat16
  np.testing.assert_array_equal(
      np.asarray(w), np.asarray(make_state(2, seed=2).params["student"]["w"]
                                .astype(jnp.bfloat16)))


# -- A full disk during the background save -----------------------------------


def test_disk_full_during_the_async_save(run_dir, monkeypatch, caplog, capfd):
  async def no_space(self, item, directory):
    del self, item
    raise OSError(errno.ENOSPC, "No space left on device",
                  str(directory / "metadata"))

  with caplog.at_level(logging.WARNING):
    with checkpoint.Checkpointer(run_dir) as ckpt:
      monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler,
                          "_save_fn", no_space)
      assert ckpt.save(make_state(3, seed=3))
      with pytest.raises(checkpoint.CheckpointWriteError) as info:
        ckpt.wait_until_finished()
      monkeypatch.undo()
      assert ckpt.all_steps() == [1, 2]
  assert info.value.errno == errno.ENOSPC
  message = str(info.value)
  assert "\n" not in message
  assert f"Could not write checkpoint step 3 to {run_dir / '3'}" in message
  assert "No space left on device" in message and "[1, 2]" in message
  # Orbax's own tracebacks of the failure are not shown.
  assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
  assert "Traceback" not in capfd.readouterr().err
  # The next start resumes from the latest intact step, and saves again.
  with checkpoint.Checkpointer(run_dir) as ckpt:
    assert ckpt.all_steps() == [1, 2]
    assert ckpt.restore(target()).step == 2
    assert ckpt.save(make_state(3, seed=3))
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [1, 2, 3]
    assert ckpt.restore(target()).step == 3
