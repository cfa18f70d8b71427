"""The README's distillation example runs as written."""

import pathlib
import re

import jax

import numpy as np

from tests import tiny

README = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()


def run_example(batches, workdir):
  code = re.search(
      r"<!-- example:distill:start -->\n```python\n(.*?)```", README, re.S
  ).group(1)
  namespace = {"batches": batches, "workdir": workdir}
  exec(compile(code, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  return namespace


def test_distillation_example_runs_on_8_devices_and_resumes(tmp_path):
  batches = tiny.digit_batches(32, 6, seed=4)
  first = run_example(batches[:3], tmp_path)
  # Run again with all six batches: it restores step 3 and goes on.
  namespace = run_example(batches, tmp_path)
  state, metrics = namespace["state"], namespace["metrics"]
  assert int(first["state"].step) == 3
  assert int(state.step) == len(batches)
  assert len(jax.devices()) == 8
  assert int(metrics["nonfinite"]) == 0
  assert np.isfinite(float(metrics["loss"]))
  # Only the student and the adaptor are trained.
  assert set(state.params) == {"student", "terms"}
  assert set(state.params["terms"]["feature"]) == {"dense"}
