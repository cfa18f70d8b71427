"""Where one step's time goes: jaxkd's XLA ops next to PyTorch's operators.

  python -m benchmarks.profile                     # resnet32x4 -> resnet8x4, B=64
  python -m benchmarks.profile --teacher resnet110 --student resnet32 \\
      --batch_size 128

For the distillation step with the teacher in it ("online") and with cached
teacher logits ("offline", the student step alone), both written as in
``benchmarks/torch_reference.py``, it records a few steps under each
framework's profiler and adds up the time per kind of operation:

* jaxkd: ``jax.profiler`` trace events of the compiled step, one per HLO
  instruction, grouped by what the instruction (or the fusion it calls)
  contains: convolution, dot, transpose or layout copy, reduction, or
  elementwise work (BatchNorm normalisation, ReLU, the optimiser update).
  XLA:CPU runs each fused loop on its intra-op threads, so these are
  *thread* milliseconds; it runs most convolutions as asynchronous Eigen
  tasks whose trace events cover only their dispatch, so their time shows up
  in the row "not covered by a synchronous op" (cores x wall time minus
  the rows above: asynchronous convolutions and idle cores).
* PyTorch: ``torch.profiler`` self CPU time per ATen operator, grouped into
  convolution (forward and backward), BatchNorm, ReLU, copies and layout,
  the optimiser, and the rest. Operators run on the calling thread with
  intra-op parallelism inside, so these are wall milliseconds; what the
  operators leave of the wall time is Python and the autograd engine.
  PyTorch runs in a worker process (``benchmarks/torch_worker.py``) on a
  Python that has torch, found as ``benchmarks.torch_reference`` finds it
  (``--torch_python``, ``$JAXKD_TORCH_PYTHON``, ``.venv311``, pyenv 3.11):
  its CPU wheel exists for Python 3.11 only, while jaxkd is profiled on the
  interpreter running this command. It runs after jaxkd's profile, never at
  the same time.

Wall time per step is measured without a profiler, as in the other
benchmarks (median of ``--steps`` calls after ``--warmup``). PyTorch is
optional (``--no_torch``; without a torch interpreter jaxkd is profiled
alone, with a line saying how to install one).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import pathlib
import re
import sys
import tempfile
from typing import Any, Sequence

from benchmarks import _common
from benchmarks import torch_reference
from benchmarks import workers

import jax  # pylint: disable=g-bad-import-order
from jaxkd import models  # pylint: disable=g-bad-import-order

NAME = "profile"
PROGRAMS = ("online", "offline")
JAX_CATEGORIES = (
    "convolution (synchronous part)",
    "matrix product",
    "transpose / layout copy",
    "reduction (BatchNorm statistics, losses)",
    "elementwise (BatchNorm, ReLU, optimiser)",
    "other",
)
UNCOVERED = "not covered by a synchronous op (asynchronous convolutions, idle)"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = _common.new_parser(NAME, __doc__)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--no_torch", dest="torch", action="store_false",
                      help="Profile jaxkd only.")
  parser.add_argument(
      "--torch_python", default=os.environ.get(
          torch_reference.TORCH_PYTHON_ENV),
      help="A Python (3.11) with torch for the PyTorch worker (default: as"
      " benchmarks.torch_reference finds it).")
  parser.add_argument("--top", type=int, default=8,
                      help="How many of jaxkd's costliest ops to list.")
  _common.add_common_flags(parser, steps=5, rounds=1)
  return parser.parse_args(argv)


# ---------------------------------------------------------------------------
# jaxkd: XLA ops.
# ---------------------------------------------------------------------------

_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT )?%(\S+) = (\S+(?: \S+)*?) ([a-z][a-z0-9-]*)\((.*)$"
)
_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) ")
_CALLS = re.compile(r"(?:calls|to_apply)=%([\w.-]+)")
_CONTROL_FLOW = ("while", "call", "conditional", "async-start", "async-done")


def hlo_categories(hlo_text: str) -> dict[str, tuple[str, str]]:
  """Maps each HLO instruction to (category, result shape).

  Control flow (while, call, conditional) is left out: the ops of its body
  have trace events of their own. A fusion is classified by the opcodes of the computation it
  calls, transitively: a convolution anywhere makes it a convolution, then a
  dot, then a transpose or a copy, then a reduce; the rest is elementwise.
  """
  opcodes: dict[str, set[str]] = collections.defaultdict(set)
  calls: dict[str, list[str]] = collections.defaultdict(list)
  instructions: dict[str, tuple[str, str, list[str]]] = {}
  computation = ""
  for line in hlo_text.splitlines():
    if not line.startswith(" "):
      match = _COMPUTATION.match(line)
      if match:
        computation = match.group(1)
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, shape, opcode, rest = match.groups()
    called = _CALLS.findall(rest)
    opcodes[computation].add(opcode)
    calls[computation].extend(called)
    instructions[name] = (shape, opcode, called)

  def contents(comp: str, seen: set[str]) -> set[str]:
    if comp in seen:
      return set()
    seen.add(comp)
    found = set(opcodes[comp])
    for callee in calls[comp]:
      found |= contents(callee, seen)
    return found

  categories = {}
  for name, (shape, opcode, called) in instructions.items():
    if opcode in _CONTROL_FLOW:
      continue  # Its body's ops have trace events of their own.
    inside = {opcode}
    for callee in called:
      inside |= contents(callee, set())
    if "convolution" in inside:
      category = JAX_CATEGORIES[0]
    elif "dot" in inside:
      category = JAX_CATEGORIES[1]
    elif inside & {"transpose", "copy"}:
      category = JAX_CATEGORIES[2]
    elif inside & {"reduce", "reduce-window"}:
      category = JAX_CATEGORIES[3]
    elif opcode in ("fusion", "custom-call") or len(inside) > 1 or opcode in (
        "add", "multiply", "subtract", "divide", "maximum", "select",
        "broadcast", "convert", "compare", "exponential", "log"):
      category = JAX_CATEGORIES[4]
    else:
      category = JAX_CATEGORIES[5]
    categories[name] = (category, shape.split("{")[0])
  return categories


def trace_events(trace_dir: pathlib.Path, module: str) -> list[dict]:
  """The complete ('X') events of HLO module ``module`` in a jax trace."""
  (path,) = sorted(trace_dir.glob("**/*.trace.json.gz"))[-1:]
  with gzip.open(path, "rt", encoding="utf-8") as f:
    events = json.load(f)["traceEvents"]
  return [e for e in events if e.get("ph") == "X"
          and e.get("args", {}).get("hlo_module") == module
          and "hlo_op" in e.get("args", {})]


def profile_jax(setup: _common.Compiled, *, steps: int, warmup: int,
                top: int) -> dict[str, Any]:
  """Thread-ms per step and category of one compiled jaxkd step."""
  timing = _common.time_calls(setup.run, steps=steps, warmup=warmup)
  hlo = setup.compiled.as_text()
  module = re.match(r"HloModule (\S+?),", hlo).group(1)
  categories = hlo_categories(hlo)
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp)
    try:
      for _ in range(steps):
        setup.run()
    finally:
      jax.profiler.stop_trace()
    events = trace_events(pathlib.Path(tmp), module)
  if not events:
    raise RuntimeError(
        f"The trace has no events of module {module!r}: this jaxlib's"
        " profiler does not record XLA ops on this backend."
    )
  # Cores, not threads, bound the work per second: on a machine with fewer
  # cores than XLA threads (the client's and the intra-op pool's), the
  # capacity of one step is cores x wall.
  threads = min(len({e["tid"] for e in events}), os.cpu_count() or 1)
  per_op: collections.Counter[str] = collections.Counter()
  for e in events:
    per_op[e["args"]["hlo_op"]] += e["dur"] / 1e3 / steps  # ms per step
  per_category = {c: 0.0 for c in JAX_CATEGORIES}
  for op, ms in per_op.items():
    if op in categories:  # Control flow and unknown names are left out.
      per_category[categories[op][0]] += ms
  wall_ms = timing.median_s * 1e3
  per_category[UNCOVERED] = max(
      threads * wall_ms - sum(per_category.values()), 0.0)
  costliest = [
      {"op": op, "ms": ms, "category": categories[op][0],
       "shape": categories[op][1]}
      for op, ms in per_op.most_common() if op in categories
  ][:top]
  return {"wall_ms": wall_ms, "threads": threads,
          "thread_ms": per_category, "costliest": costliest}


# ---------------------------------------------------------------------------
# PyTorch: ATen operators, in a worker.
# ---------------------------------------------------------------------------


def find_torch_python(args) -> str | None:
  """The torch interpreter, or None (and one line) when there is none.

  An explicit ``--torch_python`` without torch is an error, not a skip.
  """
  if not args.torch:
    return None
  try:
    return torch_reference.find_torch_python(args.torch_python)
  except SystemExit as missing:
    if args.torch_python:
      raise
    print(f"{missing}\nProfiling jaxkd alone.", file=sys.stderr)
    return None


def profile_torch(args, python: str, *, steps: int) -> dict[str, Any]:
  """Both programs' PyTorch profiles from one torch worker."""
  config = torch_reference.worker_config(
      args, args.teacher, args.student, args.batch_size, "float32",
      fold=False, offline=True)
  with workers.Worker("torch_worker", python, "benchmarks.torch_worker") as (
      worker):
    known = worker.info.get("models", [])
    missing = [m for m in (args.teacher, args.student) if m not in known]
    if missing:
      raise ValueError(
          f"The PyTorch reference has no {', '.join(missing)} (it has"
          f" {', '.join(known)}); pass --no_torch to profile jaxkd alone.")
    worker.request("build", config=config)
    results: dict[str, Any] = {
        program: worker.request(
            "profile", system=f"PyTorch {program}", steps=steps, warmup=0)
        for program in PROGRAMS}
    results["stack"] = torch_reference.stack_text(worker.info)
  return results


# ---------------------------------------------------------------------------
# Driver.
# ---------------------------------------------------------------------------


def _jax_setup(args, program: str) -> _common.Compiled:
  student = models.create(args.student, num_classes=args.num_classes)
  batch = _common.make_batch(args.batch_size, args.image_size,
                             args.num_classes)
  if program == "offline":
    return _common.train_step_setup(student, batch, offline_k=1,
                                    num_classes=args.num_classes)
  teacher = _common.make_teachers(
      args.teacher, 1, num_classes=args.num_classes,
      image_size=args.image_size)
  return _common.train_step_setup(
      student, batch, teacher_groups=[teacher.group("auto")],
      num_classes=args.num_classes)


def _share(ms: float, total: float) -> str:
  return f"{ms:.1f} ({100 * ms / total:.0f} %)" if total > 0 else f"{ms:.1f}"


def markdown(args, results: dict[str, Any]) -> list[tuple[str, str]]:
  sections = []
  for program in PROGRAMS:
    jax_result = results["jaxkd"][program]
    total = jax_result["threads"] * jax_result["wall_ms"]
    rows = [(c, _share(ms, total))
            for c, ms in jax_result["thread_ms"].items()]
    rows.append(("**wall time per step (ms)**",
                 f"**{jax_result['wall_ms']:.1f}**"))
    what = ("distillation step, teacher in the step" if program == "online"
            else "student step on cached teacher logits")
    sections.append((
        f"jaxkd, {program} ({what}): thread-ms per step on"
        f" {jax_result['threads']} cores (share of cores x wall)",
        _common.markdown_table(("XLA ops", "thread-ms per step"), rows)))
    costliest = [(c["op"], c["shape"], c["category"], f"{c['ms']:.1f}")
                 for c in jax_result["costliest"]]
    sections.append((
        f"jaxkd, {program}: costliest XLA ops (thread-ms per step)",
        _common.markdown_table(("op", "result", "kind", "ms"), costliest)))
    if "torch" in results:
      torch_result = results["torch"][program]
      total = torch_result["wall_ms"]
      rows = [(c, _share(ms, total)) for c, ms in torch_result["ms"].items()]
      rows.append(("**wall time per step (ms)**", f"**{total:.1f}**"))
      sections.append((
          f"PyTorch, {program}: self CPU ms per step (share of wall)",
          _common.markdown_table(("ATen operators", "ms per step"), rows)))
  if "torch" in results:
    sections.append(("PyTorch stack", f"- {results['torch']['stack']}"))
  return sections


def main(argv: Sequence[str] | None = None) -> dict:
  args = parse_args(argv)
  env = _common.environment("benchmarks.profile", argv)
  steps = args.steps * max(args.rounds, 1)
  torch_python = find_torch_python(args)
  results: dict[str, Any] = {"config": vars(args), "jaxkd": {}}
  print(f"{args.teacher} -> {args.student}, B={args.batch_size},"
        f" backend {jax.default_backend()}", flush=True)
  for program in PROGRAMS:
    result = profile_jax(_jax_setup(args, program), steps=steps,
                         warmup=args.warmup, top=args.top)
    results["jaxkd"][program] = result
    print(f"  jaxkd {program}: {result['wall_ms']:.1f} ms per step;"
          f" {result['thread_ms']['transpose / layout copy']:.1f} thread-ms"
          " of transposes", flush=True)
  if torch_python is not None:
    results["torch"] = profile_torch(args, torch_python, steps=steps)
    for program in PROGRAMS:
      print(f"  PyTorch {program}: {results['torch'][program]['wall_ms']:.1f}"
            " ms per step", flush=True)
  return _common.finish(
      args, name=NAME,
      title=(f"Profile: where a step's time goes ({args.teacher} ->"
             f" {args.student}, batch {args.batch_size}, float32)"),
      env=env, results=results, sections=markdown(args, results))


if __name__ == "__main__":
  main(sys.argv[1:])
