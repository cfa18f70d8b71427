"""The data-free experiment: variants, the LeNet-5 teacher, what it records."""

from __future__ import annotations

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import input_pipeline
from experiments import methods
from experiments import pipeline
from experiments import train
from experiments.configs import mnist5k_data_free
from jaxkd import models
from jaxkd.methods import data_free
from tests import test_experiments


@pytest.fixture(scope="module", autouse=True)
def fast_compile():
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


def tiny_config(data_dir):
  config = mnist5k_data_free.get_config("runlocal")
  return test_experiments.tiny(config, data_dir)


# -- Variants -----------------------------------------------------------------


def test_a_variant_changes_only_its_fields():
  config = mnist5k_data_free.get_config()
  base = methods.method_config(config, "data_free")
  variant = methods.method_config(config, "data_free:deep_inversion")
  assert base.bn_weight == 0.0 and variant.bn_weight == 1.0
  assert variant.entropy_weight == 0.0 and base.entropy_weight == 5.0
  overrides = config.variants.data_free.deep_inversion
  assert {k for k in base if base[k] != variant[k]} == {
      k for k in overrides if base[k] != overrides[k]}
  assert all(variant[k] == overrides[k] for k in overrides)
  assert methods.method_config(
      config, "data_free:deep_inversion_dafl").entropy_weight == 5.0
  plan = methods.build("data_free:deep_inversion", config, steps_per_epoch=1)
  assert plan.data_free and plan.settings.bn_weight == 1.0
  # The sub-config itself is untouched.
  assert config.data_free.bn_weight == 0.0


def test_bad_variants_are_named():
  config = mnist5k_data_free.get_config()
  with pytest.raises(ValueError, match="Unknown variant 'nope' of method"
                     " 'data_free'.*deep_inversion, deep_inversion_dafl"):
    methods.build("data_free:nope", config, steps_per_epoch=1)
  with pytest.raises(ValueError, match="Unknown method 'dafl'"):
    methods.build("dafl:x", config, steps_per_epoch=1)
  config.variants.data_free.bad = {"bn_wieght": 1.0}
  with pytest.raises(ValueError, match=r"variants.data_free.bad.bn_wieght:"
                     " 'data_free' has no field 'bn_wieght'"):
    methods.build("data_free:bad", config, steps_per_epoch=1)


# -- LeNet-5 ----------------------------------------------------------------


def test_lenet5_sees_28_and_32_pixel_digits_alike():
  model = models.create("lenet5", num_classes=10)
  for side in (28, 32):
    x = jnp.zeros((2, side, side, 1))
    params, state = jax.eval_shape(model.init, jax.random.key(0), x)
    # 156 + 2416 + 48120 (convolutions) + 2 * (6 + 16 + 120) (BatchNorm)
    # + 10164 + 850 (dense layers).
    assert sum(p.size for p in jax.tree.leaves(params)) == 61_990
    logits, features, _ = jax.eval_shape(
        lambda p, s, x=x: model.apply(p, s, x, train=False, rng=None),
        params, state)
    assert logits.shape == (2, 10)
    assert features["stage2"].shape == (2, 5, 5, 16)
    assert features["embedding"].shape == (2, 84)
  with pytest.raises(ValueError, match="28x28 or 32x32"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 30, 30, 1)))


def test_every_lenet5_batchnorm_is_recorded_for_deep_inversion():
  model = models.create("lenet5", num_classes=10)
  x = jnp.ones((4, 28, 28, 1))
  params, state = model.init(jax.random.key(0), x)
  _, records = data_free.record_batchnorm(
      model.apply, params, state, x, train=False, rng=None)
  assert [r.path for r in records] == ["bn1", "bn2", "bn3"]
  assert [r.inputs.shape[-1] for r in records] == [6, 16, 120]


# -- The generator ------------------------------------------------------------


def test_normalized_generator_output_is_standardised_per_batch():
  gen = data_free.Generator(image_shape=(28, 28, 1), width=16,
                            output="normalized", upsamplings=2)
  noise = jax.random.normal(jax.random.key(0), (64, 8))
  variables = gen.init(jax.random.key(1), noise, train=False)
  images, _ = gen.apply(variables, noise, train=True,
                        mutable=["batch_stats"])
  assert images.shape == (64, 28, 28, 1)
  images = np.asarray(images, np.float64)
  np.testing.assert_allclose(images.mean(), 0.0, atol=1e-5)
  np.testing.assert_allclose(images.var(), 1.0, rtol=1e-3)
  # DAFL's layout: dense to 7x7, two upsampling stages, the last at half
  # width; a BatchNorm without scale or bias at the end.
  params = variables["params"]
  assert params["Dense_0"]["kernel"].shape == (8, 7 * 7 * 16)
  assert params["Conv_1"]["kernel"].shape == (3, 3, 16, 8)
  assert "BatchNorm_3" not in params
  assert variables["batch_stats"]["BatchNorm_3"]["mean"].shape == (1,)
  with pytest.raises(ValueError, match="`upsamplings` must be an int >= 1"):
    data_free.Generator(image_shape=(28, 28, 1), upsamplings=0).init(
        jax.random.key(0), noise, train=False)


def test_the_teachers_view_of_a_batch_against_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 6, 4)) * 3
  # pylint: disable-next=protected-access
  view = data_free._teacher_view(jnp.asarray(logits, jnp.float32))
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  ensemble = probs.mean(0)  # [B, C]
  mean = ensemble.mean(0)
  np.testing.assert_allclose(
      view["teacher/class_balance"],
      -np.sum(mean * np.log(mean)) / np.log(4), rtol=1e-5)
  np.testing.assert_allclose(view["teacher/confidence"],
                             ensemble.max(-1).mean(), rtol=1e-5)
  assert int(view["teacher/classes_seen"]) == len(set(ensemble.argmax(-1)))


# -- The run ------------------------------------------------------------------


def test_data_free_students_never_read_the_training_split(tmp_path,
                                                          monkeypatch):
  config = tiny_config(str(tmp_path / "tfds"))
  config.data_free.batch_size = 8
  config.data_free.steps_per_epoch = 1
  ctx = train.Context.create(config, tmp_path / "run")
  teachers = train.get_teachers(ctx, 0, 1)
  train_split = ctx.data.train_split
  real_load = input_pipeline._load_split  # pylint: disable=protected-access

  def refuse(*args, **kwargs):
    raise AssertionError("a data-free student read the training split")

  def load(spec, split, data_dir):
    if split == train_split:
      refuse()
    return real_load(spec, split, data_dir)

  monkeypatch.setattr(input_pipeline, "_load_split", load)
  monkeypatch.setattr(ctx.data, "train_iterator", refuse)
  monkeypatch.setattr(ctx.data, "train_arrays", refuse)
  for method in config.pipeline.methods:
    result, _ = train.train_student(ctx, 0, method, teachers)
    assert result["method"] == method and result["steps"] == 1
    generated = result["generated"]
    assert sum(generated["class_histogram"]) == generated["images"]
    assert 0.0 <= generated["class_balance"] <= 1.0
    assert (tmp_path / "run" / "seed_0" / method / "samples.png").exists()
  # The guard is live: the real-data baseline trips it.
  with pytest.raises(AssertionError, match="read the training split"):
    train.train_student(ctx, 0, "baseline", None)


def test_the_results_show_what_each_generator_made(tmp_path):
  grid = np.zeros((10, 2, 28, 28, 1), np.float32)
  summaries = [
      {"images": 100, "class_histogram": [10] * 10, "class_balance": 1.0,
       "teacher_confidence": 0.75, "pixel_mean": 0.1},
      {"images": 100, "class_histogram": [100] + [0] * 9,
       "class_balance": 0.0, "teacher_confidence": 0.25, "pixel_mean": 0.1},
  ]
  run_dir = tmp_path / "work" / "seed_0" / "data_free"
  run_dir.mkdir(parents=True)
  np.save(run_dir / "samples.npy", grid)
  (run_dir / "results.json").write_text(
      json.dumps({"generated": summaries[0]}))
  ctx = types.SimpleNamespace(workdir=tmp_path / "work")
  runs = {"baseline": [{}], "data_free": [{"generated": s} for s in summaries],
          "kd": [{}]}
  # pylint: disable-next=protected-access
  text = pipeline._data_free_samples(ctx, ["baseline", "data_free", "kd"],
                                     runs, "name", tmp_path / "results")
  # Mean ± sample std over the two seeds; the histogram of seed 0.
  assert "| data_free | 0.500 ± 0.707 | 0.500 ± 0.354 |" \
      " 10 10 10 10 10 10 10 10 10 10 |" in text
  assert "baseline" not in text.split("|---|")[1]
  assert "![Generated images by the teacher's class](name_samples.png)" in text
  for folder in ("work", "results"):
    assert (tmp_path / folder / "name_samples.png").stat().st_size > 0
  assert pipeline._data_free_samples(  # pylint: disable=protected-access
      ctx, ["baseline"], runs, "name", None) == ""
