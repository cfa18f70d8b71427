"""jaxkd against a plain PyTorch eager distillation step, side by side.

  pip install torch==2.13.0          # the `bench` extra
  python -m benchmarks.torch_reference
  python -m benchmarks.torch_reference --pairs resnet32x4:resnet8x4 \\
      --batch_sizes 64 --dtypes float32

The PyTorch step is written the way torchdistill and mdistiller write it: the
teacher in ``eval()`` mode under ``torch.no_grad()``, the student in
``train()`` mode, loss ``0.1 * cross_entropy + 0.9 * T^2 KL`` at T = 4, SGD
with momentum 0.9 and weight decay 5e-4, NCHW tensors, the same
architectures (``benchmarks/torch_models.py``, parameter counts checked
equal). bfloat16 is ``torch.autocast("cpu", dtype=torch.bfloat16)`` around
both forward passes (the loss in float32); in jaxkd it is the models' compute
dtype (``models.create(..., dtype=jnp.bfloat16)``, float32 parameters,
BatchNorm and logits).

Every configuration (teacher:student pair, batch size, dtype) is measured in
one process, the two frameworks alternating in ``--rounds`` rounds of
``--steps`` timed steps each, so that a change in the machine's load hits
both. Rows:

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
import sys
from typing import Any, Sequence

from benchmarks import _common

import jax  # pylint: disable=g-bad-import-order
from jaxkd import models  # pylint: disable=g-bad-import-order

NAME = "torch_reference"
DEFAULT_PAIRS = "resnet32x4:resnet8x4,resnet110:resnet32"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = _common.new_parser(NAME, __doc__, pair=False)
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


# ---------------------------------------------------------------------------
# PyTorch.
# ---------------------------------------------------------------------------


def torch_step_setup(args, teacher_name, student_name, batch_size, dtype_name,
                 offline):
  """A PyTorch step closure (blocking: CPU eager runs synchronously)."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  from benchmarks import torch_models  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  student = torch_models.create(student_name, num_classes=args.num_classes)
  teacher = torch_models.create(teacher_name, num_classes=args.num_classes)
  student.train()
  teacher.eval()
  for p in teacher.parameters():
    p.requires_grad_(False)
  optimizer = torch.optim.SGD(
      student.parameters(), lr=_common.LEARNING_RATE,
      momentum=_common.MOMENTUM, weight_decay=_common.WEIGHT_DECAY,
  )
  generator = torch.Generator().manual_seed(0)
  images = torch.randn(batch_size, 3, args.image_size, args.image_size,
                       generator=generator)
  labels = torch.randint(0, args.num_classes, (batch_size,),
                         generator=generator)
  cached = torch.randn(batch_size, args.num_classes, generator=generator)
  bf16 = dtype_name == "bfloat16"
  temperature = _common.TEMPERATURE

  def autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

  def step():
    if offline:
      teacher_logits = cached
    else:
      with torch.no_grad(), autocast():
        teacher_logits = teacher(images)
    with autocast():
      logits = student(images)
    logits = logits.float()
    teacher_logits = teacher_logits.float()
    kd = F.kl_div(
        F.log_softmax(logits / temperature, dim=1),
        F.softmax(teacher_logits / temperature, dim=1),
        reduction="batchmean",
    ) * temperature**2
    loss = (_common.LABEL_WEIGHT * F.cross_entropy(logits, labels)
            + _common.KD_WEIGHT * kd)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()

  counts = (torch_models.num_parameters(teacher),
            torch_models.num_parameters(student))
  return step, counts


# ---------------------------------------------------------------------------
# jaxkd.
# ---------------------------------------------------------------------------


def _jax_setups(args, teacher_name, student_name, batch_size, dtype_name):
  dtype = _common.DTYPES[dtype_name]
  student = models.create(student_name, num_classes=args.num_classes,
                          dtype=dtype)
  batch = _common.make_batch(batch_size, args.image_size, args.num_classes)
  common = dict(num_classes=args.num_classes)
  setups = {}
  plain = _common.make_teachers(
      teacher_name, 1, num_classes=args.num_classes,
      image_size=args.image_size, dtype=dtype,
  )
  setups["jaxkd online"] = _common.train_step_setup(
      student, batch, teacher_groups=[plain.group("auto")], **common
  )
  if args.fold:
    folded = _common.make_teachers(
        teacher_name, 1, num_classes=args.num_classes,
        image_size=args.image_size, dtype=dtype, fold=True,
    )
    setups["jaxkd online, folded teacher"] = _common.train_step_setup(
        student, batch, teacher_groups=[folded.group("auto")], **common
    )
  if args.offline:
    setups["jaxkd offline"] = _common.train_step_setup(
        student, batch, offline_k=1, **common
    )
  counts = (_count(plain.params[0]), _count(jax.eval_shape(
      student.init, jax.random.key(0), batch["image"])[0]))
  return setups, counts


def _count(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))


def measure_config(args, teacher_name, student_name, batch_size, dtype_name):
  """All rows of one configuration, frameworks alternating per round."""
  jax_setups, jax_counts = _jax_setups(
      args, teacher_name, student_name, batch_size, dtype_name
  )
  runs: dict[str, Any] = {name: s.run for name, s in jax_setups.items()}
  torch_online, torch_counts = torch_step_setup(
      args, teacher_name, student_name, batch_size, dtype_name, offline=False
  )
  runs["PyTorch online"] = torch_online
  if args.offline:
    runs["PyTorch offline"], _ = torch_step_setup(
        args, teacher_name, student_name, batch_size, dtype_name, offline=True
    )
  if jax_counts != torch_counts:
    raise RuntimeError(
        f"{teacher_name} -> {student_name}: jaxkd has {jax_counts} (teacher,"
        f" student) parameters, PyTorch {torch_counts}; the models differ."
    )
  for run in runs.values():  # Warm-up: compiled already, caches and pools.
    for _ in range(args.warmup):
      run()
  timings = _common.time_interleaved(
      runs, steps=args.steps, rounds=args.rounds
  )
  rows = []
  for name, timing in timings.items():
    rows.append({
        "teacher": teacher_name,
        "student": student_name,
        "batch_size": batch_size,
        "dtype": dtype_name,
        "system": name,
        "samples_per_s": timing.samples_per_s(batch_size),
        "steps": timing.steps,
        "compile_s": (
            jax_setups[name].compile_s if name in jax_setups else None
        ),
    })
  by_name = {r["system"]: r["samples_per_s"]["median"] for r in rows}
  for r in rows:
    r["ratio_vs_torch_online"] = (
        r["samples_per_s"]["median"] / by_name["PyTorch online"]
    )
    if "offline" in r["system"] and "PyTorch offline" in by_name:
      r["ratio_vs_torch_offline"] = (
          r["samples_per_s"]["median"] / by_name["PyTorch offline"]
      )
  return rows


def summary(rows) -> list[dict]:
  """Per configuration: the best jaxkd row over PyTorch online."""
  out = []
  keys = sorted({(r["teacher"], r["student"], r["batch_size"], r["dtype"])
                 for r in rows}, key=str)
  for key in keys:
    mine = [r for r in rows
            if (r["teacher"], r["student"], r["batch_size"], r["dtype"]) == key]
    jax_rows = [r for r in mine if r["system"].startswith("jaxkd")]
    online = [r for r in jax_rows if "offline" not in r["system"]]
    best = max(jax_rows, key=lambda r: r["ratio_vs_torch_online"])
    best_online = max(online, key=lambda r: r["ratio_vs_torch_online"])
    out.append({
        "teacher": key[0], "student": key[1], "batch_size": key[2],
        "dtype": key[3],
        "best_online": best_online["system"],
        "best_online_ratio": best_online["ratio_vs_torch_online"],
        "best": best["system"],
        "best_ratio": best["ratio_vs_torch_online"],
        "meets_target": best["ratio_vs_torch_online"] >= 1.0,
    })
  return out


def markdown(rows, summaries, args, torch_threads):
  table = _common.markdown_table(
      ["teacher -> student", "batch", "dtype", "system",
       "samples/s median (min-max)", "x PyTorch online",
       "x PyTorch offline"],
      [
          [
              f"{r['teacher']} -> {r['student']}", r["batch_size"], r["dtype"],
              r["system"], _common.spread(r["samples_per_s"]),
              f"{r['ratio_vs_torch_online']:.2f}",
              (f"{r['ratio_vs_torch_offline']:.2f}"
               if "ratio_vs_torch_offline" in r else ""),
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
  config = (
      f"{args.image_size}x{args.image_size} images, {args.num_classes}"
      f" classes; {args.rounds} alternating rounds x {args.steps} steps"
      f" after {args.warmup} warm-up steps; PyTorch eager, NCHW,"
      f" {torch_threads} threads. Ratios are jaxkd samples/s over PyTorch's."
  )
  return [("", config), ("jaxkd vs PyTorch", table),
          ("Best jaxkd per configuration", summary_table)]


def main(argv: Sequence[str] | None = None) -> dict:
  args = parse_args(argv)
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise SystemExit(
        "benchmarks.torch_reference needs PyTorch, which is not installed:"
        ' pip install -e ".[bench]" (torch==2.13.0, a CPU wheel for Python'
        " 3.11; on 3.12 pip would fetch a multi-GB CUDA build).") from None
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  torch_threads = torch.get_num_threads()
  env = _common.environment("benchmarks.torch_reference", argv)
  env["torch_threads"] = torch_threads
  rows = []
  for teacher_name, student_name in args.pairs:
    for dtype_name in args.dtypes:
      for batch_size in args.batch_sizes:
        config_rows = measure_config(
            args, teacher_name, student_name, batch_size, dtype_name
        )
        for r in config_rows:
          print(
              f"  {teacher_name}->{student_name} B={batch_size} {dtype_name}"
              f" {r['system']:<30} {r['samples_per_s']['median']:8.1f}"
              f" samples/s  x{r['ratio_vs_torch_online']:.2f} PyTorch online",
              flush=True,
          )
        rows += config_rows
  summaries = summary(rows)
  results = {"config": {**vars(args), "pairs": [list(p) for p in args.pairs]},
             "rows": rows, "summary": summaries}
  return _common.finish(
      args, name=NAME,
      title="jaxkd vs PyTorch eager: distillation step",
      env=env, results=results,
      sections=markdown(rows, summaries, args, torch_threads),
  )


if __name__ == "__main__":
  main(sys.argv[1:])
