"""Writes the README's "Results" section from ``experiments/results/*.md``.

  python -m tools.results_readme --write   # rewrite the section in README.md
  python -m tools.results_readme --check   # exit 1 if README.md is out of date

Every results file written by ``experiments/pipeline.py`` (pipeline,
compare and sweep modes) becomes one subsection between
``<!-- results:start -->`` and ``<!-- results:end -->``: its title, its
result table (the lines between ``<!-- table:start -->`` and
``<!-- table:end -->``), what was read off it (between
``<!-- reading:start -->`` and ``<!-- reading:end -->``, links made relative
to the README), the command, date and machine it was produced with,
and a link to the full file. Files are taken in name order.
"""

from __future__ import annotations

import pathlib
import re
import sys

from tools import _sections

START = "<!-- results:start -->"
END = "<!-- results:end -->"
ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"

_TABLE = re.compile(r"<!-- table:start -->\n(.*?)\n<!-- table:end -->", re.S)
_READING = re.compile(
    r"<!-- reading:start -->\n(.*?)\n<!-- reading:end -->", re.S)
_LOCAL_LINK = re.compile(r"\]\((?![a-z]+:|/|#)([^)]+)\)")


def _field(text: str, name: str) -> str:
  match = re.search(rf"^- {name}: (.*)$", text, re.M)
  return match.group(1).strip() if match else ""


def section(results_dir: pathlib.Path = RESULTS,
            root: pathlib.Path = ROOT) -> str:
  """The Markdown of the results section (without the markers)."""
  parts = []
  for path in sorted(results_dir.glob("*.md")):
    text = path.read_text()
    table = _TABLE.search(text)
    if table is None:
      continue
    title = text.splitlines()[0].lstrip("# ").strip() or path.stem
    try:
      link = path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
      link = path.as_posix()
    facts = [f"Command: {_field(text, 'Command')}",
             _field(text, "Date"), _field(text, "Machine")]
    facts = "; ".join(f for f in facts if f and f != "Command: ")
    reading = _READING.search(text)
    if reading is not None:
      # Links in a results file are relative to it; the README is at root.
      folder = link.rsplit("/", 1)[0] + "/" if "/" in link else ""
      reading = _LOCAL_LINK.sub(
          lambda m: f"]({folder}{m.group(1)})", reading.group(1).strip())
    parts.append("\n".join([
        f"#### {title}", "", table.group(1).strip(), "",
        *([reading, ""] if reading else []),
        f"{facts}. Details, versions and per-seed numbers: [{link}]({link}).",
    ]))
  if not parts:
    return "No results yet: run a pipeline (see experiments/configs)."
  return "\n\n".join(parts)


def render(readme: str, results_dir: pathlib.Path = RESULTS,
           root: pathlib.Path = ROOT) -> str:
  """``readme`` with the section between the markers replaced.

  Raises:
    ValueError: If the markers are missing, repeated or out of order.
  """
  return _sections.replace(readme, START, END, section(results_dir, root))


def main(argv: list[str]) -> int:
  return _sections.main(argv, render, what="results section",
                        command="python -m tools.results_readme --write")


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
