"""The experiment loop's logs survive restarts and full disks.

One tiny baseline run (mnist5k :runlocal, 2 epochs of 2 steps, a train
record every step, a checkpoint every epoch), damaged in several ways.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil

import pytest
from orbax.checkpoint._src.handlers import json_checkpoint_handler

from experiments import loop as loop_lib
from experiments import train
from experiments import writers
from tests.test_faults_resume import tiny_config

pytestmark = pytest.mark.fault


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
  root = tmp_path_factory.mktemp("logs")
  config = tiny_config(root / "data", num_epochs=2, steps_per_epoch=2,
                       log_every_steps=1, checkpoint_every_epochs=1,
                       max_checkpoints=2)
  return train.Context.create(config, root / "work")


@pytest.fixture(scope="module")
def original(ctx, tmp_path_factory):
  run_dir = tmp_path_factory.mktemp("original") / "baseline"
  train.train_student(ctx, 0, "baseline", None, run_dir=run_dir)
  return run_dir


def numbers(path):
  """metrics.jsonl without the timings."""
  return [{k: v for k, v in json.loads(line).items()
           if "time" not in k and "per_s" not in k}
          for line in path.read_text().splitlines()]


def scalar_steps(logdir, tag):
  event_accumulator = pytest.importorskip(
      "tensorboard.backend.event_processing.event_accumulator")
  accumulator = event_accumulator.EventAccumulator(str(logdir))
  accumulator.Reload()
  return [e.step for e in accumulator.Scalars(tag)]


def test_resume_after_a_crash_logs_each_step_once(ctx, original, tmp_path,
                                                  caplog):
  run_dir = tmp_path / "baseline"
  shutil.copytree(original, run_dir)
  # Died after logging steps 3 and 4, before the step-4 checkpoint, in the
  # middle of a line.
  shutil.rmtree(run_dir / "checkpoints" / "4")
  with (run_dir / "metrics.jsonl").open("a") as f:
    f.write('{"kind": "train", "st')
  with caplog.at_level(logging.INFO):
    result, _ = train.train_student(ctx, 0, "baseline", None, run_dir=run_dir)
  assert result["steps"] == 4
  assert "resumed at step 2" in caplog.text
  assert "metrics.jsonl: dropping its last line, cut short" in caplog.text
  assert numbers(run_dir / "metrics.jsonl") == numbers(
      original / "metrics.jsonl")
  logdir = run_dir / "tensorboard"
  assert len(list(logdir.glob("events.out.tfevents.*"))) == 2
  assert scalar_steps(logdir, "train/loss") == [1, 2, 3, 4]
  assert scalar_steps(logdir, "test/accuracy") == [2, 4]


def test_disk_full_while_logging(ctx, original, tmp_path, monkeypatch):
  run_dir = tmp_path / "baseline"
  write = writers.JsonlWriter.write

  def full_at_step_3(self, record):
    if record["step"] == 3:
      raise writers.LogWriteError(errno.ENOSPC,
                                  f"Cannot write {self.path}: No space left"
                                  " on device")
    write(self, record)

  monkeypatch.setattr(writers.JsonlWriter, "write", full_at_step_3)
  with pytest.raises(loop_lib.WriteFailed) as info:
    train.train_student(ctx, 0, "baseline", None, run_dir=run_dir)
  monkeypatch.undo()
  assert info.value.code == str(info.value)  # printed by Python on exit
  message = str(info.value)
  assert "\n" not in message
  assert (f"stopped: Cannot write {run_dir / 'metrics.jsonl'}: No space"
          " left on device. Nothing older was lost; rerun the command to"
          f" resume from step 2 ({run_dir / 'checkpoints'})") in message
  assert [r["step"] for r in numbers(run_dir / "metrics.jsonl")] == [1, 2, 2]
  result, _ = train.train_student(ctx, 0, "baseline", None, run_dir=run_dir)
  assert result["steps"] == 4
  assert numbers(run_dir / "metrics.jsonl") == numbers(
      original / "metrics.jsonl")


def test_disk_full_during_the_background_checkpoint(ctx, original, tmp_path,
                                                    monkeypatch, capfd):
  run_dir = tmp_path / "baseline"
  save = json_checkpoint_handler.JsonCheckpointHandler._save_fn

  async def full_at_step_4(self, item, directory):
    if directory.parent.name.startswith("4."):  # 4.orbax-checkpoint-tmp
      raise OSError(errno.ENOSPC, "No space left on device",
                    str(directory / "metadata"))
    await save(self, item, directory)

  monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler,
                      "_save_fn", full_at_step_4)
  with pytest.raises(loop_lib.WriteFailed) as info:
    train.train_student(ctx, 0, "baseline", None, run_dir=run_dir)
  monkeypatch.undo()
  message = str(info.value)
  assert "\n" not in message
  assert (f"stopped: Could not write checkpoint step 4 to"
          f" {run_dir / 'checkpoints' / '4'}: No space left on device"
          in message)
  assert f"resume from step 2 ({run_dir / 'checkpoints'})" in message
  assert "Traceback" not in capfd.readouterr().err
  result, _ = train.train_student(ctx, 0, "baseline", None, run_dir=run_dir)
  assert result["steps"] == 4
  assert numbers(run_dir / "metrics.jsonl") == numbers(
      original / "metrics.jsonl")
