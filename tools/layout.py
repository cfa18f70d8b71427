"""Writes the README's layout section from the modules that are there.

  python -m tools.layout --write   # rewrite the section in README.md
  python -m tools.layout --check   # exit 1 if README.md is out of date

One line per public module or package of ``jaxkd`` (private ``_*`` modules
are parts of the package above them) and per top-level folder: its path and
the first line of its docstring, read with ``ast`` (nothing is imported).
"""

from __future__ import annotations

import ast
import pathlib
import sys

from tools import _sections

START = "<!-- layout:start -->"
END = "<!-- layout:end -->"
ROOT = pathlib.Path(__file__).resolve().parent.parent
FOLDERS = ("experiments", "benchmarks", "tests", "tools")


def _summary(path: pathlib.Path) -> str:
  doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
  line = doc.strip().splitlines()[0] if doc.strip() else ""
  return line.rstrip(".")


def entries() -> list[tuple[str, str]]:
  """``(path, summary)`` for every public module and folder, in order."""
  out = []
  package = ROOT / "jaxkd"
  for path in sorted(package.rglob("*.py")):
    relative = path.relative_to(ROOT)
    if any(part.startswith("_") and part != "__init__.py"
           for part in relative.parts):
      continue
    if path.name == "__init__.py":
      name = f"{relative.parent.as_posix()}/"
    else:
      name = relative.as_posix()
    out.append((name, _summary(path)))
  for folder in FOLDERS:
    out.append((f"{folder}/", _summary(ROOT / folder / "__init__.py")))
  return out


def render(readme: str) -> str:
  rows = entries()
  width = max(len(name) for name, _ in rows) + 1
  body = "```\n" + "\n".join(
      f"{name:<{width}}{summary}" for name, summary in rows) + "\n```"
  return _sections.replace(readme, START, END, body)


def main(argv: list[str]) -> int:
  return _sections.main(argv, render, what="layout",
                        command="python -m tools.layout --write")


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
