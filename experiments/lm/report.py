"""The LM experiment's results: the per-method summary, the table, the plot.

``summarize_runs`` turns the per-seed records of :mod:`experiments.lm.runner`
into one row per method (mean and sample std over seeds, and whether the
gain over the baseline exceeds twice the larger std); ``render_markdown``
and ``plot`` write what ``lm_stdlib.md`` and ``lm_stdlib.png`` hold.
"""

from __future__ import annotations

import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["NAME", "plot", "render_markdown", "summarize_runs"]

# The stem of the experiment's outputs: lm_stdlib.{md,json,png}.
NAME = "lm_stdlib"


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
  values = np.asarray(values, np.float64)
  std = float(values.std(ddof=1)) if values.size > 1 else float("nan")
  return float(values.mean()), std


def summarize_runs(runs: Mapping[str, list[dict]]) -> list[dict]:
  """One row per method: mean +- std over seeds and the 2-std verdict."""
  rows = []
  base = _mean_std([r["validation_bpb"] for r in runs["baseline"]]) if (
      "baseline" in runs) else None
  for method, records in runs.items():
    val = _mean_std([r["validation_bpb"] for r in records])
    test = _mean_std([r["test_bpb"] for r in records])
    row = {"method": method, "seeds": len(records),
           "validation_bpb": val, "test_bpb": test,
           "params": records[0]["params"],
           "tokens_per_s": float(np.mean([r["tokens_per_s"]
                                          for r in records]))}
    if base is not None and method != "baseline":
      gain = base[0] - val[0]
      spread = max(base[1], val[1])
      row["gain_vs_baseline"] = gain
      row["beats_baseline_2std"] = bool(
          np.isfinite(spread) and gain > 2 * spread)
    rows.append(row)
  return rows


def _fmt(mean_std) -> str:
  return f"{mean_std[0]:.4f} ± {mean_std[1]:.4f}"


def render_markdown(result: Mapping[str, Any]) -> str:
  config, info = result["config"], result["data"]
  lines = [
      f"# Byte-level LM distillation on the Python {info['python']}"
      " standard library",
      "",
      f"Command: `{result['command']}` ({result['wall_s'] / 60:.1f} min on"
      f" {result['environment']['cpus']} CPU cores; load average"
      f" {result['environment']['load_before']} before and"
      f" {result['environment']['load_after']} after: the machine was"
      " shared, so tokens/s are indicative).",
      "",
      f"Data: {info['files']} `*.py` files ({info['bytes']:,} bytes) under"
      f" `{info['stdlib']}`, sha256 of the sorted `path<TAB>size` lines"
      f" `{info['sha256_sorted_paths_and_sizes']}`; split by file with seed"
      f" {info['split_seed']}: {info['train_files']} train"
      f" ({info['train_bytes']:,} bytes read), {info['validation_files']}"
      f" validation ({info['validation_bytes']:,} bytes),"
      f" {info['test_files']} test ({info['test_bytes']:,} bytes).",
      f"Evaluation: {config['eval_windows']} evenly spaced windows of"
      f" {config['seq_len']} bytes per split; bits per byte of the last"
      f" {config['seq_len'] - 1} bytes of each window.",
      "",
      f"Teacher: {config['teacher']['num_layers']} layers, width"
      f" {config['teacher']['hidden_size']}, {result['teacher']['params']:,}"
      f" params, {config['teacher_steps']} steps: validation"
      f" {result['teacher']['validation_bpb']:.4f}, test"
      f" {result['teacher']['test_bpb']:.4f} bits per byte" + (
          f" (second teacher, for the mixture:"
          f" {result['teacher_2']['validation_bpb']:.4f} validation)."
          if result.get("teacher_2") else "."),
      f"Students: {config['student']['num_layers']} layer(s), width"
      f" {config['student']['hidden_size']}, {config['student_steps']}"
      f" steps of batch {config['batch_size']} x {config['seq_len']} bytes,"
      f" seeds {list(config['seeds'])}.",
      "",
      # The markers let tools/results_readme.py copy table and reading.
      "<!-- table:start -->",
      "| method | objective | validation bpb | test bpb | gain vs baseline"
      " (val) | > 2 std? | params | tokens/s |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for row in result["rows"]:
    gain = row.get("gain_vs_baseline")
    lines.append(
        f"| {row['method']} | {result['details'][row['method']]} |"
        f" {_fmt(row['validation_bpb'])} | {_fmt(row['test_bpb'])} |"
        f" {'' if gain is None else f'{gain:+.4f}'} |"
        f" {'' if gain is None else ('yes' if row['beats_baseline_2std'] else 'no')} |"
        f" {row['params']:,} | {row['tokens_per_s']:,.0f} |")
  winners = [r["method"] for r in result["rows"]
             if r.get("beats_baseline_2std")]
  lines += [
      "<!-- table:end -->",
      "",
      "<!-- reading:start -->",
      "Mean ± sample std over seeds. \"> 2 std\": the validation gain over"
      " the baseline exceeds twice the larger of the two standard"
      " deviations.",
      "",
      "Reading: " + (
          f"{', '.join(winners)} beat the baseline by more than 2 std."
          if winners else
          "no method beats the baseline by more than 2 std.")
      + " The others do not (a negative gain is worse than the baseline);"
      " at this scale (a few hundred steps, tiny models) a verdict says"
      " nothing about larger runs. tokens/s counts training tokens per second of the train"
      " steps (GKD includes its sampling, sparse top-k the teacher pass that"
      " fills its cache); the plot shows validation bits per byte against"
      " steps (mean over seeds).",
      "",
      f"![Validation bits per byte against steps]({NAME}.png)",
      "<!-- reading:end -->",
      "",
      f"- Command: `{result['command']}`",
      f"- Date: {result['environment'].get('date', '')}; wall time"
      f" {result['wall_s']:.0f} s",
      "",
  ]
  return "\n".join(lines)


def plot(path: pathlib.Path, runs: Mapping[str, list[dict]],
         teacher: Mapping[str, Any]) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for method, records in runs.items():
    steps = [s for s, _ in records[0]["curve"]]
    values = np.mean([[v for _, v in r["curve"]] for r in records], axis=0)
    ax.plot(steps, values, marker="o", markersize=3, label=method)
  ax.axhline(teacher["validation_bpb"], color="k", linestyle="--",
             linewidth=1, label="teacher")
  ax.set_xlabel("student step")
  ax.set_ylabel("validation bits per byte")
  ax.set_title("Byte-level students on the Python standard library")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
