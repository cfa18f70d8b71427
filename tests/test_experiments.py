"""The experiment CLI: configs, the pipeline's outputs, bad input, resume."""

from __future__ import annotations

import importlib
import json
import pathlib
import shutil
import sys
import warnings

import jax
import numpy as np
import pytest

from experiments import loop
from experiments import main as main_lib
from experiments import methods
from experiments import pipeline
from experiments import stops
from experiments import train
from experiments.configs import common
from jaxkd import checkpoint
from jaxkd import data
from jaxkd import models
from jaxkd import teachers as teachers_lib
from tests import tiny as tiny_lib
from tools import results_readme

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The image-classification configs (lm_* configs run experiments.lm and are
# tested in tests/test_lm_experiment.py).
CONFIGS = sorted(p.stem for p in (ROOT / "experiments" / "configs").glob(
    "*.py") if p.stem not in ("__init__", "common")
    and not p.stem.startswith("lm_"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """Embedded data sets are prepared here once (about a second)."""
  return str(tmp_path_factory.mktemp("tfds"))


def get_config(name: str, arg: str | None = "runlocal"):
  module = importlib.import_module(f"experiments.configs.{name}")
  return module.get_config(arg)


tiny = tiny_lib.shrink_config


# -- Configs ------------------------------------------------------------------


def test_every_config_is_tested():
  assert CONFIGS == [
      "cifar100_resnet32x4_resnet8x4", "cifar100_wrn40_2_wrn16_2",
      "imagenet_resnet34_resnet18", "mnist5k_data_free", "mnist5k_default",
      "mnist_hinton"]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_docstring_has_launch_command_and_runtime(name):
  module = importlib.import_module(f"experiments.configs.{name}")
  doc = module.__doc__
  assert f"--config=experiments/configs/{name}.py" in doc.replace("\\\n", "")
  assert "Expected runtime" in doc
  full, local = module.get_config(), module.get_config("runlocal")
  assert full.name == local.name == name
  assert local.num_epochs < full.num_epochs
  train.validate(full, "pipeline")
  train.validate(full, "compare")


# Teachers too large to train in a unit test are loaded instead (random
# weights, saved with jaxkd.checkpoint); training a teacher in the run is
# tested by mnist_hinton here and by the mnist5k pipeline below.
LOAD_TEACHER = ("cifar100_resnet32x4_resnet8x4", "cifar100_wrn40_2_wrn16_2",
                "imagenet_resnet34_resnet18")


def _save_random_teacher(config, workdir, image_shape, num_classes):
  model = models.create(config.teacher.model, num_classes=num_classes)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1,) + image_shape,
                                               np.float32))
  # Any weights do for a smoke test; zeros cost no compilation.
  params, state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  _, variables = teachers_lib.TeacherGroup.create(model, [params], [state])
  checkpoint.save_teachers(workdir, "random", variables)
  config.teacher.load = "random"


@pytest.mark.parametrize("name", [n for n in CONFIGS if n != "mnist5k_default"])
def test_runlocal_config_trains_on_mock_data(name, tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  config = tiny(get_config(name), "/nonexistent")
  if name.startswith("imagenet"):
    config.image_size = 16
  if name in LOAD_TEACHER:
    spec = data.get_spec(config.dataset)
    size = config.image_size
    shape = (size, size, 3) if size else tuple(spec.image_shape)
    _save_random_teacher(config, tmp_path, shape, spec.num_classes)
  with tfds.testing.mock_data(num_examples=64,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    result = train.train_and_evaluate(config, tmp_path)
  assert result["steps"] == 1 and result["method"] == config.method
  assert 0.0 <= result["last_accuracy"] <= 1.0
  assert result["teachers"][0]["model"] == config.teacher.model
  assert (tmp_path / "seed_0" / config.method / "metrics.jsonl").exists()


def test_parse_arg():
  arg = common.parse_arg("runlocal,seeds=2", runlocal=False, seeds=5)
  assert arg.runlocal is True and arg.seeds == 2
  with pytest.raises(ValueError, match="Unknown config argument 'sede'"):
    common.parse_arg("sede=2", runlocal=False, seeds=5)


# -- The pipeline on the embedded data ---------------------------------------


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, data_dir):
  workdir = tmp_path_factory.mktemp("pipeline")
  results_dir = workdir / "results"
  config = get_config("mnist5k_default")
  config.data_dir = data_dir
  config.progress_bar = False
  config.pipeline.methods = ("kd",)
  config.sweep.temperatures = (2.0, 8.0)
  # Shared by the tests below, so that they reuse its compiled steps.
  context = train.Context.create(config, workdir)
  out = pipeline.run_methods(config, workdir, mode="pipeline",
                             command="python -m experiments.main ...",
                             results_dir=results_dir, context=context)
  return config, workdir, results_dir, out, context


def test_pipeline_writes_the_result_table(pipeline_run):
  config, _, results_dir, out, _ = pipeline_run
  text = (results_dir / "mnist5k_default.md").read_text()
  assert "python -m experiments.main ..." in text
  for header in ("params", "latency", "last epoch", "best epoch", "Versions"):
    assert header in text
  keys = [row["key"] for row in out["rows"]]
  assert keys == ["teacher", "baseline", "kd"]
  for row in out["rows"]:
    assert row["seeds"] == [0, 1]
    assert row["latency"]["median_ms"] > 0
  assert out["rows"][0]["params"] == 2_395_210  # 784-1200-1200-10
  data = json.loads((results_dir / "mnist5k_default.json").read_text())
  assert data["rows"][2]["method"] == "kd"
  assert data["gaps"][0]["method"] == "kd"
  del config


def test_pipeline_run_directories(pipeline_run):
  _, workdir, _, _, _ = pipeline_run
  assert json.loads((workdir / "config.json").read_text())["name"] == (
      "mnist5k_default")
  for seed in (0, 1):
    for run in ("teacher_0", "baseline", "kd"):
      run_dir = workdir / f"seed_{seed}" / run
      saved = json.loads((run_dir / "config.json").read_text())
      assert saved["config"]["pipeline"]["seeds"] == 2
      records = [json.loads(line) for line in
                 (run_dir / "metrics.jsonl").read_text().splitlines()]
      epochs = [r for r in records if r["kind"] == "epoch"]
      assert [r["epoch"] for r in epochs] == list(
          range(1, len(epochs) + 1))
      assert all("test/accuracy" in r for r in epochs)
      assert (run_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"
      assert (run_dir / "checkpoints").is_dir()
  kd = json.loads((workdir / "seed_0" / "kd" / "results.json").read_text())
  assert kd["offline_teacher_logits"] is True
  assert checkpoint.saved_teacher_names(workdir) == [
      "teacher_seed0", "teacher_seed1"]


def test_pipeline_tensorboard_events_parse(pipeline_run):
  event_accumulator = pytest.importorskip(
      "tensorboard.backend.event_processing.event_accumulator")
  _, workdir, _, _, _ = pipeline_run
  logdir = workdir / "seed_0" / "kd" / "tensorboard"
  accumulator = event_accumulator.EventAccumulator(str(logdir))
  accumulator.Reload()
  tags = accumulator.Tags()["scalars"]
  assert "train/loss" in tags and "test/accuracy" in tags
  steps = [e.step for e in accumulator.Scalars("test/accuracy")]
  assert steps == [2, 4]


def test_results_readme_renders_between_markers(pipeline_run, tmp_path):
  _, _, results_dir, _, _ = pipeline_run
  readme = "intro\n<!-- results:start -->\nold\n<!-- results:end -->\nend\n"
  out = results_readme.render(readme, results_dir, root=results_dir.parent)
  assert out.startswith("intro\n<!-- results:start -->\n#### mnist5k_default")
  assert "| student: mlp_300 | kd" in out and out.endswith(
      "<!-- results:end -->\nend\n")
  assert "old" not in out
  # The gaps table and the reading follow the result table.
  assert "| kd | " in out and "Students by last-epoch test accuracy" in out
  assert results_readme.render(out, results_dir, results_dir.parent) == out
  del tmp_path


def test_results_readme_links_are_relative_to_the_readme(tmp_path):
  results_dir = tmp_path / "experiments" / "results"
  results_dir.mkdir(parents=True)
  (results_dir / "a_sweep.md").write_text(
      "# a_sweep\n\n<!-- table:start -->\n| t |\n|---|\n| 1 |\n"
      "<!-- table:end -->\n\n<!-- reading:start -->\n"
      "![plot](a_sweep.png) [web](https://x.org/p) [top](#results)\n"
      "<!-- reading:end -->\n\n- Command: `run`\n")
  text = results_readme.section(results_dir, root=tmp_path)
  assert "![plot](experiments/results/a_sweep.png)" in text
  assert "[web](https://x.org/p)" in text and "[top](#results)" in text
  assert "Command: `run`" in text
  with pytest.raises(ValueError, match="results:start"):
    results_readme.render("no markers", results_dir)


def test_resume_is_exact(pipeline_run, tmp_path):
  """A run resumed from its epoch-1 checkpoint ends where the original did."""
  _, workdir, _, _, ctx = pipeline_run
  original = workdir / "seed_0" / "kd"
  copy = tmp_path / "kd"
  shutil.copytree(original, copy)
  shutil.rmtree(copy / "checkpoints" / "4")  # the last epoch (step 4)
  teachers = train.get_teachers(ctx, 0, 1)  # restored, not retrained
  result, state = train.train_student(ctx, 0, "kd", teachers, run_dir=copy)
  expected = json.loads((original / "results.json").read_text())
  assert result["last_accuracy"] == expected["last_accuracy"]
  assert result["steps"] == 4
  reference = train.train_student(ctx, 0, "kd", teachers,
                                  run_dir=original)[1]
  np.testing.assert_array_equal(
      jax.tree.leaves(state.params)[0], jax.tree.leaves(reference.params)[0])
  def numbers(path):  # the metrics.jsonl records without timings
    return [{k: v for k, v in json.loads(line).items()
             if "time" not in k and "per_s" not in k}
            for line in path.read_text().splitlines()]
  assert numbers(copy / "metrics.jsonl") == numbers(original / "metrics.jsonl")


def test_sweep_trains_one_student_per_temperature(pipeline_run, tmp_path):
  config, workdir, _, _, context = pipeline_run
  out = pipeline.run_sweep(config, workdir, command="sweep",
                           results_dir=tmp_path / "results", context=context)
  assert [r["temperature"] for r in out["rows"]] == [2.0, 8.0]
  assert (tmp_path / "results" / "mnist5k_default_sweep.png").read_bytes()[
      :4] == b"\x89PNG"
  text = (tmp_path / "results" / "mnist5k_default_sweep.md").read_text()
  assert "| 8 |" in text
  epochs = [json.loads(line) for line in (
      workdir / "seed_0" / "sweep_kd" / "metrics.jsonl").read_text(
          ).splitlines() if '"epoch"' in line]
  assert "test/accuracy[T=2]" in epochs[-1]


# -- Bad input -----------------------------------------------------------------


def _compiles(monkeypatch):
  """Makes any XLA compilation fail the test."""
  from jax._src import compiler  # pylint: disable=g-import-not-at-top

  def fail(*args, **kwargs):
    del args, kwargs
    raise AssertionError("compiled before the bad input was reported")
  # Every jit (and every eager op's first call) compiles through here.
  monkeypatch.setattr(compiler, "backend_compile_and_load", fail)


@pytest.mark.parametrize("key,value,match", [
    ("dataset", "cifar1000", "Unknown data set 'cifar1000'"),
    ("train_split", "trian", "Unknown split 'trian'"),
    ("method", "kd2", "Unknown method 'kd2'. Known methods: baseline, kd"),
    ("student.model", "resnet9", "Unknown model name 'resnet9'"),
    ("nonfinite", "ignore", "`nonfinite` must be one of"),
    ("optimizer.name", "rmsprop", "`optimizer.name` must be one of"),
    ("image_size", 64, "`image_size` resizes only"),
])
def test_bad_input_is_reported_before_compiling(key, value, match, data_dir,
                                                 tmp_path, monkeypatch):
  config = tiny(get_config("mnist5k_default"), data_dir, **{key: value})
  _compiles(monkeypatch)
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(config, tmp_path)


def test_unknown_config_key_is_an_error():
  config = get_config("mnist5k_default")
  config.lock()
  with pytest.raises(AttributeError, match="temprature"):
    config.kd.temprature = 2.0


def _parse_command_line(flag_values, argv, monkeypatch):
  # Config overrides are read from sys.argv by ml_collections.
  monkeypatch.setattr(sys, "argv", argv)
  with warnings.catch_warnings():
    # ml_collections loads config files with a deprecated importlib call.
    warnings.simplefilter("ignore", DeprecationWarning)
    flag_values(argv)


def test_unknown_key_on_the_command_line(monkeypatch):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  def parse(*overrides):
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=flag_values,
                                    lock_config=True)
    _parse_command_line(flag_values, [
        "main", "--config=experiments/configs/mnist5k_default.py:runlocal",
        *overrides], monkeypatch)
    return flag_values.config

  message = 'Did you mean "temperature" instead of "temprature"'
  with pytest.raises(AttributeError, match=message):
    parse("--config.kd.temprature=2")
  config = parse("--config.kd.temperature=2")
  assert config.kd.temperature == 2.0
  assert config.num_epochs == 2  # runlocal


def test_main_trains_one_student(data_dir, tmp_path, capsys, monkeypatch):
  from absl import flags  # pylint: disable=g-import-not-at-top

  argv = ["main", "--config=experiments/configs/mnist5k_default.py:runlocal",
          f"--workdir={tmp_path}", "--mode=train",
          "--config.method=self_distillation", f"--config.data_dir={data_dir}",
          "--config.progress_bar=False", "--config.data_parallel=False",
          "--config.steps_per_epoch=1", "--config.num_epochs=1"]
  try:
    _parse_command_line(flags.FLAGS, argv, monkeypatch)
    main_lib.main(["main"])
  finally:
    flags.FLAGS.unparse_flags()
  assert "'method': 'self_distillation'" in capsys.readouterr().out
  result = json.loads((tmp_path / "results.json").read_text())
  assert result["teachers"] == [] and result["steps"] == 1


def test_images_the_model_does_not_take(data_dir, tmp_path, monkeypatch):
  """Teachers saved for 8x8 digits, loaded for 28x28 MNIST."""
  model = models.create("hinton_teacher", num_classes=10)
  params, state = model.init(jax.random.key(0), np.zeros((1, 8, 8, 1)))
  _, variables = teachers_lib.TeacherGroup.create(model, [params], [state])
  checkpoint.save_teachers(tmp_path, "digits_teacher", variables)
  config = tiny(get_config("mnist5k_default"), data_dir,
                **{"teacher.load": "digits_teacher"})
  _compiles(monkeypatch)
  with pytest.raises(ValueError, match=r"does not take images of shape"
                     r" \(28, 28, 1\)"):
    train.train_and_evaluate(config, tmp_path)


def test_nonfinite_loss_stops_naming_the_step(data_dir, tmp_path):
  config = tiny(get_config("mnist5k_default"), data_dir, method="baseline",
                num_epochs=2, steps_per_epoch=3,
                **{"optimizer.learning_rate": 1e30})
  config.optimizer.name = "sgd"
  with pytest.raises(loop.NonFiniteLossError,
                     match=r"step \d+ \(epoch \d+, batch \d+ of 3\) was not"
                     r" applied: the loss or a gradient is not finite"):
    train.train_and_evaluate(config, tmp_path)


def test_a_stop_names_the_bad_field_or_hyper_parameter():
  run = loop.Loop(name="run", run_dir=pathlib.Path("."), step=None,
                  batches=None, evaluate=None, num_epochs=1, batch_size=1,
                  finite=None)
  message = stops.failure_message(
      run, {"loss": np.nan, "bad/label": 1, "bad/image": 0, "nonfinite": 1},
      7, 5)
  assert message.startswith("run: step 7 (epoch 2, batch 3 of 5) was not")
  assert "the batch's label holds bad values" in message
  message = stops.failure_message(
      run, {"loss": np.nan, "invalid/kd.temperature": 1}, 0, 5)
  assert "hyper-parameter kd.temperature had an invalid value" in message


def test_nonfinite_steps_can_be_skipped(data_dir, tmp_path):
  config = tiny(get_config("mnist5k_default"), data_dir, method="baseline",
                num_epochs=2, steps_per_epoch=3, nonfinite="skip",
                **{"optimizer.learning_rate": 1e30})
  config.optimizer.name = "sgd"
  result = train.train_and_evaluate(config, tmp_path)
  assert result["steps"] == 6 and result["skipped_steps"] > 0


# Every method of the experiment CLI runs through the plumbing (teachers,
# objective, cached logits, data-free generator) on the embedded digits.
# Attention transfer needs spatial feature maps, which the MLPs lack: it runs
# on the CIFAR configs' small convolutional models.
_MLP_METHODS = [m for m in methods.METHODS if m != "at"]


@pytest.mark.parametrize("method", _MLP_METHODS)
def test_every_method_trains_one_step(method, data_dir, tmp_path):
  config = tiny(get_config("mnist5k_default"), data_dir, method=method)
  if method == "multi_teacher":
    config.multi_teacher.num_teachers = 2
  result = train.train_and_evaluate(config, tmp_path)
  assert result["method"] == method and result["steps"] >= 1
  assert 0.0 <= result["last_accuracy"] <= 1.0
  expected = {"multi_teacher": 2}.get(
      method, int(methods.needs_teacher(method, config)))
  assert len(result["teachers"]) == expected


def test_attention_transfer_trains_one_step(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  config = tiny(get_config("cifar100_resnet32x4_resnet8x4"), "/nonexistent",
                method="at")
  spec = data.get_spec(config.dataset)
  _save_random_teacher(config, tmp_path, tuple(spec.image_shape),
                       spec.num_classes)
  with tfds.testing.mock_data(num_examples=64,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    result = train.train_and_evaluate(config, tmp_path)
  assert result["method"] == "at" and result["steps"] == 1


def _cli(*args, timeout=300):
  import subprocess  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(__file__).resolve().parent.parent
  return subprocess.run(
      [sys.executable, "-m", "experiments.main", *args], cwd=root,
      capture_output=True, text=True, timeout=timeout)


def test_cli_mistyped_field_is_one_line_and_list_config_lists_fields(tmp_path):
  config = "--config=experiments/configs/mnist5k_default.py"
  bad = _cli(config, "--config.kd.temprature=2", f"--workdir={tmp_path}")
  assert bad.returncode == 2
  lines = [l for l in bad.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, bad.stderr
  assert "--config.kd.temprature" in lines[0]
  assert 'Did you mean "temperature"' in lines[0]
  listed = _cli(config, "--list_config")
  assert listed.returncode == 0, listed.stderr
  assert "--config.kd.temperature=16.0" in listed.stdout.splitlines()
  assert not any(tmp_path.iterdir())  # Nothing was written.


def test_cli_refuses_to_publish_a_runlocal_run(tmp_path):
  out = _cli("--config=experiments/configs/mnist5k_default.py:runlocal",
             "--mode=pipeline", f"--workdir={tmp_path}", "--publish")
  assert out.returncode != 0
  assert "never published" in out.stderr + out.stdout


def test_evaluate_teachers_gives_each_teachers_test_accuracy(data_dir,
                                                             tmp_path):
  # Teacher i always predicts class c_i (a large classifier bias), so its
  # accuracy is the share of test labels equal to c_i, known by hand.
  config = tiny(get_config("mnist5k_default"), data_dir,
                test_split="test[:20]")
  ctx = train.Context.create(config, tmp_path)
  model = ctx.model(config.teacher.model)
  params, state = model.init(jax.random.key(0), np.zeros((1, 28, 28, 1)))
  classes = (3, 7)
  stacked = []
  for c in classes:
    bias = np.zeros(10, np.float32)
    bias[c] = 1e4
    stacked.append({**params, "classifier": {**params["classifier"],
                                             "bias": bias}})
  _, variables = teachers_lib.TeacherGroup.create(model, stacked,
                                                  [state] * len(classes))
  accuracies = train.evaluate_teachers(
      ctx, ctx.group(config.teacher.model), variables)
  labels = np.concatenate([b["label"][b["mask"]]
                           for b in ctx.data.eval_batches()])
  assert len(labels) == 20  # Two full batches of 8 and a padded one.
  np.testing.assert_allclose(accuracies, [np.mean(labels == c)
                                          for c in classes])
