"""The jaxkd side of ``benchmarks.torch_reference``: a worker process.

  python -m benchmarks.jax_worker

Serves the JSON-line protocol of ``benchmarks/workers.py`` on whichever
interpreter runs it (the benchmark's own stack, or the oldest supported
one). ``build`` compiles the jaxkd steps of one configuration and runs
their warm-up steps; its systems are

* ``"jaxkd online"``: the distillation step with the teacher as trained;
* ``"jaxkd online, folded teacher"`` (``"fold": true``): the teacher's
  BatchNorm folded into its convolutions;
* ``"jaxkd offline"`` (``"offline": true``): the student step with the
  teacher's logits cached in the batch (``cache_teacher_outputs``).
"""

from __future__ import annotations

from typing import Any

from benchmarks import _common  # Sets the XLA:CPU defaults before JAX runs.
from benchmarks import workers

import jax  # pylint: disable=g-bad-import-order
from jaxkd import models  # pylint: disable=g-bad-import-order

__all__ = ["build", "main"]


def _count(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))


def build(config: dict[str, Any]):
  """The ``build`` request: the configuration's compiled steps, warmed up."""
  num_classes, image_size = config["num_classes"], config["image_size"]
  dtype = _common.DTYPES[config["dtype"]]
  teacher_name = config["teacher"]
  student = models.create(config["student"], num_classes=num_classes,
                          dtype=dtype)
  batch = _common.make_batch(config["batch_size"], image_size, num_classes)
  setups = {}
  plain = _common.make_teachers(teacher_name, 1, num_classes=num_classes,
                                image_size=image_size, dtype=dtype)
  setups["jaxkd online"] = _common.train_step_setup(
      student, batch, teacher_groups=[plain.group("auto")],
      num_classes=num_classes)
  if config["fold"]:
    folded = _common.make_teachers(teacher_name, 1, num_classes=num_classes,
                                   image_size=image_size, dtype=dtype,
                                   fold=True)
    setups["jaxkd online, folded teacher"] = _common.train_step_setup(
        student, batch, teacher_groups=[folded.group("auto")],
        num_classes=num_classes)
  if config["offline"]:
    setups["jaxkd offline"] = _common.train_step_setup(
        student, batch, offline_k=1, num_classes=num_classes)
  for setup in setups.values():  # Compiled already: caches and pools.
    for _ in range(config["warmup"]):
      setup.run()
  student_params = jax.eval_shape(
      student.init, jax.random.key(0), batch["image"])[0]
  return {name: s.run for name, s in setups.items()}, {
      "counts": (_count(plain.params[0]), _count(student_params)),
      "compile_s": {name: s.compile_s for name, s in setups.items()},
  }


def main() -> None:
  info = workers.python_info(["jax", "jaxlib", "flax", "optax", "numpy"])
  info["framework"] = "jaxkd"
  info["backend"] = jax.default_backend()
  workers.serve(build, info)


if __name__ == "__main__":
  main()
