"""Smoke test: benchmarks/fused_loss.py end to end at tiny sizes."""

import json

from benchmarks import fused_loss


def test_fused_loss_benchmark(tmp_path):
  results = fused_loss.main([
      "--vocab_sizes", "64,160", "--tokens", "16", "--hidden_sizes", "8",
      "--ratio_vocab", "160", "--token_chunk", "4", "--vocab_chunk", "16",
      "--time_tokens", "16", "--time_hidden", "8", "--time_vocab", "64",
      "--steps", "1", "--rounds", "1", "--warmup", "0",
      "--workdir", str(tmp_path),
  ])
  data = json.loads((tmp_path / "fused_loss.json").read_text())
  markdown = (tmp_path / "fused_loss.md").read_text()
  assert markdown.startswith("### ") and "**Ratios**" in markdown
  assert "- Command: `python -m benchmarks.fused_loss" in markdown
  assert [r["vocab"] for r in data["memory"]] == [64, 160]
  (growth,) = results["memory_summary"]["growth_with_vocab"]
  # The fused program's scratch space is the same at both vocabularies; the
  # unfused one grows with V.
  # (At this toy size, ~3 KiB, XLA's loop bookkeeping of a few bytes per
  # tile shows; tests/test_lm_fused.py bounds the growth in bytes.)
  assert 1.0 <= growth["fused_growth"] < 1.05
  assert 1.0 <= growth["recompute_growth"] < 1.05
  assert growth["unfused_growth"] > 2.0
  # The four programs compute the same loss.
  values = [r["loss"] for r in data["speed"]["rows"]]
  assert max(values) - min(values) < 1e-5 * max(values)
  assert data["speed"]["fused_over_unfused"] > 0
  assert data["speed"]["recompute_over_unfused"] > 0
  assert "recompute / unfused" in markdown
