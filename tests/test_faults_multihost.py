"""kill -9 of one of two processes: a clean, bounded exit, then a resume.

Two processes on 127.0.0.1 (2 CPU devices each, Gloo collectives) train the
student of tests/test_sharding.py with the engine, checkpointing every few
steps to a shared directory. One process is killed with SIGKILL mid-run; the
other must exit with ``PEER_LOST_EXIT_CODE`` within the bound of
:mod:`jaxkd.distributed`, with one line naming the lost process. Both are
then started again: they resume from the last checkpoint and end with the
parameters of an uninterrupted two-process run, bit for bit.

The coordination service listens on 127.0.0.1 only (jaxkd.distributed binds
a loopback coordinator to loopback). Gloo's sockets use the address of the
machine's host name, which JAX does not let a caller choose; on the CI
machines that name resolves to 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxkd import checkpoint
from jaxkd import distributed
from jaxkd import objective
from jaxkd import sharding
from jaxkd import teachers
from jaxkd import train_step
from tests import test_sharding as ts

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOTAL, EVERY = 8, 2  # steps, and a checkpoint every EVERY steps
KILL_AFTER = 5  # the victim is killed once it has finished this step
PEER_TIMEOUT = 4.0
BOUND = PEER_TIMEOUT + 8.0  # seconds from the kill to the survivor's exit
BATCH = 8

_WORKER = """
import sys
import jax
jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_disable_most_optimizations", True)
from jaxkd import distributed
process_id, port, peer_timeout = int(sys.argv[1]), sys.argv[2], sys.argv[3]
assert distributed.initialize(
    f"127.0.0.1:{port}", 2, process_id, peer_timeout=float(peer_timeout),
    initialization_timeout=60, shutdown_timeout=20)
from tests import test_faults_multihost
with distributed.watch_peers():
  test_faults_multihost.train(sys.argv[4], sys.argv[5])
"""


_COLLECTIVES = """
import sys, time
import jax
jax.config.update("jax_num_cpu_devices", 1)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
from jaxkd import distributed
process_id, port = int(sys.argv[1]), sys.argv[2]
distributed.initialize(f"127.0.0.1:{port}", 2, process_id,
                       peer_timeout=float(sys.argv[3]))
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = jax.make_mesh((2,), ("d",))
total = jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, P()))
with distributed.watch_peers():
  for i in range(10**6):
    x = jax.make_array_from_process_local_data(
        NamedSharding(mesh, P("d")), np.ones(1, np.float32))
    assert float(total(x).addressable_data(0)) == 2.0
    print(f"STEP {i + 1}", flush=True)
"""


def setup():
  """(spec, state): the student of tests/test_sharding.py, one teacher.

  Smaller than that file's setup (one teacher, no feature term): the step
  compiles in each of six processes.
  """
  batch = ts.host_batches(1, batch=BATCH)[0]
  params, stats = ts.numpy_fill(
      jax.eval_shape(ts.TEACHER.init, jax.random.key(0), batch["image"]), 10)
  group, stacked = teachers.TeacherGroup.create(ts.TEACHER, [params], [stats])
  spec = train_step.Distillation(
      student=ts.STUDENT, teachers=[group],
      objective=[objective.LabelTerm(weight=0.5),
                 objective.LogitTerm(weight=0.5, temperature=2.0)],
      optimizer=optax.sgd(0.1, momentum=0.9))
  abstract = jax.eval_shape(
      lambda v: spec.initial_state(jax.random.key(0), batch, (v,), None),
      stacked)
  state = jax.tree.map(jnp.asarray, ts.numpy_fill(abstract, seed=0))
  return spec, state.replace(teachers=(stacked,))


def train(checkpoint_dir: str, out: str) -> None:
  """One process's run: resume if a checkpoint exists, train to TOTAL."""
  spec, state = setup()
  batches = ts.host_batches(TOTAL, batch=BATCH, seed=1)
  mesh = sharding.make_mesh()
  state = sharding.shard_state(state, mesh)
  rows = sharding.process_batch_rows(BATCH)
  step = train_step.make_train_step(spec, donate=False)
  with checkpoint.Checkpointer(checkpoint_dir, max_to_keep=None,
                               save_interval_steps=EVERY) as ckpt:
    start = 0
    if ckpt.latest_step() is not None:
      state, data_state, _ = ckpt.restore(state)
      start = data_state["next"]
      print(f"RESUMED {start}", flush=True)
    for i in range(start, TOTAL):
      batch = sharding.host_batch_to_global(
          {k: v[rows] for k, v in batches[i].items()}, mesh)
      state, metrics = step(state, batch)
      assert int(metrics["nonfinite"]) == 0
      ckpt.save(state, data_state={"next": i + 1})
      print(f"STEP {i + 1}", flush=True)
  if jax.process_index() == 0:
    leaves = jax.tree_util.tree_flatten_with_path(state.params)[0]
    np.savez(out, **{jax.tree_util.keystr(p): np.asarray(x.addressable_data(0))
                     for p, x in leaves})


def _free_port() -> int:
  return ts._free_port()  # pylint: disable=protected-access


def start(checkpoint_dir, out, port, script=_WORKER):
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  for name in ("JAX_COORDINATOR_ADDRESS", "XLA_FLAGS"):
    env.pop(name, None)
  return [
      subprocess.Popen(
          [sys.executable, "-c", script, str(i), str(port), str(PEER_TIMEOUT),
           str(checkpoint_dir), str(out)],
          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
          text=True, start_new_session=True)
      for i in range(2)]


def reap(procs):
  for proc in procs:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)


def finish(procs, timeout=240):
  """(returncode, stdout, stderr) of each process, every one reaped."""
  try:
    outputs = [proc.communicate(timeout=timeout) for proc in procs]
  finally:
    reap(procs)
  return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


def run_to_the_end(*runs):
  """Runs ``(checkpoint_dir, out)`` pairs of processes at once, to the end."""
  procs = []
  try:
    for checkpoint_dir, out in runs:
      procs += start(checkpoint_dir, out, _free_port())
    results = finish(procs)
  finally:
    reap(procs)
  for code, stdout, stderr in results:
    assert code == 0, f"stdout:\n{stdout}\nstderr:\n{stderr[-3000:]}"
  return [results[i:i + 2] for i in range(0, len(results), 2)]


def wait_for_line(proc, text, timeout):
  """Reads ``proc``'s stdout until a line equals ``text``; the lines read."""
  deadline = time.monotonic() + timeout
  lines = []
  os.set_blocking(proc.stdout.fileno(), False)
  while time.monotonic() < deadline:
    line = proc.stdout.readline()
    if line:
      lines.append(line.rstrip("\n"))
      if lines[-1] == text:
        return lines
    elif proc.poll() is not None:
      break
    else:
      time.sleep(0.02)
  raise AssertionError(f"no line {text!r} within {timeout} s: {lines}")


@pytest.mark.fault
@pytest.mark.slow
def test_killed_peer_ends_the_survivor_and_a_restart_resumes(tmp_path):
  killed_dir = tmp_path / "killed"
  procs = start(killed_dir, tmp_path / "unused.npz", _free_port())
  try:
    wait_for_line(procs[1], f"STEP {KILL_AFTER}", timeout=240)
    os.killpg(procs[1].pid, signal.SIGKILL)
    killed_at = time.monotonic()
    _, err = procs[0].communicate(timeout=BOUND + 30)
    took = time.monotonic() - killed_at
  finally:
    reap(procs)
  code = procs[0].returncode
  assert code == distributed.PEER_LOST_EXIT_CODE, err[-3000:]
  assert took < BOUND, (took, err)
  lines = err.strip().splitlines()
  assert len(lines) <= 3, err  # no traceback, no C++ stack trace
  assert lines[-1].startswith("jaxkd: process 0 lost process 1 of 2 ("), err
  assert "no heartbeat for" in lines[-1] and "exiting with code 75" in lines[-1]
  saved = sorted(int(p.name) for p in killed_dir.iterdir() if p.name.isdigit())
  assert saved and saved[-1] >= EVERY, saved

  # The restart, and an uninterrupted run as the reference, side by side.
  resumed, _ = run_to_the_end(
      (killed_dir, tmp_path / "resumed.npz"),
      (tmp_path / "straight", tmp_path / "straight.npz"))
  starts = {line for _, stdout, _ in resumed for line in stdout.splitlines()
            if line.startswith("RESUMED")}
  assert len(starts) == 1, starts  # both processes resumed at the same step
  assert int(starts.pop().split()[1]) in saved
  # One process (0) writes each step's file manifest: no race between two.
  assert (killed_dir / str(TOTAL) / "jaxkd_files.json").exists()
  for _, _, stderr in resumed:
    assert "Could not write the file manifest" not in stderr, stderr

  got = np.load(tmp_path / "resumed.npz")
  want = np.load(tmp_path / "straight.npz")
  assert sorted(got) == sorted(want) and len(want) > 0
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  print(json.dumps({"exit_after_kill_s": round(took, 2)}))


@pytest.mark.fault
@pytest.mark.parametrize("victim", [1, 0])
def test_a_peer_killed_in_a_tight_collective_loop(victim):
  """Processes that do nothing but all-reduce: the kill lands mid-collective.

  Killing process 1 gives the survivor the one-line exit. Killing process 0,
  which hosts JAX's coordination service, makes JAX's client abort the
  survivor at once (SIGABRT and JAX's own message): bounded, not one line.
  """
  procs = start("-", "-", _free_port(), script=_COLLECTIVES)
  try:
    wait_for_line(procs[victim], "STEP 50", timeout=120)
    os.killpg(procs[victim].pid, signal.SIGKILL)
    killed_at = time.monotonic()
    survivor = procs[1 - victim]
    _, err = survivor.communicate(timeout=BOUND + 30)
    took = time.monotonic() - killed_at
  finally:
    reap(procs)
  assert took < BOUND, (took, err)
  print(json.dumps({"victim": victim, "exit_after_kill_s": round(took, 2)}))
  if victim == 1:
    assert survivor.returncode == distributed.PEER_LOST_EXIT_CODE, err
    lines = err.strip().splitlines()
    assert len(lines) <= 3, err
    assert lines[-1].startswith("jaxkd: process 0 lost process 1 of 2 ("), err
  else:
    assert survivor.returncode == -signal.SIGABRT, err
    assert "Terminating process because the JAX distributed service" in err
