"""The PyTorch side of ``benchmarks.torch_reference``: a worker process.

  python3.11 -m benchmarks.torch_worker [--threads N]

Serves the JSON-line protocol of ``benchmarks/workers.py``. ``build`` makes
the PyTorch eager distillation step of one configuration (systems
``"PyTorch online"`` and, with ``"offline": true``, ``"PyTorch offline"``)
and runs its warm-up steps; ``profile`` (for ``benchmarks.profile``) records
a few steps under ``torch.profiler`` and adds up the self CPU time per kind
of ATen operator. Imports PyTorch and no JAX, so it runs on an interpreter
that has only PyTorch (the CPU wheel ``torch==2.13.0`` exists for Python
3.11 only).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any, Callable, Sequence

from benchmarks import workers

__all__ = ["CATEGORIES", "OUTSIDE_ATEN", "build", "category", "main",
           "profile", "step_setup"]

# Kinds of ATen operator: (row, substrings of the operator's name).
CATEGORIES = (
    ("convolution forward and backward", ("conv",)),
    ("BatchNorm forward and backward", ("batch_norm",)),
    ("ReLU forward and backward", ("relu", "threshold")),
    ("copies and layout", ("copy", "contiguous", "clone", "reorder",
                           "to_dense", "permute", "transpose")),
    ("optimiser", ("foreach", "sgd", "optimizer")),
    ("linear layer", ("addmm", "linear", "matmul", "::mm")),
)
OTHER = "loss, autograd and the rest"
OUTSIDE_ATEN = "outside ATen operators (Python, autograd engine)"


def step_setup(
    teacher_name: str,
    student_name: str,
    *,
    batch_size: int,
    dtype: str,
    image_size: int,
    num_classes: int,
    offline: bool,
    recipe: dict[str, float],
) -> tuple[Callable[[], float], tuple[int, int]]:
  """A blocking PyTorch step closure and the (teacher, student) sizes.

  Written the way torchdistill and mdistiller write it: the teacher in
  ``eval()`` under ``torch.no_grad()``, the student in ``train()``, loss
  ``label_weight * CE + kd_weight * T^2 KL``, SGD with momentum and weight
  decay, NCHW. ``dtype="bfloat16"`` is ``torch.autocast`` around both
  forward passes (the loss in float32). ``offline`` replaces the teacher by
  precomputed logits. ``recipe`` has ``learning_rate``, ``momentum``,
  ``weight_decay``, ``label_weight``, ``kd_weight`` and ``temperature``.
  """
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  from benchmarks import torch_models  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  student = torch_models.create(student_name, num_classes=num_classes)
  teacher = torch_models.create(teacher_name, num_classes=num_classes)
  student.train()
  teacher.eval()
  for p in teacher.parameters():
    p.requires_grad_(False)
  optimizer = torch.optim.SGD(
      student.parameters(), lr=recipe["learning_rate"],
      momentum=recipe["momentum"], weight_decay=recipe["weight_decay"],
  )
  generator = torch.Generator().manual_seed(0)
  images = torch.randn(batch_size, 3, image_size, image_size,
                       generator=generator)
  labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
  cached = torch.randn(batch_size, num_classes, generator=generator)
  bf16 = dtype == "bfloat16"
  temperature = recipe["temperature"]

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
    loss = (recipe["label_weight"] * F.cross_entropy(logits, labels)
            + recipe["kd_weight"] * kd)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()

  counts = (torch_models.num_parameters(teacher),
            torch_models.num_parameters(student))
  return step, counts


def category(op_name: str) -> str:
  """The row of :data:`CATEGORIES` an ATen operator belongs to."""
  name = op_name.lower()
  for row, keys in CATEGORIES:
    if any(k in name for k in keys):
      return row
  return OTHER


def profile(step: Callable[[], Any], *, steps: int,
            warmup: int) -> dict[str, Any]:
  """Self CPU ms per step and kind of operator of one PyTorch step.

  Operators run on the calling thread with intra-op parallelism inside, so
  these are wall milliseconds; what they leave of the wall time (median of
  ``steps`` calls timed without the profiler) is Python and autograd.
  """
  import torch  # pylint: disable=g-import-not-at-top

  for _ in range(warmup):
    step()
  wall_ms = 1e3 * statistics.median(workers.time_steps(step, steps))
  with torch.profiler.profile(
      activities=[torch.profiler.ProfilerActivity.CPU]) as recorded:
    for _ in range(steps):
      step()
  per_category = {row: 0.0 for row, _ in CATEGORIES}
  per_category[OTHER] = 0.0
  per_op = {}
  for event in recorded.key_averages():
    ms = event.self_cpu_time_total / 1e3 / steps
    per_category[category(event.key)] += ms
    per_op[event.key] = ms
  per_category[OUTSIDE_ATEN] = max(wall_ms - sum(per_category.values()), 0.0)
  costliest = sorted(per_op.items(), key=lambda kv: -kv[1])[:8]
  return {"wall_ms": wall_ms, "ms": per_category,
          "costliest": [{"op": k, "ms": v} for k, v in costliest]}


def build(config: dict[str, Any]):
  """The ``build`` request: the configuration's steps, warmed up."""
  steps = {}
  counts = None
  for offline in (False, True) if config["offline"] else (False,):
    step, counts = step_setup(
        config["teacher"], config["student"],
        batch_size=config["batch_size"], dtype=config["dtype"],
        image_size=config["image_size"], num_classes=config["num_classes"],
        offline=offline, recipe=config["recipe"],
    )
    steps["PyTorch offline" if offline else "PyTorch online"] = step
  for step in steps.values():
    for _ in range(config["warmup"]):
      step()
  return steps, {"counts": counts, "compile_s": {}}


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.torch_worker")
  parser.add_argument("--threads", type=int, default=None,
                      help="torch.set_num_threads (default: PyTorch's).")
  args = parser.parse_args(argv)
  import torch  # pylint: disable=g-import-not-at-top

  if args.threads:
    torch.set_num_threads(args.threads)
  info = workers.python_info(["torch", "numpy"])
  info["threads"] = torch.get_num_threads()
  from benchmarks import torch_models  # pylint: disable=g-import-not-at-top

  info["models"] = sorted(torch_models.DEPTHS_AND_WIDTHS)
  info["framework"] = "PyTorch"
  workers.serve(build, info, profile)


if __name__ == "__main__":
  main(sys.argv[1:])
