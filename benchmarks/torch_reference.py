"""jaxkd against a plain PyTorch eager distillation step, side by side.

  python -m benchmarks.torch_reference             # Python 3.12 / jax 0.12
  python -m benchmarks.torch_reference --oldest_python .venv311/bin/python
  python -m benchmarks.torch_reference --pairs resnet32x4:resnet8x4 \\
      --batch_sizes 64 --dtypes float32

PyTorch's CPU wheel ``torch==2.13.0`` exists for Python 3.11 only (on 3.12
pip resolves a multi-GB CUDA build), so the benchmark runs each framework
and stack in its own persistent worker process and interleaves them in one
invocation: PyTorch eager on a Python 3.11 interpreter that has torch
(``--torch_python``, default ``$JAXKD_TORCH_PYTHON``, else the first of
``.venv311/bin/python``, a pyenv 3.11 and this interpreter that has it),
jaxkd on the interpreter running this command, and jaxkd on the oldest
supported stack too with ``--oldest_python`` (its rows labelled with its
jax version). The
workers (``benchmarks/torch_worker.py``, ``benchmarks/jax_worker.py``)
speak JSON lines over stdin/stdout (``benchmarks/workers.py``); the parent
waits for each answer, so one process computes at a time. A torch
interpreter:

  python3.11 -m venv .venv311 && .venv311/bin/pip install torch==2.13.0

The PyTorch step is written the way torchdistill and mdistiller write it: the
teacher in ``eval()`` mode under ``torch.no_grad()``, the student in
``train()`` mode, loss ``0.1 * cross_entropy + 0.9 * T^2 KL`` at T = 4, SGD
with momentum 0.9 and weight decay 5e-4, NCHW tensors, the same
architectures (``benchmarks/torch_models.py``, parameter counts checked
equal). bfloat16 is ``torch.autocast("cpu", dtype=torch.bfloat16)`` around
both forward passes (the loss in float32); in jaxkd it is the models' compute
dtype (``models.create(..., dtype=jnp.bfloat16)``, float32 parameters,
BatchNorm and logits).

Every configuration (teacher:student pair, batch size, dtype) is built,
compiled and warmed up once in each worker, then every system of every
worker is timed in turn, in ``--rounds`` rounds of ``--steps`` steps each,
so that a change in the machine's load hits all of them. Rows:

* ``online``: the distillation step with the teacher running in it (jaxkd:
  teachers as trained, and with ``--fold`` also BatchNorm-folded);
* ``offline``: the student step with the teacher's logits cached in the batch
  (jaxkd's ``cache_teacher_outputs``; in PyTorch a precomputed tensor).

Each jaxkd row is reported as a ratio of samples/s over PyTorch's ``online``
row, and the offline rows also over each other. Target: jaxkd >= 1.0 x
PyTorch in float32 for resnet32x4 -> resnet8x4 and resnet110 -> resnet32 at
batch 64 and 128 (BatchNorm folding and offline caching count).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import pathlib
import statistics
import subprocess
import sys
from typing import Any, Sequence

from benchmarks import _common
from benchmarks import workers

NAME = "torch_reference"
DEFAULT_PAIRS = "resnet32x4:resnet8x4,resnet110:resnet32"
TORCH_PYTHON_ENV = "JAXKD_TORCH_PYTHON"
INSTALL_HINT = (
    "python3.11 -m venv .venv311 && .venv311/bin/pip install torch==2.13.0"
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.torch_reference",
      description=__doc__.split("\n")[0],
  )
  parser.add_argument(
      "--pairs", default=DEFAULT_PAIRS,
      help="Comma list of teacher:student pairs.",
  )
  parser.add_argument("--batch_sizes", type=_common.int_list, default=[64, 128])
  parser.add_argument(
      "--dtypes",
      type=lambda s: _common.str_list(s, tuple(_common.DTYPES)),
      default=["float32", "bfloat16"],
  )
  parser.add_argument("--no_fold", dest="fold", action="store_false",
                      help="Skip the BatchNorm-folded jaxkd row.")
  parser.add_argument("--no_offline", dest="offline", action="store_false",
                      help="Skip the offline (cached logits) rows.")
  parser.add_argument("--torch_threads", type=int, default=None,
                      help="torch.set_num_threads (default: PyTorch's).")
  parser.add_argument(
      "--torch_python", default=os.environ.get(TORCH_PYTHON_ENV),
      help="A Python (3.11) with torch for the PyTorch worker (default:"
      f" ${TORCH_PYTHON_ENV}, else the first of .venv311/bin/python, pyenv"
      " 3.11 and this interpreter that has torch).")
  parser.add_argument(
      "--oldest_python", default=None,
      help="Also time jaxkd on this interpreter (the oldest supported stack,"
      " e.g. .venv311/bin/python).")
  parser.add_argument("--no_torch", dest="torch", action="store_false",
                      help="jaxkd workers only (no PyTorch rows, no ratios).")
  _common.add_common_flags(parser, steps=5, rounds=3)
  args = parser.parse_args(argv)
  pairs = []
  for item in args.pairs.split(","):
    teacher, _, student = item.partition(":")
    if not teacher or not student:
      parser.error(f"--pairs wants teacher:student items, got {item!r}.")
    pairs.append((teacher.strip(), student.strip()))
  args.pairs = pairs
  return args


def recipe() -> dict[str, float]:
  """The training recipe both frameworks follow (``_common``'s constants)."""
  return {
      "learning_rate": _common.LEARNING_RATE, "momentum": _common.MOMENTUM,
      "weight_decay": _common.WEIGHT_DECAY,
      "label_weight": _common.LABEL_WEIGHT, "kd_weight": _common.KD_WEIGHT,
      "temperature": _common.TEMPERATURE,
  }


def worker_config(args, teacher_name: str, student_name: str,
                  batch_size: int, dtype_name: str, *, fold: bool,
                  offline: bool) -> dict[str, Any]:
  """The ``build`` request's configuration, for the jaxkd and torch workers."""
  return {
      "teacher": teacher_name, "student": student_name,
      "batch_size": batch_size, "dtype": dtype_name,
      "image_size": args.image_size, "num_classes": args.num_classes,
      "fold": fold, "offline": offline, "warmup": args.warmup,
      "recipe": recipe(),
  }


# ---------------------------------------------------------------------------
# Workers.
# ---------------------------------------------------------------------------


def has_torch(python: str) -> bool:
  """Whether ``python`` runs and imports torch."""
  try:
    result = subprocess.run([python, "-c", "import torch"],
                            capture_output=True, timeout=300, check=False)
  except (OSError, subprocess.TimeoutExpired):
    return False
  return result.returncode == 0


def torch_python_candidates() -> list[str]:
  """Where a Python with torch may be: .venv311s, pyenv 3.11s, this one."""
  found = [str(workers.REPO_ROOT / ".venv311" / "bin" / "python"),
           str(pathlib.Path.cwd() / ".venv311" / "bin" / "python")]
  pyenv = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
  found += sorted(glob.glob(os.path.join(pyenv, "versions", "3.11*", "bin",
                                         "python")), reverse=True)
  found.append(sys.executable)  # A 3.11 stack with torch runs itself.
  return list(dict.fromkeys(p for p in found if os.path.exists(p)))


def find_torch_python(explicit: str | None,
                      candidates: Sequence[str] | None = None) -> str:
  """``explicit`` if it has torch, else the first candidate that has it.

  Raises:
    SystemExit: with a one-line message and the install command, when
      ``explicit`` lacks torch or no candidate has it.
  """
  if explicit:
    if has_torch(explicit):
      return explicit
    raise SystemExit(
        f"benchmarks.torch_reference: {explicit} (--torch_python or"
        f" ${TORCH_PYTHON_ENV}) cannot import torch; install it there with"
        f" `{explicit} -m pip install torch==2.13.0` (a CPU wheel for Python"
        " 3.11), or pass --no_torch.")
  tried = list(torch_python_candidates() if candidates is None
               else candidates)
  for python in tried:
    if has_torch(python):
      return python
  raise SystemExit(
      "benchmarks.torch_reference: no Python with torch found (tried"
      f" {', '.join(tried) or 'nothing: no .venv311 or pyenv 3.11'}); install one with"
      f" `{INSTALL_HINT}` (torch 2.13.0 is a CPU wheel for Python 3.11 only;"
      f" on 3.12 pip fetches a multi-GB CUDA build), or pass --torch_python"
      " PATH, or --no_torch.")


def _label(worker: workers.Worker, taken: set[str]) -> str:
  info = worker.info
  if info["framework"] == "PyTorch":
    label = "PyTorch"
  else:
    label = f"jax {info['versions']['jax']}"
  base, n = label, 2
  while label in taken:  # The same stack twice.
    label, n = f"{base}, worker {n}", n + 1
  taken.add(label)
  return label


def start_workers(args, stack: contextlib.ExitStack) -> list[workers.Worker]:
  """The PyTorch worker (unless ``--no_torch``) and the jaxkd workers."""
  def resolve(python):  # Workers start in the repository root.
    return os.path.abspath(python) if os.sep in python else python

  specs = []
  if args.torch:
    threads = ["--threads", str(args.torch_threads)] if args.torch_threads \
        else []
    specs.append((resolve(find_torch_python(args.torch_python)),
                  "benchmarks.torch_worker", threads))
  specs.append((sys.executable, "benchmarks.jax_worker", []))
  if args.oldest_python:
    specs.append((resolve(args.oldest_python), "benchmarks.jax_worker",
                  []))
  started, taken = [], set()
  for python, module, extra in specs:
    worker = stack.enter_context(
        workers.Worker(module.split(".")[-1], python, module, extra))
    worker.label = _label(worker, taken)
    started.append(worker)
  return started


def system_name(worker: workers.Worker, system: str) -> str:
  """A row's system: jaxkd rows carry their stack's jax version."""
  if worker.info["framework"] == "PyTorch":
    return system
  return f"{system} ({worker.label})"


def stack_text(info: dict[str, Any]) -> str:
  versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
  threads = f", {info['threads']} threads" if "threads" in info else ""
  return f"{info['framework']}: {versions}{threads} ({info['executable']})"


# ---------------------------------------------------------------------------
# Measuring.
# ---------------------------------------------------------------------------


def measure_config(args, pool, teacher_name, student_name, batch_size,
                   dtype_name):
  """All rows of one configuration, the workers' systems alternating."""
  config = worker_config(args, teacher_name, student_name, batch_size,
                         dtype_name, fold=args.fold, offline=args.offline)
  built = {w: w.request("build", config=config) for w in pool}
  counts = {w.label: tuple(b["counts"]) for w, b in built.items()}
  if len(set(counts.values())) > 1:
    raise RuntimeError(
        f"{teacher_name} -> {student_name}: (teacher, student) parameters"
        f" differ between workers, {counts}; the models differ.")
  pairs = [(w, s) for w, b in built.items() for s in b["systems"]]
  durations = workers.interleave(pairs, steps=args.steps, rounds=args.rounds)
  memory = {w: w.request("memory") for w in pool}
  rows = []
  for (worker, system), seconds in durations.items():
    timing = _common.Timing(statistics.median(seconds), min(seconds),
                            max(seconds), len(seconds))
    rows.append({
        "teacher": teacher_name, "student": student_name,
        "batch_size": batch_size, "dtype": dtype_name,
        "system": system_name(worker, system),
        "framework": worker.info["framework"], "stack": worker.label,
        "samples_per_s": timing.samples_per_s(batch_size),
        "steps": timing.steps,
        "compile_s": built[worker]["compile_s"].get(system),
        "worker_rss_mib": memory[worker]["rss_mib"],
        "worker_peak_rss_mib": memory[worker]["peak_rss_mib"],
    })
  by_name = {r["system"]: r["samples_per_s"]["median"] for r in rows}
  for r in rows:
    if "PyTorch online" in by_name:
      r["ratio_vs_torch_online"] = (
          r["samples_per_s"]["median"] / by_name["PyTorch online"])
    if "offline" in r["system"] and "PyTorch offline" in by_name:
      r["ratio_vs_torch_offline"] = (
          r["samples_per_s"]["median"] / by_name["PyTorch offline"])
  return rows


def summary(rows) -> list[dict]:
  """Per configuration and jaxkd stack: its best row over PyTorch online."""
  out = []
  keys = sorted({(r["teacher"], r["student"], r["batch_size"], r["dtype"],
                  r["stack"]) for r in rows
                 if r["framework"] == "jaxkd"
                 and "ratio_vs_torch_online" in r}, key=str)
  for key in keys:
    mine = [r for r in rows
            if (r["teacher"], r["student"], r["batch_size"], r["dtype"],
                r["stack"]) == key]
    online = [r for r in mine if "offline" not in r["system"]]
    best = max(mine, key=lambda r: r["ratio_vs_torch_online"])
    best_online = max(online, key=lambda r: r["ratio_vs_torch_online"])
    out.append({
        "teacher": key[0], "student": key[1], "batch_size": key[2],
        "dtype": key[3], "stack": key[4],
        "best_online": best_online["system"],
        "best_online_ratio": best_online["ratio_vs_torch_online"],
        "best": best["system"],
        "best_ratio": best["ratio_vs_torch_online"],
        "meets_target": best["ratio_vs_torch_online"] >= 1.0,
    })
  return out


def _ratio(row, key):
  return f"{row[key]:.2f}" if key in row else ""


def markdown(rows, summaries, args, infos):
  table = _common.markdown_table(
      ["teacher -> student", "batch", "dtype", "system",
       "samples/s median (min-max)", "x PyTorch online",
       "x PyTorch offline", "worker RSS MiB"],
      [
          [
              f"{r['teacher']} -> {r['student']}", r["batch_size"], r["dtype"],
              r["system"], _common.spread(r["samples_per_s"]),
              _ratio(r, "ratio_vs_torch_online"),
              _ratio(r, "ratio_vs_torch_offline"),
              (f"{r['worker_rss_mib']:.0f}" if r["worker_rss_mib"] else ""),
          ]
          for r in rows
      ],
  )
  summary_table = _common.markdown_table(
      ["teacher -> student", "batch", "dtype", "best jaxkd online",
       "x PyTorch online", "best jaxkd (offline counts)", "x PyTorch online"],
      [
          [
              f"{s['teacher']} -> {s['student']}", s["batch_size"],
              s["dtype"], s["best_online"], f"{s['best_online_ratio']:.2f}",
              s["best"], f"{s['best_ratio']:.2f}",
          ]
          for s in summaries
      ],
  )
  workers_text = "\n".join(f"- Worker {label}: {stack_text(info)}"
                           for label, info in infos.items())
  config = (
      f"{args.image_size}x{args.image_size} images, {args.num_classes}"
      f" classes; {args.rounds} alternating rounds x {args.steps} steps"
      f" after {args.warmup} warm-up steps, each worker process timing its"
      " own steps in turn; worker RSS is the worker process's resident set"
      " after the configuration's rounds."
      + (" PyTorch eager, NCHW. Ratios are jaxkd samples/s over PyTorch's."
         if args.torch else "")
  )
  sections = [("", workers_text), ("", config),
              ("jaxkd vs PyTorch", table)]
  if summaries:
    sections.append(("Best jaxkd per configuration", summary_table))
  return sections


def main(argv: Sequence[str] | None = None) -> dict:
  args = parse_args(argv)
  env = _common.environment("benchmarks.torch_reference", argv)
  rows = []
  with contextlib.ExitStack() as stack:
    pool = start_workers(args, stack)
    infos = {w.label: w.info for w in pool}
    env["workers"] = infos
    for label, info in infos.items():
      print(f"worker {label}: {stack_text(info)}", flush=True)
    for teacher_name, student_name in args.pairs:
      for dtype_name in args.dtypes:
        for batch_size in args.batch_sizes:
          config_rows = measure_config(
              args, pool, teacher_name, student_name, batch_size, dtype_name
          )
          for r in config_rows:
            ratio = (f"  x{r['ratio_vs_torch_online']:.2f} PyTorch online"
                     if "ratio_vs_torch_online" in r else "")
            print(
                f"  {teacher_name}->{student_name} B={batch_size}"
                f" {dtype_name} {r['system']:<42}"
                f" {r['samples_per_s']['median']:8.1f} samples/s{ratio}",
                flush=True,
            )
          rows += config_rows
  summaries = summary(rows)
  results = {"config": {**vars(args), "pairs": [list(p) for p in args.pairs]},
             "rows": rows, "summary": summaries}
  paths = _common.write_results(
      name=args.name or NAME,
      title="jaxkd vs PyTorch eager: distillation step",
      env=env,
      results=results,
      sections=markdown(rows, summaries, args, infos),
      out_dir=args.out_dir,
      note=args.note,
  )
  print("wrote", *paths)
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
