"""A worker for the protocol tests: no JAX, no PyTorch, instant steps.

``python -m tests.worker_stub`` serves ``benchmarks.workers``'s protocol.
``build`` prints to standard output (which must not reach the protocol) and
answers two systems, ``"noop"`` and ``"count"``; ``{"exit": CODE}`` in the
configuration makes the process exit with CODE instead.
"""

from __future__ import annotations

import os

from benchmarks import workers

CALLS = []


def build(config):
  if "exit" in config:
    os._exit(config["exit"])  # pylint: disable=protected-access
  print("a library printing to stdout")
  return {"noop": lambda: None, "count": lambda: CALLS.append(1)}, {
      "counts": [config.get("size", 1), 2], "compile_s": {}}


if __name__ == "__main__":
  workers.serve(build, {**workers.python_info(["numpy"]),
                        "framework": "stub"})
