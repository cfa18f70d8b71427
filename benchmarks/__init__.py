"""Benchmarks of jaxkd: one command each, results in ``benchmarks/results/``.

* ``python -m benchmarks.throughput``: samples/s of the student step, the
  teacher forward pass and the distillation step (K teachers, every
  strategy, online and offline), compile time and memory;
* ``python -m benchmarks.torch_reference``: the same distillation step in
  jaxkd and in plain PyTorch, side by side (worker processes: PyTorch on a
  Python 3.11 with ``torch==2.13.0``, jaxkd on one or two stacks);
* ``python -m benchmarks.flops``: achieved FLOP/s against the device's
  measured matrix-product ceiling;
* ``python -m benchmarks.scaling``: the data-parallel step over 1, 2, 4 and
  8 devices.

Each writes ``benchmarks/results/<name>.json`` and ``<name>.md`` (a table
with the machine, the device, the versions, the command and the date);
``python -m tools.bench_readme --write`` copies the tables into the README.
"""
