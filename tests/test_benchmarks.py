"""Smoke tests: every benchmark runs end to end at tiny sizes (no timing).

Each runs for 2 timed steps on 4x4 or 8x8 images with small models and
writes its JSON and Markdown results into a temporary directory. The PyTorch
comparison, which runs worker processes, has its own file
(``test_benchmarks_torch_reference.py``).
"""

from __future__ import annotations

import json

import pytest

from benchmarks import flops
from benchmarks import profile
from benchmarks import torch_worker
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
                            "--conv_channels", "8",
                            "--out_dir", str(tmp_path)])
  data, _ = _outputs(tmp_path, "flops")
  assert data["ceiling"]["flops_per_s"] > 0
  # XLA counts the multiply-adds inside the image: 2 N C^2 (3H - 2)(3W - 2).
  assert data["conv_ceiling"]["xla_flops"] == 2 * 32 * 8 * 8 * 46 * 46
  assert data["conv_ceiling"]["flops"] == data["conv_ceiling"]["xla_flops"]
  assert data["ceiling_flops_per_s"] == max(
      data["ceiling"]["flops_per_s"], data["conv_ceiling"]["flops_per_s"])
  assert len(data["rows"]) == 3
  assert all(r["flops"] and r["flops"] > 0 for r in data["rows"])


def test_scaling(tmp_path):
  scaling.main(TINY + MLPS + ["--devices", "1,2", "--per_device_batch", "2",
                              "--out_dir", str(tmp_path)])
  data, markdown = _outputs(tmp_path, "scaling")
  assert [r["devices"] for r in data["rows"]] == [1, 2]
  assert data["rows"][0]["efficiency"] == pytest.approx(1.0)
  assert "efficiency" in markdown


_HLO = """HloModule jit_step, entry_computation_layout={()->f32[]}

%fused_transpose (p0: f32[4,8]) -> f32[8,4] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %exp = f32[4,8]{1,0} exponential(%p0)
  ROOT %t = f32[8,4]{1,0} transpose(%exp), dimensions={1,0}
}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

%fused_sum (p0: f32[4,8]) -> f32[4] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %zero = f32[] constant(0)
  ROOT %r = f32[4]{0} reduce(%p0, %zero), dimensions={1}, to_apply=%add
}

%fused_scale (p0: f32[4,8]) -> f32[4,8] {
  %p0 = f32[4,8]{1,0} parameter(0)
  ROOT %m = f32[4,8]{1,0} multiply(%p0, %p0)
}

%nested (p0: f32[4,8]) -> f32[4] {
  %p0 = f32[4,8]{1,0} parameter(0)
  ROOT %f = f32[4]{0} fusion(%p0), kind=kLoop, calls=%fused_sum
}

ENTRY %main (a: f32[4,8], k: f32[1,1,8,8]) -> f32[] {
  %a = f32[4,8]{1,0} parameter(0)
  %k = f32[1,1,8,8]{3,2,1,0} parameter(1)
  %transpose_fusion = f32[8,4]{1,0} fusion(%a), kind=kLoop, calls=%fused_transpose
  %reduce_fusion = f32[4]{0} fusion(%a), kind=kInput, calls=%fused_sum
  %multiply_fusion = f32[4,8]{1,0} fusion(%a), kind=kLoop, calls=%fused_scale
  %call.1 = f32[4]{0} call(%a), to_apply=%nested
  %dot.2 = f32[4,4]{1,0} dot(%a, %transpose_fusion), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %copy.3 = f32[4,8]{0,1} copy(%a)
  %r4 = f32[1,4,1,8]{3,2,1,0} reshape(%a)
  %convolution.5 = f32[1,4,1,8]{3,2,1,0} convolution(%r4, %k), window={size=1x1}, dim_labels=b01f_01io->b01f
  ROOT %c = f32[] constant(1)
}
"""


def test_profile_classifies_hlo_ops_by_what_they_contain():
  categories = profile.hlo_categories(_HLO)
  kind = {name: c for name, (c, _) in categories.items()}
  assert kind["transpose_fusion"] == "transpose / layout copy"
  assert kind["reduce_fusion"].startswith("reduction")
  assert kind["multiply_fusion"].startswith("elementwise")
  assert "call.1" not in kind  # control flow: its body's ops are counted
  assert kind["f"].startswith("reduction")  # through the nested fusion
  assert kind["dot.2"] == "matrix product"
  assert kind["copy.3"] == "transpose / layout copy"
  assert kind["convolution.5"].startswith("convolution")
  assert kind["r4"] == "other"
  assert categories["transpose_fusion"][1] == "f32[8,4]"


def test_profile_jaxkd_only(tmp_path):
  profile.main(TINY + MLPS + ["--batch_size", "4", "--no_torch",
                              "--out_dir", str(tmp_path)])
  data, markdown = _outputs(tmp_path, "profile")
  for program in ("online", "offline"):
    result = data["jaxkd"][program]
    assert result["wall_ms"] > 0 and result["threads"] >= 1
    assert set(result["thread_ms"]) == {*profile.JAX_CATEGORIES,
                                        profile.UNCOVERED}
    # The MLP steps are matrix products and elementwise work, no convolution.
    assert result["thread_ms"]["matrix product"] > 0
    assert result["thread_ms"]["convolution (synchronous part)"] == 0
  assert "torch" not in data
  assert "thread-ms per step" in markdown


def test_profile_torch_categories():
  assert torch_worker.category("aten::mkldnn_convolution") == (
      "convolution forward and backward")
  assert torch_worker.category("aten::convolution_backward") == (
      "convolution forward and backward")
  assert torch_worker.category("aten::native_batch_norm_backward") == (
      "BatchNorm forward and backward")
  assert torch_worker.category("aten::threshold_backward") == (
      "ReLU forward and backward")
  assert torch_worker.category("aten::_foreach_add_") == "optimiser"
  assert torch_worker.category("aten::copy_") == "copies and layout"
  assert torch_worker.category("aten::_log_softmax") == (
      "loss, autograd and the rest")


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
