"""Samples per second of the student step, the teachers and distillation.

  python -m benchmarks.throughput                      # resnet32x4 -> resnet8x4
  python -m benchmarks.throughput --teacher resnet110 --student resnet32
  python -m benchmarks.throughput --fold_teachers --teacher_dtype bfloat16

For each batch size it measures, on random data (speed does not depend on
it):

* the student-only train step (cross-entropy, SGD with momentum and weight
  decay);
* one teacher's forward pass (eval mode): the float32 teacher as trained,
  and next to it, in the same run, the variant chosen by ``--teacher_dtype``
  (bfloat16 compute, float32 logits) and ``--fold_teachers`` (BatchNorms
  folded by ``jaxkd.folding``), whose teachers then run in every
  distillation row;
* the distillation step (0.1 cross-entropy + 0.9 KD at T = 4) with K = 1, 2,
  4, 8 teachers of one architecture under each execution strategy ("vmap",
  "scan", "unroll", and "auto", reported with the strategy it resolved to);
* offline distillation: the same step with the K teachers' logits cached in
  the batch, so no teacher runs;

with the compile time of each program (trace, lower and compile) and the
memory after it ran (see ``_common.memory_snapshot``). Two ratios come out of
the same run:

* overhead = t(distillation step) / (t(student step) + K t(teacher forward)),
  per strategy; target <= 1.05 (the fused step costs no more than its parts);
* auto / best = samples/s of "auto" / the best of "vmap", "scan", "unroll";
  target >= 1 (the strategy "auto" picks is the fastest; within noise, since
  it compiles to the same program as the one it resolves to).

The timing method is in ``benchmarks/_common.py``: compile timed apart,
warm-up calls excluded, ``block_until_ready``, median of ``--steps`` calls
with the min-max range.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from benchmarks import _common

import jax  # pylint: disable=g-bad-import-order
from jaxkd import models  # pylint: disable=g-bad-import-order
from jaxkd import teachers as teachers_lib  # pylint: disable=g-bad-import-order

NAME = "throughput"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = _common.new_parser(NAME, __doc__)
  parser.add_argument("--batch_sizes", type=_common.int_list, default=[64, 128])
  parser.add_argument("--teachers", type=_common.int_list,
                      default=[1, 2, 4, 8], help="Values of K.")
  parser.add_argument(
      "--strategies",
      type=lambda s: _common.str_list(s, _common.STRATEGIES),
      default=list(_common.STRATEGIES),
  )
  _common.add_dtype_flag(
      parser, help="Compute dtype of the student (and by default of the"
      " teachers).")
  _common.add_dtype_flag(
      parser, "--teacher_dtype", default=None,
      help="Compute dtype of the teachers (default: --dtype).")
  parser.add_argument("--fold_teachers", action="store_true",
                      help="Fold the teachers' BatchNorms (jaxkd.folding).")
  parser.add_argument("--no_offline", action="store_true",
                      help="Skip the offline (cached logits) rows.")
  _common.add_common_flags(parser)
  return parser.parse_args(argv)


def _row(kind, batch_size, k, strategy, timing, compiled, memory, **extra):
  return {
      "kind": kind,
      "batch_size": batch_size,
      "teachers": k,
      "strategy": strategy,
      "samples_per_s": timing.samples_per_s(batch_size),
      "seconds_per_step": {
          "median": timing.median_s, "min": timing.min_s, "max": timing.max_s,
      },
      "steps": timing.steps,
      "compile_s": compiled.compile_s,
      "memory": memory,
      **extra,
  }


def _log(row: dict[str, Any]) -> None:
  sps = row["samples_per_s"]
  label = row["kind"]
  if row["teachers"]:
    label += f" K={row['teachers']}"
  if row["strategy"]:
    label += f" {row['strategy']}"
  print(
      f"  B={row['batch_size']:<4} {label:<40} {sps['median']:8.1f} samples/s"
      f" ({sps['min']:.1f}-{sps['max']:.1f}), compile"
      f" {row['compile_s']:.1f} s",
      flush=True,
  )


def chosen_teacher(args) -> str:
  """The row label of the teacher variant the distillation rows use."""
  details = []
  if args.teacher_dtype != "float32":
    details.append(args.teacher_dtype)
  if args.fold_teachers:
    details.append("folded")
  return "teacher forward" + (f" ({', '.join(details)})" if details else "")


def run_batch_size(args, batch_size: int, student, teacher_sets) -> list[dict]:
  """Every row of one batch size: compile all, then time them interleaved.

  Memory is read after each program's compilation and warm-up calls; the
  timing rounds then alternate over all programs of the batch size.
  """
  batch = _common.make_batch(batch_size, args.image_size, args.num_classes)
  common = dict(num_classes=args.num_classes)
  # (row arguments, setup function) in table order.
  plan = [(("student step", 0, "", {}),
           lambda: _common.train_step_setup(
               student, batch, distill=False, **common))]
  for label, tset in teacher_sets.items():
    group, variables = tset.group("unroll", k=1)
    plan.append(((label, 1, "", {}),
                 lambda g=group, v=variables: _common.teacher_forward_setup(
                     g, v, batch["image"])))
  tset = teacher_sets[chosen_teacher(args)]
  for k in args.teachers:
    for strategy in args.strategies:
      group, variables = tset.group(strategy, k=k)
      resolved = teachers_lib.resolve_strategy(
          strategy)
      label = strategy if strategy != "auto" else f"auto ({resolved})"
      plan.append(((
          "distillation step", k, label, {"folded": tset.folded}),
          lambda g=group, v=variables: _common.train_step_setup(
              student, batch, teacher_groups=[(g, v)], **common)))
    if not args.no_offline:
      plan.append((("offline distillation", k, "cached logits", {}),
                   lambda k=k: _common.train_step_setup(
                       student, batch, offline_k=k, **common)))
  built = []
  for row_args, setup in plan:
    before = _common.memory_snapshot()
    compiled = setup()
    for _ in range(args.warmup):
      compiled.run()
    memory = _common.memory_delta(before, _common.memory_snapshot())
    built.append((row_args, compiled, memory))
    print(f"  B={batch_size:<4} compiled {row_args[0]} {row_args[2]}"
          f" K={row_args[1]} in {compiled.compile_s:.1f} s", flush=True)
  timings = _common.time_interleaved(
      {i: c.run for i, (_, c, _) in enumerate(built)},
      steps=args.steps, rounds=args.rounds,
  )
  rows = []
  for i, ((kind, k, strategy, extra), compiled, memory) in enumerate(built):
    row = _row(kind, batch_size, k, strategy, timings[i], compiled, memory,
               **extra)
    rows.append(row)
    _log(row)
  return rows


def ratios(rows: list[dict], args) -> list[dict]:
  """The two targets per batch size and K, from the rows of one run."""
  out = []
  teacher_kind = chosen_teacher(args)
  for batch_size in args.batch_sizes:
    mine = [r for r in rows if r["batch_size"] == batch_size]
    student = next(r for r in mine if r["kind"] == "student step")
    teacher = next(r for r in mine if r["kind"] == teacher_kind)
    t_student = student["seconds_per_step"]["median"]
    t_teacher = teacher["seconds_per_step"]["median"]
    for k in args.teachers:
      distill = {
          r["strategy"].split(" ")[0]: r for r in mine
          if r["kind"] == "distillation step" and r["teachers"] == k
      }
      entry = {"batch_size": batch_size, "teachers": k, "overhead": {}}
      for strategy, r in distill.items():
        entry["overhead"][strategy] = r["seconds_per_step"]["median"] / (
            t_student + k * t_teacher
        )
      fixed = {s: r for s, r in distill.items() if s != "auto"}
      if "auto" in distill and fixed:
        best_name, best = max(
            fixed.items(), key=lambda item: item[1]["samples_per_s"]["median"]
        )
        entry["best_strategy"] = best_name
        entry["auto_over_best"] = (
            distill["auto"]["samples_per_s"]["median"]
            / best["samples_per_s"]["median"]
        )
      out.append(entry)
  return out


def markdown(rows, targets, args) -> list[tuple[str, str]]:
  table = _common.markdown_table(
      ["batch", "what", "K", "strategy", "samples/s median (min-max)",
       "ms/step", "compile s", "RSS MiB (+delta)"],
      [
          [
              r["batch_size"], r["kind"], r["teachers"] or "",
              r["strategy"], _common.spread(r["samples_per_s"]),
              f"{1000 * r['seconds_per_step']['median']:.1f}",
              f"{r['compile_s']:.1f}",
              _memory_cell(r["memory"]),
          ]
          for r in rows
      ],
  )
  strategies = [s for s in _common.STRATEGIES if s in args.strategies]
  target_rows = []
  for t in targets:
    target_rows.append(
        [t["batch_size"], t["teachers"]]
        + [
            f"{t['overhead'][s]:.3f}" if s in t["overhead"] else ""
            for s in strategies
        ]
        + [
            f"{t['auto_over_best']:.3f} (best: {t['best_strategy']})"
            if "auto_over_best" in t else ""
        ]
    )
  target_table = _common.markdown_table(
      ["batch", "K"]
      + [f"overhead {s}" for s in strategies]
      + ["auto / best"],
      target_rows,
  )
  explain = (
      "overhead = t(distillation step) / (t(student step) + K x t(teacher"
      " forward)), target <= 1.05; auto / best = samples/s of `auto` over"
      " the fastest fixed strategy, target >= 1 (noise allowing)."
  )
  config = (
      f"Student {args.student} ({args.dtype}), teacher {args.teacher}"
      f" ({args.teacher_dtype}),"
      f" {args.image_size}x{args.image_size} images, {args.num_classes}"
      f" classes, teachers"
      f" {'BatchNorm-folded' if args.fold_teachers else 'as trained'};"
      f" median of {args.rounds} alternating rounds x {args.steps} steps"
      f" after {args.warmup} warm-up steps; RSS read after each program's"
      " compilation and warm-up."
  )
  return [("", config), ("Throughput", table),
          ("Targets", explain + "\n\n" + target_table)]


def _memory_cell(memory: dict) -> str:
  if memory.get("device_peak_mib") is not None:
    return f"device peak {memory['device_peak_mib']:.0f}"
  if memory.get("rss_mib") is None:
    return ""
  return f"{memory['rss_mib']:.0f} ({memory.get('rss_delta_mib', 0):+.0f})"


def main(argv: Sequence[str] | None = None) -> dict:
  args = parse_args(argv)
  env = _common.environment("benchmarks.throughput", argv)
  dtype = _common.DTYPES[args.dtype]
  if args.teacher_dtype is None:
    args.teacher_dtype = args.dtype
  student = models.create(args.student, num_classes=args.num_classes,
                          dtype=dtype)
  kmax = max(args.teachers)
  make = lambda k, dtype_name, fold: _common.make_teachers(
      args.teacher, k, num_classes=args.num_classes,
      image_size=args.image_size, dtype=_common.DTYPES[dtype_name], fold=fold,
  )
  # The float32 teacher as trained, and the chosen variant beside it.
  chosen = chosen_teacher(args)
  teacher_sets = {}
  if chosen != "teacher forward":
    teacher_sets["teacher forward"] = make(1, "float32", False)
  teacher_sets[chosen] = make(kmax, args.teacher_dtype, args.fold_teachers)
  print(f"{args.teacher} -> {args.student}, {args.dtype}, backend"
        f" {jax.default_backend()}, XLA_FLAGS={env['xla_flags']!r}",
        flush=True)
  rows = []
  for batch_size in args.batch_sizes:
    rows += run_batch_size(args, batch_size, student, teacher_sets)
  targets = ratios(rows, args)
  for t in targets:
    overhead = ", ".join(f"{s} {v:.3f}" for s, v in t["overhead"].items())
    auto = (
        f"; auto/best {t['auto_over_best']:.3f} (best {t['best_strategy']})"
        if "auto_over_best" in t else ""
    )
    print(f"  B={t['batch_size']} K={t['teachers']}: overhead {overhead}{auto}")
  results = {"config": vars(args), "rows": rows, "targets": targets}
  return _common.finish(
      args, name=NAME,
      title=f"Throughput: {args.teacher} -> {args.student} ({args.dtype})",
      env=env, results=results, sections=markdown(rows, targets, args),
  )


if __name__ == "__main__":
  main(sys.argv[1:])
