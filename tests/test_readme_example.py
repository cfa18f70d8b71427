"""The README's distillation example runs as written."""

import pathlib
import re

import numpy as np

from tests import tiny

README = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_distillation_example_runs_and_learns():
  code = re.search(
      r"<!-- example:distill:start -->\n```python\n(.*?)```", README, re.S
  ).group(1)
  batches = tiny.digit_batches(32, 6, seed=4)
  namespace = {"batches": batches}
  exec(compile(code, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  state, metrics = namespace["state"], namespace["metrics"]
  assert int(state.step) == len(batches)
  assert int(metrics["nonfinite"]) == 0
  assert np.isfinite(float(metrics["loss"]))
  # Only the student and the adaptor are trained.
  assert set(state.params) == {"student", "terms"}
  assert set(state.params["terms"]["feature"]) == {"dense"}
