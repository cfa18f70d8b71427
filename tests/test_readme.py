"""The README tells the truth: its API table, its commands."""

import pathlib
import re

from jaxkd import losses
from tools import api_table

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_api_table_is_current():
  assert api_table.render(README) == README, (
      "README.md's API table is out of date: run `python -m tools.api_table --write`"
  )


def test_api_table_lists_every_public_loss():
  public = [n for n in dir(losses) if not n.startswith("_")]
  public = [n for n in public if callable(getattr(losses, n))]
  missing = [n for n in public if f"`losses.{n}`" not in README]
  assert not missing, missing


def test_ci_runs_the_readme_test_command():
  commands = re.findall(r"```bash\n(.*?)\n```", README, re.S)
  test_command = next(c for c in commands if "pytest" in c)
  install, run = re.search(
      r"(pip install -e \"\.\[test\]\") && (python -m pytest -q)", test_command
  ).groups()
  ci = (ROOT / ".ci" / "run").read_text()
  assert f"python -m {install}" in ci
  assert run in ci


def test_main_command_produced_the_committed_results():
  commands = re.findall(r"```bash\n(.*?)\n```", README, re.S)
  main_job = commands[0]
  assert "pip install -e . &&" in main_job
  command = main_job.split(" && ")[-1]
  config = re.search(r"--config=(\S+?\.py)", command).group(1)
  assert (ROOT / config).is_file()
  name = pathlib.Path(config).stem
  results = (ROOT / "experiments" / "results" / f"{name}.md").read_text()
  # The committed file is published by the same command with --publish.
  assert f"- Command: `{command} --publish`" in results, (
      f"experiments/results/{name}.md was not made by the README's main"
      " command: run it again with --publish.")


def test_layout_section_is_current():
  from tools import layout  # pylint: disable=g-import-not-at-top
  assert layout.render(README) == README, (
      "README.md's layout is out of date: run `python -m tools.layout"
      " --write`")


def _imports(path: pathlib.Path) -> list[str]:
  import ast  # pylint: disable=g-import-not-at-top
  tree = ast.parse(path.read_text())
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      out.append(node.module)
      out += [f"{node.module}.{a.name}" for a in node.names]
  return [name for name in out if name.split(".")[0] == "jaxkd"]


def _package(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1])


def test_imports_flow_one_way_and_never_reach_into_private_modules():
  offenders = []
  for folder in ("jaxkd", "experiments", "benchmarks", "tools"):
    for path in sorted((ROOT / folder).rglob("*.py")):
      package = _package(path)
      for name in _imports(path):
        parts = name.split(".")
        private = [i for i, p in enumerate(parts) if p.startswith("_")]
        if private:
          owner = ".".join(parts[:private[0]])
          if owner != package and not package.startswith(owner + "."):
            offenders.append(f"{path.relative_to(ROOT)} imports {name}")
  assert not offenders, offenders
  # The losses and schedules import nothing else of jaxkd; jaxkd.lm only
  # the losses.
  rooms = {"jaxkd/losses": ("jaxkd.losses",), "jaxkd/schedules.py": (),
           "jaxkd/lm": ("jaxkd.lm", "jaxkd.losses")}
  for room, allowed in rooms.items():
    paths = ([ROOT / room] if room.endswith(".py")
             else sorted((ROOT / room).rglob("*.py")))
    for path in paths:
      for name in _imports(path):
        assert any(name == a or name.startswith(a + ".") for a in allowed), (
            f"{path.relative_to(ROOT)} imports {name}")
