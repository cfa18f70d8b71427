"""Achieved FLOP/s of the distillation programs against the device's ceiling.

  python -m benchmarks.flops
  python -m benchmarks.flops --teacher resnet110 --student resnet32

The FLOPs of one call of each program (student step, teacher forward,
distillation step with K teachers under ``"auto"``) are XLA's own count, from
``jitted.lower(...).compile().cost_analysis()["flops"]``; the achieved rate
is that count over the median time of a call. The ceiling is measured, not
quoted: the faster of one large float32 (or bfloat16) matrix product
``[n, n] @ [n, n]`` (2 n^3 FLOPs) and one dense 3x3 convolution on the same
device (on XLA:CPU the convolution library outruns the matmul). The fraction achieved
says how far convolutions, BatchNorm and the optimiser update are from the
device's best dense throughput.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from benchmarks import _common

import jax  # pylint: disable=g-bad-import-order
import jax.numpy as jnp  # pylint: disable=g-bad-import-order
from jaxkd import models  # pylint: disable=g-bad-import-order

NAME = "flops"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = _common.new_parser(NAME, __doc__)
  parser.add_argument("--batch_sizes", type=_common.int_list, default=[64, 128])
  parser.add_argument("--teachers", type=int, default=1,
                      help="K of the distillation step.")
  _common.add_dtype_flag(parser)
  parser.add_argument("--fold_teachers", action="store_true")
  parser.add_argument("--matmul_size", type=int, default=2048,
                      help="n of the [n, n] @ [n, n] ceiling product.")
  parser.add_argument("--conv_channels", type=int, default=256,
                      help="C of the [3, 3, C, C] convolution ceiling.")
  _common.add_common_flags(parser)
  return parser.parse_args(argv)


def _rate(fn, operands, flops: float, *, steps: int, warmup: int,
          **fields) -> dict:
  """FLOP/s of ``jit(fn)(*operands)``, which does ``flops`` FLOPs."""
  compiled, _ = _common.compile_step(jax.jit(fn), *operands)
  timing = _common.time_calls(
      lambda: jax.block_until_ready(compiled(*operands)), steps=steps,
      warmup=warmup,
  )
  return {
      **fields,
      "flops": flops,
      "xla_flops": _common.flops_of(compiled),
      "median_s": timing.median_s,
      "flops_per_s": flops / timing.median_s,
      "best_flops_per_s": flops / timing.min_s,
  }


def matmul_ceiling(n: int, dtype, *, steps: int, warmup: int) -> dict:
  """FLOP/s of one [n, n] @ [n, n] product: the device's dense ceiling."""
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.random.normal(key_a, (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(key_b, (n, n), jnp.float32).astype(dtype)
  return _rate(jnp.matmul, (a, b), 2.0 * n**3, steps=steps, warmup=warmup,
               n=n, dtype=jnp.dtype(dtype).name)


def conv_ceiling(channels: int, dtype, *, steps: int, warmup: int) -> dict:
  """FLOP/s of one dense 3x3 convolution, ``[32, 16, 16, C] * [3, 3, C, C]``.

  On XLA:CPU the convolution kernel can outrun the matrix product (they are
  different libraries), so the matmul alone is no ceiling there.
  """
  key_x, key_w = jax.random.split(jax.random.key(1))
  x = jax.random.normal(key_x, (32, 16, 16, channels)).astype(dtype)
  w = jax.random.normal(key_w, (3, 3, channels, channels)).astype(dtype)

  def conv(x, w):
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

  # Multiply-adds that touch the image, not the zero padding (as XLA counts
  # them): per spatial axis of 16, the 3 taps of 16 outputs less the 2 that
  # fall off the edges.
  flops = 2.0 * 32 * (3 * 16 - 2) ** 2 * channels * channels
  return _rate(conv, (x, w), flops, steps=steps, warmup=warmup,
               channels=channels, dtype=jnp.dtype(dtype).name)


def main(argv: Sequence[str] | None = None) -> dict:
  args = parse_args(argv)
  env = _common.environment("benchmarks.flops", argv)
  dtype = _common.DTYPES[args.dtype]
  ceiling = matmul_ceiling(args.matmul_size, dtype, steps=args.steps,
                           warmup=args.warmup)
  conv = conv_ceiling(args.conv_channels, dtype, steps=args.steps,
                      warmup=args.warmup)
  print(f"ceiling: {args.matmul_size}^2 {ceiling['dtype']} matmul"
        f" {ceiling['flops_per_s'] / 1e9:.1f} GFLOP/s (best"
        f" {ceiling['best_flops_per_s'] / 1e9:.1f}); 3x3 convolution of"
        f" {args.conv_channels} channels {conv['flops_per_s'] / 1e9:.1f}"
        " GFLOP/s", flush=True)
  best = max(ceiling["flops_per_s"], conv["flops_per_s"])
  student = models.create(args.student, num_classes=args.num_classes,
                          dtype=dtype)
  tset = _common.make_teachers(
      args.teacher, args.teachers, num_classes=args.num_classes,
      image_size=args.image_size, dtype=dtype, fold=args.fold_teachers,
  )
  rows = []
  for batch_size in args.batch_sizes:
    batch = _common.make_batch(batch_size, args.image_size, args.num_classes)
    common = dict(num_classes=args.num_classes)
    programs = {
        "student step": _common.train_step_setup(
            student, batch, distill=False, **common
        ),
        "teacher forward": _common.teacher_forward_setup(
            *tset.group("auto", k=1), batch["image"]
        ),
        f"distillation step K={args.teachers}": _common.train_step_setup(
            student, batch, teacher_groups=[tset.group("auto")], **common
        ),
    }
    for compiled in programs.values():
      for _ in range(args.warmup):
        compiled.run()
    timings = _common.time_interleaved(
        {name: c.run for name, c in programs.items()},
        steps=args.steps, rounds=args.rounds,
    )
    for name, compiled in programs.items():
      flops = _common.flops_of(compiled.compiled)
      timing = timings[name]
      achieved = None if flops is None else flops / timing.median_s
      row = {
          "program": name,
          "batch_size": batch_size,
          "flops": flops,
          "median_s": timing.median_s,
          "flops_per_s": achieved,
          "fraction_of_ceiling": (
              None if achieved is None else achieved / best
          ),
          "samples_per_s": timing.samples_per_s(batch_size),
      }
      rows.append(row)
      print(
          f"  B={batch_size:<4} {name:<26}"
          f" {(flops or 0) / 1e9:8.2f} GFLOP/call"
          f" {(achieved or 0) / 1e9:7.1f} GFLOP/s"
          f" ({100 * (row['fraction_of_ceiling'] or 0):.0f}% of ceiling)",
          flush=True,
      )
  table = _common.markdown_table(
      ["batch", "program", "GFLOP / call (XLA)", "ms / call", "GFLOP/s",
       "% of ceiling"],
      [
          [
              r["batch_size"], r["program"],
              None if r["flops"] is None else f"{r['flops'] / 1e9:.2f}",
              f"{1000 * r['median_s']:.1f}",
              None if r["flops_per_s"] is None
              else f"{r['flops_per_s'] / 1e9:.1f}",
              None if r["fraction_of_ceiling"] is None
              else f"{100 * r['fraction_of_ceiling']:.0f}%",
          ]
          for r in rows
      ],
  )
  config = (
      f"Student {args.student}, teacher {args.teacher}"
      f"{' (BatchNorm-folded)' if args.fold_teachers else ''}, {args.dtype},"
      f" {args.image_size}x{args.image_size} images. Ceiling: the faster"
      f" of a {args.matmul_size}x{args.matmul_size} {ceiling['dtype']}"
      f" matmul, {ceiling['flops_per_s'] / 1e9:.1f} GFLOP/s (median; best"
      f" {ceiling['best_flops_per_s'] / 1e9:.1f}), and a dense 3x3"
      f" convolution of {args.conv_channels} channels on a [32, 16, 16]"
      f" batch, {conv['flops_per_s'] / 1e9:.1f} GFLOP/s (best"
      f" {conv['best_flops_per_s'] / 1e9:.1f}), each measured here."
  )
  results = {"config": vars(args), "ceiling": ceiling,
             "conv_ceiling": conv, "ceiling_flops_per_s": best, "rows": rows}
  return _common.finish(
      args, name=NAME,
      title=f"Achieved FLOP/s: {args.teacher} -> {args.student}"
      f" ({args.dtype})",
      env=env, results=results,
      sections=[("", config), ("FLOP/s", table)],
  )


if __name__ == "__main__":
  main(sys.argv[1:])
