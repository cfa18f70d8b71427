"""SIGTERM or kill -9 mid-run: a bit-identical resume.

Runs the experiment CLI in subprocesses on mnist5k :runlocal (the baseline
student, no teacher; 2 steps an epoch, a checkpoint every 5 epochs): one
run is sent SIGTERM once its first checkpoint is on disk, then started
again; another is killed with SIGKILL three times, at steps drawn from
seeds and once inside a checkpoint write, and restarted each time; one
uninterrupted run (shared by both tests) is the reference.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import types

import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import loop as loop_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
EPOCHS, STEPS_PER_EPOCH, EVERY = 40, 2, 5
TOTAL = EPOCHS * STEPS_PER_EPOCH


def command(workdir, data_dir):
  return [
      sys.executable, "-m", "experiments.main",
      "--config=experiments/configs/mnist5k_default.py:runlocal",
      f"--workdir={workdir}", "--mode=train", "--config.method=baseline",
      f"--config.data_dir={data_dir}", "--config.progress_bar=False",
      "--config.data_parallel=False",
      f"--config.steps_per_epoch={STEPS_PER_EPOCH}",
      f"--config.num_epochs={EPOCHS}",
      f"--config.checkpoint_every_epochs={EVERY}",
      "--config.test_split=test[:8]", "--config.eval_batch_size=8"]


def environment():
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
             JAXKD_NO_CPU_FLAGS="1", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user's run
  return env


def run(workdir, data_dir, *, stop_after=None, timeout=240):
  """Runs the CLI; with ``stop_after``, SIGTERM once that path exists."""
  process = subprocess.Popen(
      command(workdir, data_dir), cwd=ROOT, env=environment(),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    if stop_after is not None:
      deadline = time.monotonic() + timeout
      while not stop_after.is_dir() and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
      process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=timeout)
  finally:
    if process.poll() is None:
      process.kill()
      process.communicate()
  return process.returncode, output


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_dir):
  """The run dir of an uninterrupted run, the reference."""
  workdir = tmp_path_factory.mktemp("straight")
  code, output = run(workdir, data_dir)
  assert code == 0, output
  return workdir / "seed_0" / "baseline"


def assert_same_run(run_dir, reference):
  """Same logged numbers and bit-identical final arrays as ``reference``."""
  assert numbers(run_dir / "metrics.jsonl") == numbers(
      reference / "metrics.jsonl")
  got, want = final_arrays(run_dir), final_arrays(reference)
  flat_got = dict(_leaves(got))
  flat_want = dict(_leaves(want))
  assert flat_got.keys() == flat_want.keys()
  for key, value in flat_want.items():
    np.testing.assert_array_equal(flat_got[key], value, err_msg=key)


def numbers(path):
  return [{k: v for k, v in json.loads(line).items()
           if "time" not in k and "per_s" not in k}
          for line in path.read_text().splitlines()]


def final_arrays(run_dir):
  state = run_dir / "checkpoints" / str(TOTAL) / "state"
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(state)


@pytest.mark.fault
def test_sigterm_saves_exits_0_and_resumes_exactly(tmp_path, data_dir,
                                                   straight):
  stopped = tmp_path / "stopped"
  run_dir = stopped / "seed_0" / "baseline"
  first = run_dir / "checkpoints" / str(EVERY * STEPS_PER_EPOCH)
  code, output = run(stopped, data_dir, stop_after=first)
  assert code == 0, output
  lines = [line for line in output.splitlines() if "stopped by SIGTERM" in line]
  assert len(lines) == 1, output
  steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir()
                 if p.name.isdigit())
  step = steps[-1]
  assert EVERY * STEPS_PER_EPOCH <= step < TOTAL
  assert (f"stopped by SIGTERM after step {step} of {TOTAL}; checkpoint of"
          f" step {step} in {run_dir / 'checkpoints'}") in lines[0]
  assert "Traceback" not in output
  logged = numbers(run_dir / "metrics.jsonl")
  assert logged[-1]["step"] <= step

  code, output = run(stopped, data_dir)
  assert code == 0, output
  assert f"resumed at step {step} from {run_dir / 'checkpoints'}" in output
  assert_same_run(run_dir, straight)


# kill -9: each seed draws the step of one kill, in its third of the run;
# the last seed's kill waits, after that step, for the next checkpoint write.
SEEDS = (0, 1, 2)


def logged_steps(run_dir):
  """The steps of the complete lines of ``metrics.jsonl`` so far."""
  path = run_dir / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line)["step"] for line in path.read_text().splitlines()
          if line.endswith("}")]


def being_written(checkpoints, known):
  """A step directory that Orbax is writing, or that has no manifest yet.

  Orbax writes a step into ``<step>.orbax-checkpoint-tmp`` and renames it
  (a window of about 0.2 s for this state, often missed by this poll on a
  loaded machine); jaxkd writes the step's file manifest at the next save
  (a window of 10 steps). A kill in either leaves a step that a restart
  must skip or check by its arrays' checksums only.
  """
  if not checkpoints.is_dir():
    return None
  for path in checkpoints.iterdir():
    if path.name in known:
      continue
    if "orbax-checkpoint-tmp" in path.name:
      return f"orbax writing {path.name}"
    if path.name.isdigit() and not (path / "jaxkd_files.json").exists():
      return f"no manifest yet in {path.name}"
  return None


def kill_when(run_dir, data_dir, ready, timeout=240):
  """Starts the CLI and sends SIGKILL once ``ready()`` returns a value."""
  process = subprocess.Popen(
      command(run_dir.parent.parent, data_dir), cwd=ROOT, env=environment(),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      start_new_session=True)
  try:
    deadline = time.monotonic() + timeout
    while (seen := ready()) is None:
      assert process.poll() is None, process.communicate()[0]
      assert time.monotonic() < deadline, "the kill point never came"
      time.sleep(0.001)
    os.killpg(process.pid, signal.SIGKILL)
    output, _ = process.communicate(timeout=60)
  finally:
    if process.poll() is None:
      os.killpg(process.pid, signal.SIGKILL)
      process.communicate()
  assert process.returncode == -signal.SIGKILL, output
  return seen, output


@pytest.mark.fault
@pytest.mark.slow
def test_kill_9_at_random_steps_and_in_a_write_resumes_exactly(
    tmp_path, data_dir, straight):
  run_dir = tmp_path / "seed_0" / "baseline"
  checkpoints = run_dir / "checkpoints"
  kills = []
  for i, seed in enumerate(SEEDS):
    third = TOTAL // len(SEEDS)
    at = int(np.random.default_rng(seed).integers(i * third + 1,
                                                  (i + 1) * third))
    known = set()

    def ready(at=at, write=seed == SEEDS[-1], known=known):
      if not any(step >= at for step in logged_steps(run_dir)):
        if checkpoints.is_dir():  # what is on disk before the kill point
          known.update(p.name for p in checkpoints.iterdir())
        return None
      return being_written(checkpoints, known) if write else at

    seen, output = kill_when(run_dir, data_dir, ready)
    kills.append(seen)
    if i:
      assert "resumed at step" in output, output
  code, output = run(tmp_path, data_dir)
  assert code == 0, output
  assert "resumed at step" in output and "Traceback" not in output, output
  print("killed at", kills)
  assert_same_run(run_dir, straight)


def _leaves(tree, prefix=""):
  if isinstance(tree, dict):
    for key, value in tree.items():
      yield from _leaves(value, f"{prefix}{key}/")
  elif isinstance(tree, (list, tuple)):
    for i, value in enumerate(tree):
      yield from _leaves(value, f"{prefix}{i}/")
  else:
    yield prefix, np.asarray(tree)


# -- In process, without JAX: the signal handling itself ---------------------


def python_loop(tmp_path, signals_at):
  """A Loop whose step is Python; it signals itself at the given steps."""
  ctx = types.SimpleNamespace(
      config=types.SimpleNamespace(log_every_steps=1, nonfinite="stop",
                                   progress_bar=False),
      put=lambda batch: batch)
  done = []

  def step(state, batch):
    del batch
    done.append(state + 1)
    for signum in signals_at.get(state + 1, ()):
      os.kill(os.getpid(), signum)
    return state + 1, {"loss": 1.0}

  loop = loop_lib.Loop(
      name="python", run_dir=tmp_path, step=step, batches=iter(lambda: 0, 1),
      evaluate=lambda state: {"test/accuracy": 0.5}, num_epochs=3,
      batch_size=1, finite=lambda m: True, steps_per_epoch=4)
  return ctx, loop, done


def test_sigint_stops_after_the_step_in_progress(tmp_path, caplog):
  previous = signal.getsignal(signal.SIGINT)
  ctx, loop, done = python_loop(tmp_path, {3: [signal.SIGINT]})
  with pytest.raises(loop_lib.Preempted) as info:
    loop_lib.run_loop(ctx, loop, 0)
  assert info.value.code == 0 and info.value.step == 3 and done == [1, 2, 3]
  assert str(info.value) == (
      "python: stopped by SIGINT after step 3 of 12; this run keeps no"
      " checkpoints, so a new start begins again.")
  assert str(info.value) in caplog.text
  assert [r["step"] for r in loop_lib.writers.JsonlWriter(
      tmp_path / "metrics.jsonl").read()] == [1, 2, 3]
  assert signal.getsignal(signal.SIGINT) is previous  # handlers restored


def test_a_second_sigint_interrupts_at_once(tmp_path):
  ctx, loop, done = python_loop(
      tmp_path, {2: [signal.SIGTERM], 3: [signal.SIGINT]})
  with pytest.raises(loop_lib.Preempted, match="stopped by SIGTERM after"
                                               " step 2"):
    loop_lib.run_loop(ctx, loop, 0)
  ctx, loop, done = python_loop(
      tmp_path, {2: [signal.SIGINT, signal.SIGINT]})
  with pytest.raises(KeyboardInterrupt):
    loop_lib.run_loop(ctx, loop, 0)
  assert done == [1, 2]
