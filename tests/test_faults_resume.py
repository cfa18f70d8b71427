"""A resumed experiment knows what it resumes: its config is checked."""

from __future__ import annotations

import importlib
import json

import pytest

from experiments import train
from jaxkd import checkpoint
from tests import tiny


def tiny_config(data_dir, **overrides):
  """mnist5k :runlocal, baseline (no teacher), one step per epoch."""
  config = importlib.import_module(
      "experiments.configs.mnist5k_default").get_config("runlocal")
  return tiny.shrink_config(config, data_dir,
                            **{"method": "baseline", **overrides})


@pytest.mark.fault
def test_a_changed_config_is_refused_unless_allowed(tmp_path):
  data_dir = tmp_path / "data"
  workdir = tmp_path / "run"
  assert train.train_and_evaluate(tiny_config(data_dir), workdir)[
      "steps"] == 1
  ckpt_dir = workdir / "seed_0" / "baseline" / "checkpoints"
  assert (ckpt_dir / "config.json").exists()
  with pytest.raises(checkpoint.ConfigMismatchError,
                     match=r"Changed: optimizer\.learning_rate: 0\.001 ->"
                           r" 0\.002\. Resume with the saved config"):
    train.train_and_evaluate(
        tiny_config(data_dir, **{"optimizer.learning_rate": 2e-3}), workdir)
  # Training longer (and logging differently) is a legitimate change.
  result = train.train_and_evaluate(
      tiny_config(data_dir, num_epochs=2, log_every_steps=3), workdir)
  assert result["steps"] == 2
  # Any change, when asked for, is recorded.
  result = train.train_and_evaluate(
      tiny_config(data_dir, num_epochs=3, allow_config_change=True,
                  **{"optimizer.learning_rate": 2e-3}), workdir)
  assert result["steps"] == 3
  events = [json.loads(line) for line in
            (ckpt_dir / "config_history.jsonl").read_text().splitlines()]
  assert [(e["event"], e.get("forced"), e["step"]) for e in events] == [
      ("start", None, None), ("change", False, 1), ("change", True, 2)]
  assert events[2]["changes"]["optimizer.learning_rate"] == {
      "old": 1e-3, "new": 2e-3}
  assert json.loads((ckpt_dir / "config.json").read_text())["optimizer"][
      "learning_rate"] == 1e-3
