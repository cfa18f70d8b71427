"""Writes the README's API table from the public docstrings.

  python -m tools.api_table --write   # rewrite the table in README.md
  python -m tools.api_table --check   # exit 1 if README.md is out of date

Each public function of ``jaxkd.losses`` and ``jaxkd.schedules`` becomes one
row: its name and signature, its one-line summary, its first ``.. math::``
block collapsed to one line, and its first reference.
"""

from __future__ import annotations

import inspect
import re
import sys

from tools import _sections

START = "<!-- api-table:start -->"
END = "<!-- api-table:end -->"


def _public(module) -> list[tuple[str, object]]:
  return [
      (name, obj)
      for name, obj in sorted(vars(module).items())
      if not name.startswith("_")
      and (inspect.isfunction(obj) or inspect.isclass(obj))
      and getattr(obj, "__module__", "").startswith("jaxkd")
  ]


def _formula(doc: str) -> str:
  match = re.search(r"\.\. math::\n((?:[ \t]+.*\n|[ \t]*\n)+)", doc)
  if not match:
    return ""
  text = " ".join(line.strip() for line in match.group(1).splitlines())
  # Pipes would end the Markdown table cell: spell norms with \Vert.
  text = text.replace("\\|", "\\Vert ").replace("|", "\\vert ")
  return "$" + re.sub(r"\s+", " ", text).strip() + "$"


def _reference(doc: str) -> str:
  match = re.search(r"References:\n((?:[ \t]+.*\n)+)", doc)
  if not match:
    return ""
  first = re.split(r"\n\s*\n", match.group(1).strip())[0]
  first = re.sub(r"\s+", " ", first)
  return re.sub(r"`([^`<]+?)\s*<([^>]+)>`_", r"[\1](\2)", first)


def _summary(doc: str) -> str:
  first = doc.strip().splitlines()[0].strip() if doc.strip() else ""
  first = re.sub(r":(?:math|func|class):`([^`]+)`", r"`\1`", first)
  return first.replace("``", "`")


def table() -> str:
  import jaxkd.losses  # pylint: disable=g-import-not-at-top
  import jaxkd.schedules  # pylint: disable=g-import-not-at-top

  rows = ["| function | what it computes | formula | reference |",
          "|---|---|---|---|"]
  for module_name, module in (("losses", jaxkd.losses),
                              ("schedules", jaxkd.schedules)):
    for name, obj in _public(module):
      doc = inspect.getdoc(obj) or ""
      cells = [
          f"`{module_name}.{name}`",
          _summary(doc),
          _formula(doc),
          _reference(doc),
      ]
      rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells)
                  + " |")
  return "\n".join(rows)


def render(readme: str) -> str:
  return _sections.replace(readme, START, END, table())


def main(argv: list[str]) -> int:
  return _sections.main(argv, render, what="API table",
                        command="python -m tools.api_table --write")


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
