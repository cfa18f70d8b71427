"""A benchmark run's results: its environment, Markdown tables and files.

:func:`write_results` writes ``<out_dir>/<name>.json`` (every figure) and
``<name>.md`` (machine, device, versions, XLA flags, the exact command, the
date and load, then the tables); ``--publish`` points ``out_dir`` at
``benchmarks/results/``, the files the README's tables are made from.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import sys
from typing import Any, Iterable, Sequence

from jaxkd import measure

# The packages whose versions a results file records.
VERSIONED = ("jax", "jaxlib", "flax", "optax", "numpy", "torch")


def environment(module: str, argv: Sequence[str] | None) -> dict[str, Any]:
  """Machine, device, versions, command, date and load of this run."""
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    load = list(os.getloadavg())
  except OSError:
    load = None
  return {
      **measure.environment(packages=VERSIONED),
      "command": " ".join(
          ["python", "-m", module] + [shlex.quote(a) for a in argv]
      ),
      "load_average_start": load,
  }


def markdown_table(
    headers: Sequence[str], rows: Iterable[Sequence[Any]]
) -> str:
  def cell(value):
    if value is None:
      return ""
    if isinstance(value, float):
      return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value).replace("|", "\\|")

  lines = [
      "| " + " | ".join(headers) + " |",
      "|" + "|".join("---" for _ in headers) + "|",
  ]
  lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def spread(samples: dict[str, float]) -> str:
  """``"151 (140-155)"``: median samples/s with the min-max range."""
  return (
      f"{samples['median']:.1f} ({samples['min']:.1f}-{samples['max']:.1f})"
  )


def finish(
    args: argparse.Namespace,
    *,
    name: str,
    out_dir: str | os.PathLike[str] | None = None,
    **fields: Any,
) -> dict[str, Any]:
  """Writes a run's results (:func:`write_results`), prints where; returns them.

  The results file stem is ``args.name`` or ``name`` and the folder
  ``out_dir`` or ``args.out_dir``; ``args.note`` is the note. ``fields``
  are ``title``, ``env``, ``results`` and ``sections``.
  """
  paths = write_results(
      name=args.name or name,
      out_dir=args.out_dir if out_dir is None else out_dir,
      note=args.note,
      **fields,
  )
  print("wrote", *paths)
  return fields["results"]


def write_results(
    *,
    name: str,
    title: str,
    env: dict[str, Any],
    results: dict[str, Any],
    sections: Sequence[tuple[str, str]],
    out_dir: str | os.PathLike[str],
    note: str = "",
) -> tuple[pathlib.Path, pathlib.Path]:
  """Writes ``<out_dir>/<name>.json`` and ``<name>.md``; returns both paths.

  ``sections`` are ``(heading, markdown)`` pairs printed after the header.
  """
  try:
    env = {**env, "load_average_end": list(os.getloadavg())}
  except OSError:
    pass
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  json_path = out / f"{name}.json"
  md_path = out / f"{name}.md"
  json_path.write_text(
      json.dumps({"environment": env, "note": note, **results}, indent=2,
                 default=float) + "\n",
      encoding="utf-8",
  )
  machine, device, versions = env["machine"], env["device"], env["versions"]
  version_text = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
  load = env.get("load_average_start")
  load_text = (
      "" if load is None else
      f"; load average {load[0]:.2f} at start,"
      f" {env.get('load_average_end', [float('nan')])[0]:.2f} at end"
  )
  lines = [
      f"### {title}",
      "",
      f"- Machine: {machine['cpu']}, {machine['logical_cores']} logical"
      f" cores, {machine['memory_gib'] or 0:.0f} GiB, {machine['platform']}"
      f"{load_text}",
      f"- Device: {device['backend']} ({device['kind']}) x {device['count']}",
      f"- Versions: {version_text}",
      f"- XLA_FLAGS: `{env['xla_flags'] or '(none)'}`",
      f"- Command: `{env['command']}`",
      f"- Date: {env['date']}",
  ]
  if note:
    lines.append(f"- Note: {note}")
  for heading, body in sections:
    lines.append("")
    if heading:
      lines += [f"**{heading}**", ""]
    lines.append(body)
  md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return json_path, md_path
