"""Smoke tests: every benchmark runs end to end at tiny sizes (no timing).

Each runs for 2 timed steps on 4x4 or 8x8 images with small models and
writes its JSON and Markdown results into a temporary directory. The PyTorch
comparison is skipped when torch is not installed (CI installs only
``.[test]``; torch comes with the optional ``bench`` extra).
"""

from __future__ import annotations

import json

import pytest

from benchmarks import flops
from benchmarks import scaling
from benchmarks import throughput
from tools import bench_readme

TINY = ["--steps", "2", "--rounds", "1", "--warmup", "1", "--num_classes", "10"]
MLPS = ["--student", "hinton_student", "--teacher", "hinton_teacher",
        "--image_size", "4"]


def _outputs(directory, name):
  data = json.loads((directory / f"{name}.json").read_text())
  markdown = (directory / f"{name}.md").read_text()
  for key in ("date", "command", "machine", "device", "versions"):
    assert key in data["environment"]
  assert markdown.startswith("### ")
  assert "- Command: `python -m benchmarks." in markdown
  return data, markdown


def test_throughput(tmp_path):
  throughput.main(
      TINY + MLPS + ["--batch_sizes", "2", "--teachers", "2",
                     "--fold_teachers", "--out_dir", str(tmp_path)]
  )
  data, markdown = _outputs(tmp_path, "throughput")
  kinds = {(r["kind"], r["teachers"], r["strategy"]) for r in data["rows"]}
  assert ("student step", 0, "") in kinds
  assert ("teacher forward (folded)", 1, "") in kinds
  assert ("offline distillation", 2, "cached logits") in kinds
  strategies = {s for kind, _, s in kinds if kind == "distillation step"}
  assert {"vmap", "scan", "unroll"} <= strategies
  assert any(s.startswith("auto (") for s in strategies)
  (target,) = data["targets"]
  assert set(target["overhead"]) == {"vmap", "scan", "unroll", "auto"}
  assert target["auto_over_best"] > 0
  assert "auto / best" in markdown


def test_flops(tmp_path):
  flops.main(TINY + MLPS + ["--batch_sizes", "2", "--matmul_size", "64",
                            "--out_dir", str(tmp_path)])
  data, _ = _outputs(tmp_path, "flops")
  assert data["ceiling"]["flops_per_s"] > 0
  assert len(data["rows"]) == 3
  assert all(r["flops"] and r["flops"] > 0 for r in data["rows"])


def test_scaling(tmp_path):
  scaling.main(TINY + MLPS + ["--devices", "1,2", "--per_device_batch", "2",
                              "--out_dir", str(tmp_path)])
  data, markdown = _outputs(tmp_path, "scaling")
  assert [r["devices"] for r in data["rows"]] == [1, 2]
  assert data["rows"][0]["efficiency"] == pytest.approx(1.0)
  assert "efficiency" in markdown


def test_torch_reference(tmp_path):
  pytest.importorskip(
      "torch",
      reason="PyTorch is not installed (CI installs only .[test]); the"
      " reference benchmark needs the `bench` extra: pip install"
      " torch==2.13.0",
  )
  from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top

  torch_reference.main(
      TINY + ["--pairs", "resnet8:resnet8", "--batch_sizes", "2",
              "--dtypes", "float32", "--image_size", "8",
              "--out_dir", str(tmp_path)]
  )
  data, markdown = _outputs(tmp_path, "torch_reference")
  systems = {r["system"] for r in data["rows"]}
  assert systems == {
      "jaxkd online", "jaxkd online, folded teacher", "jaxkd offline",
      "PyTorch online", "PyTorch offline",
  }
  assert all(r["ratio_vs_torch_online"] > 0 for r in data["rows"])
  assert "x PyTorch online" in markdown


def test_bench_readme_renders_between_the_markers(tmp_path):
  (tmp_path / "throughput.md").write_text("### Throughput\n\n| a |\n")
  (tmp_path / "scaling.md").write_text("### Scaling\n")
  (tmp_path / "other.md").write_text("### Other\n")
  readme = (
      "# x\n\nintro\n\n" + bench_readme.START + "\nold\n" + bench_readme.END
      + "\n\n## after\n"
  )
  out = bench_readme.render(readme, tmp_path)
  assert out.startswith("# x\n\nintro\n\n")
  assert out.endswith(bench_readme.END + "\n\n## after\n")
  assert "old" not in out
  body = out.split(bench_readme.START)[1]
  assert body.index("### Throughput") < body.index("### Scaling") < body.index(
      "### Other")
  assert bench_readme.render(out, tmp_path) == out  # Idempotent.
  with pytest.raises(ValueError, match="needs exactly one"):
    bench_readme.render("# no markers\n", tmp_path)
  empty = tmp_path / "empty"
  empty.mkdir()
  assert "No benchmark results yet" in bench_readme.render(readme, empty)
