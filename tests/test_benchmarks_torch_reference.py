"""The PyTorch reference benchmark: its worker protocol and its rounds.

The end-to-end runs use tiny configurations (batch 2, one step, one round)
and test plumbing, never speed. The PyTorch run is skipped where no Python
with torch exists (CI installs only ``.[test]``).
"""

from __future__ import annotations

import json
import os
import stat
import sys

import pytest

from benchmarks import torch_reference
from benchmarks import workers

TINY = ["--steps", "1", "--rounds", "1", "--warmup", "1", "--num_classes",
        "10", "--batch_sizes", "2", "--dtypes", "float32"]


@pytest.fixture
def fast_compile(monkeypatch):
  """Workers compile with XLA's optimisations off (as conftest does here)."""
  monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")


def test_schedule_visits_every_system_once_per_round_in_order():
  assert workers.schedule(["a", "b", "c"], 2) == ["a", "b", "c"] * 2
  assert workers.schedule(["a"], 0) == ["a"]  # At least one round.


class _FakeWorker:
  """Records the requests of :func:`workers.interleave` in a shared log."""

  def __init__(self, name, log):
    self.name, self.log = name, log

  def request(self, op, **fields):
    self.log.append((self.name, op, fields["system"], fields["steps"]))
    return {"seconds": [float(len(self.log))] * fields["steps"]}


def test_interleave_alternates_workers_round_by_round():
  log = []
  a, b = _FakeWorker("a", log), _FakeWorker("b", log)
  pairs = [(a, "online"), (a, "offline"), (b, "online")]
  durations = workers.interleave(pairs, steps=3, rounds=2)
  assert log == [
      ("a", "time", "online", 3), ("a", "time", "offline", 3),
      ("b", "time", "online", 3),
  ] * 2
  # Each pair has rounds * steps durations, from its own two requests.
  assert durations[(a, "online")] == [1.0] * 3 + [4.0] * 3
  assert durations[(a, "offline")] == [2.0] * 3 + [5.0] * 3
  assert durations[(b, "online")] == [3.0] * 3 + [6.0] * 3


def test_worker_protocol_round_trip_and_errors():
  with workers.Worker("stub", sys.executable, "tests.worker_stub") as worker:
    assert worker.info["framework"] == "stub"
    assert worker.info["executable"] == sys.executable
    built = worker.request("build", config={"size": 5})
    # What build printed went to stderr, not into the protocol.
    assert built == {"systems": ["noop", "count"], "counts": [5, 2],
                     "compile_s": {}}
    seconds = worker.request("time", system="count", steps=4)["seconds"]
    assert len(seconds) == 4 and all(s >= 0 for s in seconds)
    memory = worker.request("memory")
    assert memory["rss_mib"] > 0 and memory["peak_rss_mib"] >= 1
    with pytest.raises(workers.WorkerError, match="KeyError: 'missing'"):
      worker.request("time", system="missing", steps=1)
    # The worker survives its errors.
    assert worker.request("time", system="noop", steps=1)["seconds"]
    with pytest.raises(workers.WorkerError, match=r"exited \(code 3\)"):
      worker.request("build", config={"exit": 3})
  with pytest.raises(workers.WorkerError,
                     match=r"exited \(code 1\) before answering 'info'"):
    workers.Worker("nothing", sys.executable, "tests.no_such_module")


def _fake_python(directory, name, code):
  """A stand-in interpreter: a script that exits with ``code``."""
  path = directory / name
  path.write_text(f"#!/bin/sh\nexit {code}\n")
  path.chmod(path.stat().st_mode | stat.S_IEXEC)
  return str(path)


def test_missing_torch_is_one_line_with_the_install_command(tmp_path):
  no_torch = _fake_python(tmp_path, "python_without_torch", 1)
  with pytest.raises(SystemExit) as raised:
    torch_reference.find_torch_python(None, candidates=[no_torch])
  message = str(raised.value)
  assert "\n" not in message
  assert no_torch in message and "pip install torch==2.13.0" in message
  assert "--torch_python" in message
  with pytest.raises(SystemExit, match="no .venv311 or pyenv 3.11"):
    torch_reference.find_torch_python(None, candidates=[])
  with pytest.raises(SystemExit, match="cannot import torch") as raised:
    torch_reference.find_torch_python(no_torch)
  assert f"{no_torch} -m pip install torch==2.13.0" in str(raised.value)
  # A missing file is no interpreter either.
  assert not torch_reference.has_torch(str(tmp_path / "nothing"))


def test_torch_python_search_order(tmp_path, monkeypatch):
  with_torch = _fake_python(tmp_path, "python_with_torch", 0)
  no_torch = _fake_python(tmp_path, "python_without_torch", 1)
  assert torch_reference.find_torch_python(with_torch) == with_torch
  assert torch_reference.find_torch_python(
      None, candidates=[no_torch, with_torch]) == with_torch
  for version in ("3.11.2", "3.11.9", "3.12.1"):
    (tmp_path / "pyenv" / "versions" / version / "bin").mkdir(parents=True)
    _fake_python(tmp_path / "pyenv" / "versions" / version / "bin", "python",
                 1)
  monkeypatch.setenv("PYENV_ROOT", str(tmp_path / "pyenv"))
  monkeypatch.chdir(tmp_path)
  found = torch_reference.torch_python_candidates()
  pyenv = [p for p in found if p.startswith(str(tmp_path / "pyenv"))]
  assert found[-1] == sys.executable
  assert pyenv == [
      str(tmp_path / "pyenv" / "versions" / v / "bin" / "python")
      for v in ("3.11.9", "3.11.2")
  ]
  monkeypatch.setenv(torch_reference.TORCH_PYTHON_ENV, with_torch)
  assert torch_reference.parse_args([]).torch_python == with_torch


def test_two_jaxkd_workers_interleaved_end_to_end(tmp_path, fast_compile):
  del fast_compile
  # The current interpreter twice stands in for the two stacks.
  results = torch_reference.main(
      TINY + ["--no_torch", "--oldest_python", sys.executable, "--no_fold",
              "--pairs", "hinton_teacher:hinton_student", "--image_size",
              "4", "--out_dir", str(tmp_path)])
  data = json.loads((tmp_path / "torch_reference.json").read_text())
  markdown = (tmp_path / "torch_reference.md").read_text()
  assert data["rows"] == json.loads(json.dumps(results["rows"]))
  stacks = list(data["environment"]["workers"])
  assert len(stacks) == 2 and stacks[1] == f"{stacks[0]}, worker 2"
  assert stacks[0].startswith("jax ")
  systems = [r["system"] for r in data["rows"]]
  assert systems == [f"jaxkd {kind} ({stack})"
                     for stack in stacks for kind in ("online", "offline")]
  for row in data["rows"]:
    assert row["steps"] == 1 and row["samples_per_s"]["median"] > 0
    assert row["compile_s"] > 0 and row["worker_rss_mib"] > 0
    assert "ratio_vs_torch_online" not in row
  assert data["summary"] == []
  for stack in stacks:
    assert f"- Worker {stack}: jaxkd: python " in markdown


def test_torch_reference_with_a_torch_worker(tmp_path, fast_compile):
  del fast_compile
  try:
    torch_python = torch_reference.find_torch_python(
        os.environ.get(torch_reference.TORCH_PYTHON_ENV))
  except SystemExit as e:
    pytest.skip(f"No Python with torch (CI installs only .[test]): {e}")
  torch_reference.main(
      TINY + ["--torch_python", torch_python, "--torch_threads", "1",
              "--pairs", "resnet8:resnet8", "--image_size", "8",
              "--out_dir", str(tmp_path)])
  data = json.loads((tmp_path / "torch_reference.json").read_text())
  markdown = (tmp_path / "torch_reference.md").read_text()
  jax_stack = next(s for s in data["environment"]["workers"]
                   if s.startswith("jax "))
  assert {r["system"] for r in data["rows"]} == {
      f"jaxkd online ({jax_stack})",
      f"jaxkd online, folded teacher ({jax_stack})",
      f"jaxkd offline ({jax_stack})", "PyTorch online", "PyTorch offline",
  }
  by_name = {r["system"]: r for r in data["rows"]}
  assert by_name["PyTorch online"]["ratio_vs_torch_online"] == 1.0
  assert by_name["PyTorch offline"]["ratio_vs_torch_offline"] == 1.0
  assert all(r["ratio_vs_torch_online"] > 0 for r in data["rows"])
  torch_info = data["environment"]["workers"]["PyTorch"]
  assert torch_info["versions"]["torch"] and torch_info["threads"] == 1
  (summary,) = data["summary"]
  assert summary["stack"] == jax_stack
  assert "- Worker PyTorch: PyTorch: python 3.11" in markdown
  assert "x PyTorch online" in markdown


def _torch_python_or_skip():
  try:
    return torch_reference.find_torch_python(
        os.environ.get(torch_reference.TORCH_PYTHON_ENV))
  except SystemExit as e:
    pytest.skip(f"No Python with torch (CI installs only .[test]): {e}")


PROFILE_TINY = ["--steps", "1", "--rounds", "1", "--warmup", "1",
                "--num_classes", "10", "--batch_size", "2",
                "--teacher", "resnet8", "--student", "resnet8",
                "--image_size", "8"]


def test_profile_runs_pytorch_in_a_torch_worker(tmp_path, fast_compile):
  del fast_compile
  from benchmarks import profile  # pylint: disable=g-import-not-at-top
  from benchmarks import torch_worker  # pylint: disable=g-import-not-at-top

  torch_python = _torch_python_or_skip()
  results = profile.main(PROFILE_TINY + ["--torch_python", torch_python,
                                         "--out_dir", str(tmp_path)])
  markdown = (tmp_path / "profile.md").read_text()
  for program in profile.PROGRAMS:
    torch_result = results["torch"][program]
    assert torch_result["wall_ms"] > 0
    assert torch_result["ms"]["convolution forward and backward"] > 0
    assert results["jaxkd"][program]["wall_ms"] > 0
  assert set(results["torch"]["online"]["ms"]) == {
      *(row for row, _ in torch_worker.CATEGORIES), torch_worker.OTHER,
      torch_worker.OUTSIDE_ATEN}
  assert "PyTorch: python 3.11" in results["torch"]["stack"]
  assert "PyTorch, online: self CPU ms per step" in markdown


def test_profile_without_a_torch_python_profiles_jaxkd_alone(
    tmp_path, monkeypatch, capsys):
  from benchmarks import profile  # pylint: disable=g-import-not-at-top

  def missing(explicit):
    raise SystemExit(f"no torch here ({explicit})")

  monkeypatch.setattr(torch_reference, "find_torch_python", missing)
  monkeypatch.delenv(torch_reference.TORCH_PYTHON_ENV, raising=False)
  results = profile.main(PROFILE_TINY + ["--out_dir", str(tmp_path)])
  assert "torch" not in results and results["jaxkd"]["online"]["wall_ms"] > 0
  assert "no torch here (None)\nProfiling jaxkd alone." in capsys.readouterr().err
  # An interpreter named explicitly must have torch: no silent skip.
  with pytest.raises(SystemExit, match="no torch here \\(/nowhere\\)"):
    profile.main(PROFILE_TINY + ["--torch_python", "/nowhere",
                                 "--out_dir", str(tmp_path)])
