"""Generated sections of the README: the text between two markers."""

from __future__ import annotations

import pathlib
from typing import Callable

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def replace(readme: str, start: str, end: str, body: str) -> str:
  """``readme`` with the text between ``start`` and ``end`` set to ``body``.

  Raises:
    ValueError: Unless each marker appears exactly once, ``start`` first.
  """
  if (readme.count(start) != 1 or readme.count(end) != 1
      or readme.index(start) > readme.index(end)):
    raise ValueError(
        f"README.md needs exactly one {start} and one {end} marker, in that"
        f" order (found {readme.count(start)} and {readme.count(end)})."
    )
  before, rest = readme.split(start, 1)
  _, after = rest.split(end, 1)
  return f"{before}{start}\n{body}\n{end}{after}"


def main(argv: list[str], render: Callable[[str], str], *, what: str,
         command: str) -> int:
  """``--write`` rewrites README.md with ``render``; ``--check`` compares.

  Anything else (no argument, ``--help``) prints the usage and writes
  nothing. Returns the exit status: 0, 1 when ``--check`` finds the README
  out of date (naming ``what`` and the ``command`` that updates it), 2 when
  the markers are wrong or the arguments unknown.
  """
  if argv not in (["--write"], ["--check"]):
    print(f"usage: {command.removesuffix(' --write')} --write | --check\n"
          f"  --write  rewrite README.md's {what}\n"
          f"  --check  exit 1 if README.md's {what} is out of date")
    return 0 if argv in ([], ["--help"], ["-h"]) else 2
  text = README.read_text(encoding="utf-8")
  try:
    updated = render(text)
  except ValueError as error:
    print(error)
    return 2
  if "--check" in argv:
    if updated != text:
      print(f"README.md's {what} is out of date: {command}")
      return 1
    return 0
  README.write_text(updated, encoding="utf-8")
  return 0
