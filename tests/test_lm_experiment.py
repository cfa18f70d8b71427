"""The offline LM experiment: its :runlocal command, its data splits."""

import dataclasses
import hashlib
import json
import os
import pathlib
import subprocess
import sys

import grain
import numpy as np
import pytest

from experiments.configs import lm_stdlib
from experiments.lm import data as data_lib
from experiments.lm import runner

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_runlocal_command_writes_its_table_json_and_plot(tmp_path):
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  out = subprocess.run(
      [sys.executable, "-m", "experiments.lm",
       "--config=experiments/configs/lm_stdlib.py:runlocal",
       f"--workdir={tmp_path}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
      check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  table = (tmp_path / "lm_stdlib.md").read_text()
  for method in ("baseline", "sparse_topk", "gkd"):
    assert f"| {method} |" in table
  assert (tmp_path / "lm_stdlib.png").read_bytes()[:4] == b"\x89PNG"
  result = json.loads((tmp_path / "lm_stdlib.json").read_text())
  assert result["data"]["python"] == ".".join(map(str, sys.version_info[:3]))
  assert len(result["data"]["sha256_sorted_paths_and_sizes"]) == 64
  for row in result["rows"]:
    assert len(row["validation_bpb"]) == 2 and row["seeds"] == 2
    assert 0 < row["validation_bpb"][0] < 9
  assert (tmp_path / "runs" / "gkd_seed1" / "metrics.jsonl").exists()


def test_the_test_split_never_reaches_training(tmp_path):
  splits = data_lib.load(seed=0, max_train_bytes=50_000)
  # UTF-8 text never holds the byte 0xFF: mark the held-out streams with it.
  poisoned = dataclasses.replace(
      splits, test=np.full(4096, 255, np.uint8),
      validation=np.full(4096, 255, np.uint8))
  config = lm_stdlib.get_config("runlocal")
  config.methods = ("baseline", "sparse_topk")
  config.seeds = (0,)
  seen = []
  result = runner.run(config, tmp_path, splits=poisoned,
                      on_train_batch=lambda b: seen.append(b["tokens"]))
  assert len(seen) == config.teacher_steps + 2 * config.student_steps
  assert not any((tokens == 255).any() for tokens in seen)
  # The held-out windows are evaluated: 0xFF is a byte no model saw.
  assert result["rows"][0]["test_bpb"][0] > 7.0
  with pytest.raises(ValueError, match="runlocal"):
    runner.run(config, tmp_path, publish=True, splits=poisoned)


def test_train_batches_are_a_grain_dataset_of_the_seeded_windows():
  splits = dataclasses.replace(
      data_lib.load(seed=0, max_train_bytes=5_000),
      train=np.arange(1000, dtype=np.uint16) % 251)
  batches = splits.train_batches(seed=7, steps=4, batch_size=3, length=5)
  assert isinstance(batches, grain.MapDataset) and len(batches) == 4
  # Reference: one generator, B starts per batch, drawn batch after batch.
  rng = np.random.default_rng(7)
  for i in range(4):
    starts = rng.integers(0, 1000 - 5, size=3)
    expected = np.stack([splits.train[s:s + 5] for s in starts])
    np.testing.assert_array_equal(batches[i]["tokens"], expected)
    assert batches[i]["tokens"].dtype == np.int32
  # Random access: batch 2 read first is batch 2.
  again = splits.train_batches(seed=7, steps=4, batch_size=3, length=5)
  np.testing.assert_array_equal(again[2]["tokens"], batches[2]["tokens"])
  with pytest.raises(ValueError, match="`steps`"):
    splits.train_batches(seed=7, steps=0, batch_size=3, length=5)
  with pytest.raises(ValueError, match="`length`"):
    splits.train_batches(seed=7, steps=1, batch_size=3, length=1000)


def test_files_split_by_file_deterministically_and_fingerprinted(tmp_path):
  for i, text in enumerate(["a = 1\n", "b = 22\n", "c\n", "dd\n", "e\n"]):
    (tmp_path / "pkg").mkdir(exist_ok=True)
    (tmp_path / "pkg" / f"m{i}.py").write_text(text)
  (tmp_path / "site-packages").mkdir()
  (tmp_path / "site-packages" / "x.py").write_text("ignored\n")
  base, files = data_lib.list_files(str(tmp_path))
  assert files == [f"pkg/m{i}.py" for i in range(5)]
  lines = "".join(f"{f}\t{(base / f).stat().st_size}\n" for f in files)
  info = data_lib.fingerprint(base, files)
  assert info["sha256_sorted_paths_and_sizes"] == hashlib.sha256(
      lines.encode()).hexdigest()
  assert info["bytes"] == sum((base / f).stat().st_size for f in files)
  splits = data_lib.split_files(files, seed=3, fractions=(0.2, 0.2))
  again = data_lib.split_files(list(files), seed=3,
                               fractions=(0.2, 0.2))
  assert splits == again
  parts = [set(v) for v in splits.values()]
  assert sum(map(len, parts)) == len(set().union(*parts)) == 5
  loaded = data_lib.load(seed=3, fractions=(0.2, 0.2), root=str(tmp_path))
  test_bytes = b"".join((base / f).read_bytes() + b"\n"
                        for f in splits["test"])
  assert loaded.test.tobytes() == test_bytes
  windows = loaded.eval_windows("test", 10, 2)
  assert windows.shape[1] == 2 and windows.shape[0] <= 10
