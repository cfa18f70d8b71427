"""The data-parallel distillation step over 1, 2, 4 and 8 devices.

  python -m benchmarks.scaling
  python -m benchmarks.scaling --devices 1,2 --per_device_batch 32

Weak scaling: each device gets ``--per_device_batch`` examples, so ``n``
devices step on a global batch ``n`` times larger. The train state is
replicated and the batch split over the mesh's ``"data"`` axis
(``jaxkd.sharding`` when it is present, else ``NamedSharding`` directly); the
step is ``jaxkd.make_train_step`` unchanged, partitioned by the compiler.
Scaling efficiency is ``samples/s(n) / (n * samples/s(1))``.

On CPU the devices are fake: ``jax_num_cpu_devices`` is set to the largest
count requested before the backend starts, and every fake device shares the
machine's cores. There, efficiency measures the partitioning overhead on a
fixed amount of compute, not scaling: with 2 cores, ``n`` fake devices cannot
beat 1/n efficiency by much, and the figures are printed as measured. Run it
on a multi-accelerator host for meaningful numbers.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from benchmarks import _common

import jax  # pylint: disable=g-bad-import-order
from jax.sharding import Mesh  # pylint: disable=g-bad-import-order
from jax.sharding import NamedSharding  # pylint: disable=g-bad-import-order
from jax.sharding import PartitionSpec  # pylint: disable=g-bad-import-order
import numpy as np  # pylint: disable=g-bad-import-order
from jaxkd import cpu  # pylint: disable=g-bad-import-order
from jaxkd import models  # pylint: disable=g-bad-import-order

try:  # The sharding helpers, when this version of jaxkd has them.
  from jaxkd import sharding as jaxkd_sharding  # pylint: disable=g-import-not-at-top
except ImportError:  # pragma: no cover - depends on the library version.
  jaxkd_sharding = None

NAME = "scaling"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = _common.new_parser(NAME, __doc__)
  parser.add_argument("--devices", type=_common.int_list, default=[1, 2, 4, 8])
  parser.add_argument("--per_device_batch", type=int, default=16)
  parser.add_argument("--teachers", type=int, default=1, help="K.")
  _common.add_dtype_flag(parser)
  _common.add_common_flags(parser)
  return parser.parse_args(argv)


def request_cpu_devices(count: int) -> str:
  """Asks for ``count`` fake CPU devices if no backend has started yet."""
  if cpu.backend_initialized():
    return "backend already initialised: using its devices"
  jax.config.update("jax_num_cpu_devices", count)
  return f"jax_num_cpu_devices={count} (fake CPU devices sharing the cores)"


def _placer(devices: Sequence[Any]):
  """``(state, batch) -> (state, batch)`` on a 1-D data mesh of ``devices``."""
  if jaxkd_sharding is not None:
    mesh = jaxkd_sharding.make_mesh(data=len(devices), teacher=1,
                                    devices=devices)

    def place(state, batch):
      return (jaxkd_sharding.shard_state(state, mesh),
              jaxkd_sharding.shard_batch(batch, mesh))

    return place, "jaxkd.sharding"
  mesh = Mesh(np.asarray(devices), ("data",))
  replicated = NamedSharding(mesh, PartitionSpec())
  split = NamedSharding(mesh, PartitionSpec("data"))

  def place_plain(state, batch):
    return (jax.device_put(state, replicated),
            {k: jax.device_put(v, split) for k, v in batch.items()})

  return place_plain, "NamedSharding"


def main(argv: Sequence[str] | None = None) -> dict:
  args = parse_args(argv)
  device_note = request_cpu_devices(max(args.devices))
  env = _common.environment("benchmarks.scaling", argv)
  env["devices_note"] = device_note
  available = jax.devices()
  counts = [n for n in args.devices if n <= len(available)]
  skipped = [n for n in args.devices if n > len(available)]
  dtype = _common.DTYPES[args.dtype]
  student = models.create(args.student, num_classes=args.num_classes,
                          dtype=dtype)
  tset = _common.make_teachers(
      args.teacher, args.teachers, num_classes=args.num_classes,
      image_size=args.image_size, dtype=dtype,
  )
  programs = {}
  helper = None
  for n in counts:
    place, helper = _placer(available[:n])
    batch = _common.make_batch(n * args.per_device_batch, args.image_size,
                               args.num_classes)
    programs[n] = _common.train_step_setup(
        student, batch, teacher_groups=[tset.group("auto")],
        num_classes=args.num_classes, place=place,
    )
    for _ in range(args.warmup):
      programs[n].run()
    print(f"  compiled for {n} device(s) in {programs[n].compile_s:.1f} s",
          flush=True)
  timings = _common.time_interleaved(
      {n: p.run for n, p in programs.items()},
      steps=args.steps, rounds=args.rounds,
  )
  rows = []
  base = None
  for n in counts:
    sps = timings[n].samples_per_s(n * args.per_device_batch)
    base = sps["median"] if n == 1 else base
    efficiency = None if base is None else sps["median"] / (n * base)
    rows.append({
        "devices": n,
        "global_batch": n * args.per_device_batch,
        "samples_per_s": sps,
        "compile_s": programs[n].compile_s,
        "efficiency": efficiency,
    })
    print(f"  {n} device(s), batch {n * args.per_device_batch}:"
          f" {sps['median']:.1f} samples/s, efficiency"
          f" {'n/a' if efficiency is None else f'{efficiency:.2f}'}",
          flush=True)
  fake = jax.default_backend() == "cpu"
  caveat = (
      "Fake CPU devices share this machine's"
      f" {env['machine']['logical_cores']} cores: the efficiency shows the"
      " cost of partitioning a fixed amount of compute, not scaling."
      if fake else ""
  )
  table = _common.markdown_table(
      ["devices", "global batch", "samples/s median (min-max)",
       "efficiency", "compile s"],
      [
          [r["devices"], r["global_batch"], _common.spread(r["samples_per_s"]),
           "" if r["efficiency"] is None else f"{r['efficiency']:.2f}",
           f"{r['compile_s']:.1f}"]
          for r in rows
      ],
  )
  config = (
      f"Data-parallel distillation step, {args.teacher} -> {args.student}"
      f" (K={args.teachers}, auto), {args.dtype}, {args.per_device_batch}"
      f" examples per device; placement by {helper}; {device_note}."
      + (f" Skipped (not enough devices): {skipped}." if skipped else "")
      + (f" {caveat}" if caveat else "")
  )
  results = {"config": vars(args), "rows": rows, "skipped": skipped,
             "placement": helper, "fake_devices": fake}
  return _common.finish(
      args, name=NAME,
      title=f"Data-parallel scaling: {args.teacher} -> {args.student}",
      env=env, results=results,
      sections=[("", config), ("Scaling", table)],
  )


if __name__ == "__main__":
  main(sys.argv[1:])
