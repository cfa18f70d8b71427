"""The results files of the pipeline, comparison and sweep modes.

:func:`write_results` writes ``<results_dir>/<name>.md`` (the table, the
reading of it, the exact command, the date, the machine and the versions)
and ``<name>.json``; :func:`result_rows`, :func:`method_gaps` and the
``render_*`` functions make the table and its reading from the runs.
"""

from __future__ import annotations

import datetime
import os
import pathlib
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np

from experiments import methods as methods_lib
from experiments import writers
from jaxkd import measure


DEFAULT_RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"

_VERSIONED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy",
              "grain", "tensorflow-datasets")


def environment() -> dict[str, Any]:
  """Date, machine, device and package versions, for a results file."""
  env = measure.environment(packages=_VERSIONED)
  machine, device = env["machine"], env["device"]
  return {
      "date": datetime.datetime.fromisoformat(env["date"]).strftime(
          "%Y-%m-%d %H:%M UTC"),
      "machine": f"{machine['system']} {machine['architecture']},"
                 f" {machine['logical_cores']} CPU cores",
      "device": f"{device['backend']}: {device['kind']}"
                f" (x{device['count']})",
      "xla_flags": env["xla_flags"],
      "versions": {k: v for k, v in env["versions"].items() if v is not None},
  }


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  array = np.asarray(values, np.float64)
  std = float(np.std(array, ddof=1)) if array.size > 1 else 0.0
  return float(np.mean(array)), std


def pct(mean_std: tuple[float, float], seeds: int = 2) -> str:
  mean, std = mean_std
  if seeds < 2:  # No standard deviation from one seed.
    return f"{100 * mean:.2f}"
  return f"{100 * mean:.2f} ± {100 * std:.2f}"


def method_detail(config: ml_collections.ConfigDict, method: str) -> str:
  if method == "labels":  # A teacher.
    shift = config.teacher.shift_pixels
    return f"random shifts of up to {shift} px" if shift else ""
  if method == "baseline":
    return "labels only"
  sub = methods_lib.method_config(config, method)
  if sub is None:
    return ""
  sub = sub.to_dict()
  keys = [k for k in ("mode", "temperature", "alpha", "beta", "weight",
                      "num_teachers", "noise_scale") if k in sub]
  return ", ".join(f"{k}={sub[k]}" for k in keys)


def result_rows(config, runs: Mapping[str, list[dict]],
          latency: Mapping[str, dict]) -> list[dict]:
  """One row per model/method: accuracies over seeds, params, latency."""
  rows = []
  for key, results in runs.items():
    first = results[0]
    row = {
        "key": key,
        "role": first["role"],
        "method": first["method"],
        "detail": method_detail(config, first["method"]),
        "model": first["model"],
        "params": first["params"],
        "seeds": [r["seed"] for r in results],
        "last": [r["last_accuracy"] for r in results],
        "best": [r["best_accuracy"] for r in results],
        "best_epoch": [r["best_epoch"] for r in results],
        "latency": latency.get(first["model"], {}),
        "train_time_s": [r.get("train_time_s", 0.0) for r in results],
    }
    row["last_mean_std"] = mean_std(row["last"])
    row["best_mean_std"] = mean_std(row["best"])
    rows.append(row)
  return rows


def method_gaps(rows: Sequence[dict]) -> list[dict]:
  """Each distilled student against the baseline, seed by seed."""
  baseline = next((r for r in rows if r["key"] == "baseline"), None)
  if baseline is None:
    return []
  gaps = []
  for row in rows:
    if row["role"] != "student" or row["key"] == "baseline":
      continue
    if row["seeds"] != baseline["seeds"]:
      continue
    diff = np.asarray(row["last"]) - np.asarray(baseline["last"])
    mean, std = mean_std(diff)
    spread = max(baseline["last_mean_std"][1], row["last_mean_std"][1])
    gaps.append({
        "method": row["key"],
        "gap_mean": mean,
        "gap_std_paired": std,
        "baseline_std": baseline["last_mean_std"][1],
        "method_std": row["last_mean_std"][1],
        "gap_over_largest_std": (
            mean / spread if spread > 0 and len(diff) > 1 else None),
        "wins": int(np.sum(diff > 0)),
        "seeds": len(diff),
        # Undefined for one seed: there is no standard deviation.
        "beats_by_two_std": (
            bool(mean > 2 * spread) if len(diff) > 1 else None),
    })
  return gaps


def render_table(rows: Sequence[dict], latency_batch: int) -> str:
  lines = [
      f"| model | method | params | latency (ms / batch of {latency_batch})"
      " | test accuracy, last epoch (%) | test accuracy, best epoch (%) |"
      " best epoch | seeds |",
      "|---|---|---:|---:|---:|---:|---:|---:|",
  ]
  for row in rows:
    role = row["key"].replace("_", " ") if row["role"] == "teacher" else (
        "student")
    method = row["method"] if not row["detail"] else (
        f"{row['method']} ({row['detail']})")
    latency = row["latency"].get("median_ms")
    epochs = row["best_epoch"]
    lines.append(
        f"| {role}: {row['model']} | {method} | {row['params']:,} |"
        f" {'' if latency is None else f'{latency:.3f}'} |"
        f" {pct(row['last_mean_std'], len(row['seeds']))} |"
        f" {pct(row['best_mean_std'], len(row['seeds']))} |"
        f" {int(np.median(epochs))}{' (median)' if len(epochs) > 1 else ''} |"
        f" {len(row['seeds'])} |")
  return "\n".join(lines)


def render_reading(rows: Sequence[dict], gaps: Sequence[dict],
                   config: ml_collections.ConfigDict) -> str:
  """A few sentences read off the numbers (nothing else)."""
  students = [r for r in rows if r["role"] == "student"]
  if len(students) < 2:
    return ""
  ranked = sorted(students, key=lambda r: -r["last_mean_std"][0])
  order = ", ".join(
      f"{r['key']} {pct(r['last_mean_std'], len(r['seeds']))}"
      for r in ranked)
  lines = [f"Students by last-epoch test accuracy: {order}."]
  needs = {r["key"]: uses_teacher(r["key"], config) for r in students}
  free = [r for r in students if r["key"] != "baseline" and not needs[r["key"]]]
  taught = [r for r in students if needs[r["key"]]]
  if free and taught:
    best_taught = max(taught, key=lambda r: r["last_mean_std"][0])
    for row in free:
      diff = row["last_mean_std"][0] - best_taught["last_mean_std"][0]
      lines.append(
          f"The teacher-free control `{row['key']}` is"
          f" {100 * abs(diff):.2f} points {'above' if diff > 0 else 'below'}"
          " the best student trained with the teacher"
          f" (`{best_taught['key']}`):"
          + (" on this data set, much of what the teacher adds can be had"
             " from a label-derived soft target, i.e. it acts as a"
             " regulariser." if diff > -0.002 else
             " the teacher adds more than a label-derived soft target."))
  winners = [g["method"] for g in gaps if g["beats_by_two_std"]]
  losers = [g["method"] for g in gaps if g["beats_by_two_std"] is False]
  if winners:
    lines.append(f"More than two standard deviations above the baseline:"
                 f" {', '.join(winners)}.")
  if losers:
    lines.append(f"Not more than two standard deviations above the baseline:"
                 f" {', '.join(losers)}.")
  return " ".join(lines)


def uses_teacher(method: str, config: ml_collections.ConfigDict) -> bool:
  return methods_lib.needs_teacher(method, config)


def render_gaps(gaps: Sequence[dict]) -> str:
  if not gaps:
    return ""
  lines = [
      "| distilled student | gain over baseline, last epoch (points) |"
      " seeds won | gain / largest std | more than 2 std? |",
      "|---|---:|---:|---:|---|",
  ]
  for gap in gaps:
    if gap["seeds"] < 2:
      lines.append(
          f"| {gap['method']} | {100 * gap['gap_mean']:+.2f} |"
          f" {gap['wins']} / 1 | n/a | n/a (one seed) |")
      continue
    ratio = gap["gap_over_largest_std"]
    lines.append(
        f"| {gap['method']} | {100 * gap['gap_mean']:+.2f} ± "
        f"{100 * gap['gap_std_paired']:.2f} (paired) |"
        f" {gap['wins']} / {gap['seeds']} |"
        f" {'inf' if ratio is None else f'{ratio:.1f}'} |"
        f" {'yes' if gap['beats_by_two_std'] else 'no'} |")
  return "\n".join(lines)


def reading_block(sections: Sequence[str]) -> list[str]:
  """The sections after the table, between markers that
  ``tools/results_readme.py`` copies into the README."""
  sections = [s for s in sections if s]
  if not sections:
    return []
  return ["<!-- reading:start -->", "\n\n".join(sections),
          "<!-- reading:end -->", ""]


def write_results(
    name: str,
    *,
    title: str,
    summary: str,
    table: str,
    extra_sections: Sequence[str] = (),
    payload: Mapping[str, Any],
    command: str,
    wall_time_s: float,
    results_dir: str | os.PathLike[str] | None,
    workdir: pathlib.Path,
) -> pathlib.Path | None:
  """Writes ``<name>.md`` and ``<name>.json`` to the workdir and the
  results directory; returns the results directory's Markdown path."""
  env = environment()
  versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
  text = "\n".join([
      f"# {title}",
      "",
      summary,
      "",
      "<!-- table:start -->",
      table,
      "<!-- table:end -->",
      "",
      *reading_block(extra_sections),
      f"- Command: `{command}`",
      f"- Date: {env['date']}; wall time {wall_time_s:.0f} s",
      f"- Machine: {env['machine']}; device {env['device']}",
      f"- Versions: {versions}",
      "",
  ])
  data = {"name": name, "title": title, "command": command,
          "wall_time_s": wall_time_s, "environment": env, **payload}
  targets = [workdir]
  if results_dir is not None:
    targets.append(pathlib.Path(results_dir))
  for directory in targets:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.md").write_text(text)
    writers.dump_json(directory / f"{name}.json", data)
  print(text)
  return None if results_dir is None else pathlib.Path(results_dir) / (
      f"{name}.md")
