"""Which strategy runs the K teachers of a group: the ``"auto"`` choice.

Private module of :mod:`jaxkd.teachers`.
"""

from __future__ import annotations

from typing import Any

import jax

STRATEGIES = ("auto", "vmap", "scan", "unroll")

# The strategy "auto" picks, by `jax.default_backend()`. Measured on XLA:CPU
# (jaxlib 0.10.2, a shared and noisy 2-core machine, resnet32x4 teachers,
# batch 64, benchmarks/throughput.py): "vmap" ran 2.3-3x slower than "scan"
# and "unroll" at K = 2, 4 and 8, because a vmapped convolution becomes a
# grouped convolution, which XLA:CPU executes far less efficiently than K
# ordinary ones (jaxlib 0.12, idle machine, 2026-12-03: the vmap step's
# overhead over its parts 1.43-2.23 at K = 2-8, scan's 0.96-1.04; the K = 8
# step compiled in 6.4 s with scan, 12.1 s unrolled). "scan" and "unroll" ran at the same speed (K = 4 forward:
# 10.2 s and 10.4 s for 4 x 64 images), but "scan" compiled 3x faster (2.3 s
# against 7.3 s at K = 4; 7.9 s against 27.9 s for the K = 8 distillation
# step) and keeps one teacher's activations alive at a time (about 600 MiB
# less resident memory at K = 4), so it is the CPU default. The GPU and TPU
# entries are not measured yet: accelerators are expected to prefer the
# batched program.
_AUTO_STRATEGY = {"cpu": "scan", "gpu": "vmap", "tpu": "vmap"}
# For a backend missing from the table.
_AUTO_FALLBACK = "vmap"


def check_strategy(strategy: Any) -> None:
  if strategy not in STRATEGIES:
    raise ValueError(
        f"`strategy` must be one of {', '.join(map(repr, STRATEGIES))}; got"
        f" {strategy!r}."
    )


def resolve_strategy(strategy: str) -> str:
  check_strategy(strategy)
  if strategy == "auto":
    return _AUTO_STRATEGY.get(jax.default_backend(), _AUTO_FALLBACK)
  return strategy
