"""Tests of the bundled models (``jaxkd.models``).

Every model is traced once with ``jax.eval_shape`` (no compilation) for its
parameter count, its output and feature shapes and its dtypes; only the
smallest ones (resnet8, the MLPs, vit_tiny) are actually run, on two images.

Parameter counts are checked against counts derived in this file, layer by
layer, from the PyTorch reference definitions (RepDistiller's
``models/*.py``): ``conv`` counts ``out * in / groups * k * k`` weights (plus
``out`` for a bias), a BatchNorm ``2 * channels`` trainable parameters (the
running statistics are not parameters), a Linear ``in * out + out``. Two
published totals are checked verbatim (resnet8x4: 1,233,540 and resnet32x4:
7,433,860 with 100 classes); the derived totals also round to the figures
quoted in KD benchmark tables (resnet56 0.86M, resnet110 1.74M, wrn_40_2
2.26M, vgg13 9.46M, vgg8 3.96M, mobile_half 0.81M, ShuffleV2 1.35M).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import models
from jaxkd.models import _layers
from jaxkd.models import _shufflenetv2
from tests import helpers

NUM_CLASSES = 100

# ------------------------------------------- counts from the references.


def conv(cin, cout, k, groups=1, bias=False):
  return cout * (cin // groups) * k * k + (cout if bias else 0)


def bn(c):
  return 2 * c


def linear(cin, cout):
  return cin * cout + cout


def resnet_count(depth, widths, classes):
  n = (depth - 2) // 6
  total = conv(3, widths[0], 3) + bn(widths[0])
  cin = widths[0]
  for width, stride in zip(widths[1:], (1, 2, 2)):
    for block in range(n):
      s = stride if block == 0 else 1
      total += conv(cin, width, 3) + bn(width) + conv(width, width, 3)
      total += bn(width)
      if s != 1 or cin != width:  # Projection shortcut: 1x1 conv + BN.
        total += conv(cin, width, 1) + bn(width)
      cin = width
  return total + linear(widths[3], classes)


def wrn_count(depth, widen, classes):
  n = (depth - 4) // 6
  total = conv(3, 16, 3)
  cin = 16
  for width in (16 * widen, 32 * widen, 64 * widen):
    for _ in range(n):
      total += bn(cin) + conv(cin, width, 3) + bn(width)
      total += conv(width, width, 3)
      if cin != width:  # convShortcut, no BN.
        total += conv(cin, width, 1)
      cin = width
  return total + bn(cin) + linear(cin, classes)


VGG_CFG = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
}


def vgg_count(cfg, classes):
  total, cin = 0, 3
  for group in cfg:
    for v in group:  # Conv2d keeps its default bias, then BatchNorm2d.
      total += conv(cin, v, 3, bias=True) + bn(v)
      cin = v
  return total + linear(512, classes)


def mobile_half_count(classes):
  setting = [  # t, c, n, s of mobilenetv2_T_w(6, 0.5).
      [1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 4, 2],
      [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1],
  ]
  cin = 16
  total = conv(3, cin, 3) + bn(cin)
  for t, c, n, _ in setting:
    cout = c // 2
    for _ in range(n):
      hidden = cin * t
      total += conv(cin, hidden, 1) + bn(hidden)
      total += conv(hidden, hidden, 3, groups=hidden) + bn(hidden)
      total += conv(hidden, cout, 1) + bn(cout)
      cin = cout
  return total + conv(cin, 1280, 1) + bn(1280) + linear(1280, classes)


def shufflev2_count(classes):
  total = conv(3, 24, 1) + bn(24)
  cin = 24
  for cout, blocks in zip((116, 232, 464), (3, 7, 3)):
    mid = cout // 2
    total += conv(cin, cin, 3, groups=cin) + bn(cin)
    total += conv(cin, mid, 1) + bn(mid)
    total += conv(cin, mid, 1) + bn(mid)
    total += conv(mid, mid, 3, groups=mid) + bn(mid)
    total += conv(mid, mid, 1) + bn(mid)
    for _ in range(blocks):
      half = cout // 2
      total += 2 * (conv(half, half, 1) + bn(half))
      total += conv(half, half, 3, groups=half) + bn(half)
    cin = cout
  return total + conv(464, 1024, 1) + bn(1024) + linear(1024, classes)


def mlp_count(sizes, classes):
  sizes = [784, *sizes, classes]
  return sum(linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))


def vit_count(image, channels, patch, dim, depth, mlp, classes, cls=True):
  tokens = (image // patch) ** 2 + int(cls)
  total = conv(channels, dim, patch, bias=True) + tokens * dim
  total += dim if cls else 0
  block = bn(dim) + 3 * linear(dim, dim) + linear(dim, dim)  # LN, qkv, proj.
  block += bn(dim) + linear(dim, mlp) + linear(mlp, dim)  # LN, MLP.
  return total + depth * block + bn(dim) + linear(dim, classes)  # Final LN.


def lenet_count(channels, in_channels, classes):
  """LeNet-5: three 5x5 convolutions with bias and BatchNorm, two denses."""
  total, fan_in = 0, in_channels
  for c in channels[:3]:
    total += 25 * fan_in * c + c + 2 * c  # Kernel, bias, BN scale and bias.
    fan_in = c
  return total + linear(channels[2], channels[3]) + linear(channels[3],
                                                          classes)


EXPECTED_PARAMS = {
    "resnet8": resnet_count(8, (16, 16, 32, 64), NUM_CLASSES),
    "resnet14": resnet_count(14, (16, 16, 32, 64), NUM_CLASSES),
    "resnet20": resnet_count(20, (16, 16, 32, 64), NUM_CLASSES),
    "resnet32": resnet_count(32, (16, 16, 32, 64), NUM_CLASSES),
    "resnet44": resnet_count(44, (16, 16, 32, 64), NUM_CLASSES),
    "resnet56": resnet_count(56, (16, 16, 32, 64), NUM_CLASSES),
    "resnet110": resnet_count(110, (16, 16, 32, 64), NUM_CLASSES),
    "resnet8x4": resnet_count(8, (32, 64, 128, 256), NUM_CLASSES),
    "resnet32x4": resnet_count(32, (32, 64, 128, 256), NUM_CLASSES),
    "wrn_16_1": wrn_count(16, 1, NUM_CLASSES),
    "wrn_16_2": wrn_count(16, 2, NUM_CLASSES),
    "wrn_40_1": wrn_count(40, 1, NUM_CLASSES),
    "wrn_40_2": wrn_count(40, 2, NUM_CLASSES),
    "vgg8": vgg_count(VGG_CFG["vgg8"], NUM_CLASSES),
    "vgg11": vgg_count(VGG_CFG["vgg11"], NUM_CLASSES),
    "vgg13": vgg_count(VGG_CFG["vgg13"], NUM_CLASSES),
    "mobile_half": mobile_half_count(NUM_CLASSES),
    "shufflev2": shufflev2_count(NUM_CLASSES),
    "hinton_teacher": mlp_count((1200, 1200), NUM_CLASSES),
    "hinton_student": mlp_count((800, 800), NUM_CLASSES),
    "lenet5": lenet_count((6, 16, 120, 84), 3, NUM_CLASSES),
    "lenet5_half": lenet_count((3, 8, 60, 42), 3, NUM_CLASSES),
    "vit_tiny": vit_count(32, 3, 4, 192, 12, 768, NUM_CLASSES),
    # torchvision's 11,689,512 and 21,797,672 at 1,000 classes, less the
    # 512 x 1000 + 1000 classifier, plus this one.
    "resnet18": 11_689_512 - 513 * 1000 + 513 * NUM_CLASSES,
    "resnet34": 21_797_672 - 513 * 1000 + 513 * NUM_CLASSES,
}

# Channels of ("stem", "stage1", ...) and of the embedding; 32x32 inputs.
_R = {"stem": (32, 32), "stage1": (32, 32), "stage2": (16, 16),
      "stage3": (8, 8)}
_VGG = {"stage1": (32, 32, 64), "stage2": (16, 16, 128),
        "stage3": (8, 8, 256), "stage4": (4, 4, 512), "stage5": (4, 4, 512)}


def _cnn(spatial, channels):
  return {k: (2, *spatial[k], c) for k, c in channels.items()}


EXPECTED_FEATURES = {
    **{
        name: _cnn(_R, {"stem": 16, "stage1": 16, "stage2": 32, "stage3": 64})
        for name in ("resnet8", "resnet14", "resnet20", "resnet32",
                     "resnet44", "resnet56", "resnet110", "wrn_16_1",
                     "wrn_40_1")
    },
    **{
        name: _cnn(_R, {"stem": 32, "stage1": 64, "stage2": 128,
                        "stage3": 256})
        for name in ("resnet8x4", "resnet32x4")
    },
    **{
        name: _cnn(_R, {"stem": 16, "stage1": 32, "stage2": 64,
                        "stage3": 128})
        for name in ("wrn_16_2", "wrn_40_2")
    },
    **{name: {k: (2, *v) for k, v in _VGG.items()}
       for name in ("vgg8", "vgg11", "vgg13")},
    "mobile_half": {"stem": (2, 16, 16, 16), "stage1": (2, 16, 16, 12),
                    "stage2": (2, 8, 8, 16), "stage3": (2, 4, 4, 48),
                    "stage4": (2, 2, 2, 160)},
    "shufflev2": {"stem": (2, 32, 32, 24), "stage1": (2, 16, 16, 116),
                  "stage2": (2, 8, 8, 232), "stage3": (2, 4, 4, 464)},
    "hinton_teacher": {"stage1": (2, 1200), "stage2": (2, 1200)},
    "hinton_student": {"stage1": (2, 800), "stage2": (2, 800)},
    "lenet5": {"stage1": (2, 14, 14, 6), "stage2": (2, 5, 5, 16),
               "stage3": (2, 120)},
    "lenet5_half": {"stage1": (2, 14, 14, 3), "stage2": (2, 5, 5, 8),
                    "stage3": (2, 60)},
    "vit_tiny": {f"stage{i}": (2, 65, 192) for i in range(1, 13)},
    # Stride-2 stem, max pool, then stages at strides 4, 8, 16, 32.
    **{name: {"stem": (2, 16, 16, 64), "stage1": (2, 8, 8, 64),
              "stage2": (2, 4, 4, 128), "stage3": (2, 2, 2, 256),
              "stage4": (2, 1, 1, 512)} for name in ("resnet18", "resnet34")},
}
EMBEDDING_DIM = {
    **{n: 64 for n in ("resnet8", "resnet14", "resnet20", "resnet32",
                       "resnet44", "resnet56", "resnet110", "wrn_16_1",
                       "wrn_40_1")},
    "resnet8x4": 256, "resnet32x4": 256, "wrn_16_2": 128, "wrn_40_2": 128,
    "vgg8": 512, "vgg11": 512, "vgg13": 512, "mobile_half": 1280,
    "shufflev2": 1024, "hinton_teacher": 1200, "hinton_student": 800,
    "lenet5": 84, "lenet5_half": 42, "vit_tiny": 192, "resnet18": 512,
    "resnet34": 512,
}


def sample_input(name, batch=2):
  if name.startswith("hinton"):
    return jnp.zeros((batch, 28, 28, 1), jnp.float32)
  return jnp.zeros((batch, 32, 32, 3), jnp.float32)


def count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@functools.cache
def abstract_run(name, dtype_name):
  """``(params, state, logits, features, new_state)`` as shapes only.

  One ``eval_shape`` of ``init`` and of a training ``apply``: nothing is
  compiled or computed.
  """
  model = models.create(name, num_classes=NUM_CLASSES, dtype=dtype_name)
  x = sample_input(name)

  def run(key):
    params, state = model.init(key, x)
    logits, features, new_state = model.apply(
        params, state, x, train=True, rng=key
    )
    return params, state, logits, features, new_state

  return jax.eval_shape(run, jax.random.key(0))


def test_every_bundled_model_is_tested():
  # The language models take tokens: tests/test_transformer.py has theirs.
  language_models = {"lm_teacher", "lm_student"}
  assert set(models.available()) - language_models == set(EXPECTED_PARAMS)


def test_published_parameter_counts():
  assert EXPECTED_PARAMS["resnet8x4"] == 1_233_540
  assert EXPECTED_PARAMS["resnet32x4"] == 7_433_860
  assert count(abstract_run("resnet8x4", "bfloat16")[0]) == 1_233_540
  assert count(abstract_run("resnet32x4", "bfloat16")[0]) == 7_433_860


# The dtype tested here is bfloat16: one trace checks both the architecture
# (parameter count and shapes do not depend on the compute dtype) and mixed
# precision; float32 runs for real below.
@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_parameter_count_shapes_and_dtypes(name):
  params, state, logits, features, new_state = abstract_run(name, "bfloat16")
  assert count(params) == EXPECTED_PARAMS[name]
  assert logits.shape == (2, NUM_CLASSES) and logits.dtype == jnp.float32
  expected = {**EXPECTED_FEATURES[name], "embedding": (2, EMBEDDING_DIM[name])}
  assert {k: v.shape for k, v in features.items()} == expected
  assert all(v.dtype == jnp.bfloat16 for v in features.values())
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  has_bn = not name.startswith(("hinton", "vit"))
  assert set(state) == ({"batch_stats"} if has_bn else set())
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(state))
  assert jax.tree.structure(new_state) == jax.tree.structure(state)


@pytest.mark.parametrize(
    "name, image, stage5",
    [("wrn_16_1", 32, None), ("vgg8", 32, (2, 4, 4, 512)),
     ("vgg8", 64, (2, 4, 4, 512)), ("mobile_half", 32, None),
     ("shufflev2", 32, None)],
)
def test_float32_eval_shapes(name, image, stage5):
  # The float32 (eval-mode) path of the families that are not run for real;
  # for 64x64 inputs VGG pools after group 4 too, as the reference does.
  module = models.create(name, num_classes=3)
  x = jnp.zeros((2, image, image, 3))
  logits, features, _ = jax.eval_shape(
      lambda: module.apply(
          *module.init(jax.random.key(0), x), x, train=False
      )
  )
  assert logits.shape == (2, 3) and logits.dtype == jnp.float32
  assert all(v.dtype == jnp.float32 for v in features.values())
  if stage5 is not None:
    assert features["stage5"].shape == stage5


# ---------------------------------------------------- real runs (small).
#
# Keys use the "rbg" PRNG: on XLA:CPU, compiling a network's initialisation
# with threefry keys costs seconds (one threefry kernel per parameter), with
# rbg a fraction of that. The initialisers' distributions are tested below.


def key(seed):
  return jax.random.key(seed, impl="rbg")


def initialised(name: str, x: np.ndarray):
  """Model ``name`` (10 classes), ``x`` on the device and its variables."""
  model = models.create(name, num_classes=10)
  x = jnp.asarray(x)
  params, state = jax.jit(model.init)(key(0), x)
  return model, x, params, state


@functools.cache
def resnet8_run():
  """resnet8 initialised, and one compiled training step: (loss, grads)."""
  model, x, params, state = initialised(
      "resnet8",
      np.random.default_rng(0).standard_normal((2, 32, 32, 3), np.float32))

  def loss(p):
    logits, features, new_state = model.apply(p, state, x, train=True)
    value = jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[:, 0])
    return value, (logits, features, new_state)

  (_, train_out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
      params
  )
  return model, params, state, x, train_out, grads


def test_resnet8_train_updates_batch_stats_and_eval_does_not():
  model, params, state, x, (logits, features, new_state), _ = resnet8_run()
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  assert features["embedding"].shape == (2, 64)
  changed = jax.tree.map(
      lambda a, b: not np.array_equal(a, b), state, new_state
  )
  assert all(jax.tree.leaves(changed))  # Every running mean and variance.
  apply = jax.jit(model.apply, static_argnames="train")
  eval_logits, _, eval_state = apply(params, state, x, train=False, rng=key(1))
  jax.tree.map(np.testing.assert_array_equal, eval_state, state)
  again, _, _ = apply(params, state, x, train=False, rng=key(2))
  np.testing.assert_array_equal(again, eval_logits)


def test_resnet8_batchnorm_uses_pytorch_momentum():
  # Fresh statistics are (0, 1); one training step moves them 10 % of the way
  # to the batch statistics of the stem BN's input (PyTorch momentum 0.1).
  _, params, _, x, (_, _, new_state), _ = resnet8_run()
  stem = jax.lax.conv_general_dilated(
      x, params["conv1"]["kernel"], (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  mean = np.asarray(stem, np.float64).mean(axis=(0, 1, 2))
  var = np.asarray(stem, np.float64).var(axis=(0, 1, 2))
  bn_state = new_state["batch_stats"]["bn1"]
  helpers.assert_close(bn_state["mean"], 0.1 * mean, rtol=1e-4, atol=1e-6)
  helpers.assert_close(bn_state["var"], 0.9 + 0.1 * var, rtol=1e-4)


def test_resnet8_grad_wrt_params_is_finite():
  *_, grads = resnet8_run()
  leaves = jax.tree.leaves(grads)
  assert all(np.all(np.isfinite(g)) for g in leaves)
  # Every parameter is used.
  assert all(np.any(np.asarray(g) != 0) for g in leaves)


def test_resnet8_bfloat16_compute():
  # The float32 parameters of the float32 model (the parameters do not depend
  # on the compute dtype: see test_parameter_count_shapes_and_dtypes).
  model = models.create("resnet8", num_classes=10, dtype=jnp.bfloat16)
  _, params, state, x, (logits32, _, _), _ = resnet8_run()
  logits, features, new_state = jax.jit(
      model.apply, static_argnames="train"
  )(params, state, x, train=True, rng=None)
  assert logits.dtype == jnp.float32
  assert features["stage3"].dtype == jnp.bfloat16
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(new_state))
  # bfloat16 compute (8 mantissa bits) stays near float32 compute.
  scale = float(np.max(np.abs(logits32)))
  helpers.assert_close(logits, logits32, rtol=0.0, atol=0.1 * scale)


@functools.cache
def mlp_run():
  model, x, params, state = initialised(
      "hinton_teacher", np.random.default_rng(1).random((2, 28, 28, 1),
                                                        np.float32))
  return model, jax.jit(model.apply, static_argnames="train"), params, state, x


def test_mlp_dropout_uses_the_rng():
  _, apply, params, state, x = mlp_run()
  a, _, _ = apply(params, state, x, train=True, rng=key(1))
  b, _, _ = apply(params, state, x, train=True, rng=key(2))
  a2, _, _ = apply(params, state, x, train=True, rng=key(1))
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(a, a2)
  e1, _, s1 = apply(params, state, x, train=False, rng=key(1))
  e2, _, _ = apply(params, state, x, train=False, rng=key(2))
  np.testing.assert_array_equal(e1, e2)
  assert state == {} and s1 == {}


def test_mlp_eval_is_the_plain_network():
  # Second route: the same weights in a float64 NumPy forward pass.
  _, apply, params, state, x = mlp_run()
  logits, features, _ = apply(params, state, x, train=False, rng=None)
  h = np.asarray(x, np.float64).reshape(2, -1)
  for layer in ("dense1", "dense2"):
    p = params[layer]
    h = np.maximum(h @ np.float64(p["kernel"]) + np.float64(p["bias"]), 0.0)
  p = params["classifier"]
  expected = h @ np.float64(p["kernel"]) + np.float64(p["bias"])
  helpers.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
  helpers.assert_close(features["embedding"], h, rtol=1e-5, atol=1e-5)


def test_mlp_accepts_any_input_shape():
  _, apply, params, state, x = mlp_run()
  flat, _, _ = apply(params, state, x.reshape(2, 784), train=False)
  image, _, _ = apply(params, state, x, train=False)
  helpers.assert_close(flat, image, rtol=1e-6, atol=1e-6)


def test_vit_tiny_runs():
  # Weights drawn in NumPy (compiling vit_tiny's initialisation on CPU takes
  # seconds; its shapes and dtypes are tested with eval_shape above).
  model = models.create("vit_tiny", num_classes=10)
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((2, 32, 32, 3), np.float32))
  abstract_params, state = jax.eval_shape(model.init, key(0), x)
  params = jax.tree.map(
      lambda a: jnp.asarray(0.05 * rng.standard_normal(a.shape), a.dtype),
      abstract_params,
  )
  logits, features, new_state = jax.jit(
      model.apply, static_argnames="train"
  )(params, state, x, train=False, rng=None)
  assert logits.shape == (2, 10) and np.all(np.isfinite(logits))
  assert features["stage12"].shape == (2, 65, 192)
  # The embedding is the class token after the final LayerNorm.
  norm = params["norm"]
  token = np.asarray(features["stage12"][:, 0], np.float64)
  token = (token - token.mean(-1, keepdims=True)) / np.sqrt(
      token.var(-1, keepdims=True) + 1e-6
  )
  helpers.assert_close(
      features["embedding"],
      token * np.float64(norm["scale"]) + np.float64(norm["bias"]),
      rtol=1e-4,
      atol=1e-4,
  )
  assert new_state == {}


@pytest.mark.parametrize(
    "image, pooling", [(28, "mean"), (28, "cls"), (32, "mean")]
)
def test_vit_sizes_and_pooling(image, pooling):
  module = models.ViT(
      num_classes=7, hidden_size=8, depth=2, num_heads=2, pooling=pooling
  )
  x = jnp.zeros((2, image, image, 1))
  (logits, features), variables = jax.eval_shape(
      lambda: module.init_with_output(jax.random.key(0), x, train=False)
  )
  cls = pooling == "cls"
  tokens = (image // 4) ** 2 + int(cls)
  assert logits.shape == (2, 7)
  assert features["stage2"].shape == (2, tokens, 8)
  assert features["embedding"].shape == (2, 8)
  assert count(variables["params"]) == vit_count(image, 1, 4, 8, 2, 32, 7, cls)


# --------------------------------------------------- layers and details.


def test_strided_conv_pads_like_pytorch():
  # Symmetric padding 1 with stride 2 (PyTorch), not "SAME" (bottom/right).
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((1, 6, 6, 2), np.float32))
  layer = _layers.conv(3, 3, stride=2, padding=1, dtype=jnp.float32,
                       name="c")
  variables = layer.init(key(0), x)
  kernel = np.float64(variables["params"]["kernel"])
  xp = np.pad(np.float64(x), ((0, 0), (1, 1), (1, 1), (0, 0)))
  expected = np.zeros((1, 3, 3, 3))
  for i in range(3):
    for j in range(3):
      patch = xp[0, 2 * i:2 * i + 3, 2 * j:2 * j + 3, :]
      expected[0, i, j] = np.einsum("hwc,hwco->o", patch, kernel)
  helpers.assert_close(layer.apply(variables, x), expected, rtol=1e-5,
                       atol=1e-5)


def test_channel_shuffle_matches_nchw_reference():
  x = np.arange(2 * 3 * 3 * 6, dtype=np.float32).reshape(2, 3, 3, 6)
  nchw = x.transpose(0, 3, 1, 2)
  n, c, h, w = nchw.shape
  shuffled = nchw.reshape(n, 2, c // 2, h, w).transpose(0, 2, 1, 3, 4)
  expected = shuffled.reshape(n, c, h, w).transpose(0, 2, 3, 1)
  np.testing.assert_array_equal(
      _shufflenetv2.channel_shuffle(jnp.asarray(x)), expected
  )


def test_initialisers_follow_pytorch():
  shape = (3, 3, 64, 128)
  kernel = _layers.kaiming_normal_fan_out(key(0), shape)
  np.testing.assert_allclose(
      np.std(kernel), np.sqrt(2.0 / (3 * 3 * 128)), rtol=0.02
  )
  kernel = _layers.torch_default_kernel_init(key(1), shape)
  bound = 1.0 / np.sqrt(3 * 3 * 64)
  assert np.max(np.abs(kernel)) <= bound
  assert np.max(np.abs(kernel)) > 0.99 * bound
  bias = _layers.torch_default_bias_init(64 * 9)(key(2), (1000,))
  assert np.max(np.abs(bias)) <= bound


# ---------------------------------------------------------------- errors.


def test_unknown_name_lists_available_models():
  with pytest.raises(ValueError, match="resnet8x4.*wrn_40_2"):
    models.create("resnet9", num_classes=10)


@pytest.mark.parametrize("num_classes", [0, -3, 2.5, True, None])
def test_bad_num_classes(num_classes):
  with pytest.raises(ValueError, match="num_classes"):
    models.create("resnet8", num_classes=num_classes)


@pytest.mark.parametrize("dtype", [jnp.int32, "not-a-dtype", jnp.bool_])
def test_bad_dtype(dtype):
  with pytest.raises(ValueError, match="dtype"):
    models.create("resnet8", num_classes=10, dtype=dtype)


def test_available_is_sorted_and_create_names_the_model():
  names = models.available()
  assert names == tuple(sorted(names)) and "resnet8x4" in names
  assert models.create("vgg8", num_classes=10, dtype="float32").name == "vgg8"
  assert models.create("vgg8", num_classes=np.int64(10)).name == "vgg8"


@pytest.mark.parametrize(
    "module, x, match",
    [
        (models.ResNet(depth=9), jnp.zeros((1, 32, 32, 3)), "6n \\+ 2"),
        (models.ResNet(depth=8, widths=(16, 32)), jnp.zeros((1, 32, 32, 3)),
         "widths"),
        (models.WideResNet(depth=15), jnp.zeros((1, 32, 32, 3)), "6n \\+ 4"),
        (models.ResNet(depth=8), jnp.zeros((32, 32, 3)), "NHWC"),
        (models.ViT(patch_size=5), jnp.zeros((1, 32, 32, 3)), "patch_size"),
        (models.ViT(pooling="max"), jnp.zeros((1, 32, 32, 3)), "pooling"),
        (models.ShuffleNetV2(net_size=0.7), jnp.zeros((1, 32, 32, 3)),
         "net_size"),
        (models.MLP((8,), dropout_rate=1.0), jnp.zeros((1, 4)),
         "dropout_rate"),
    ],
)
def test_bad_architecture_arguments(module, x, match):
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(lambda: module.init(jax.random.key(0), x, train=False))


def test_modules_are_linen():
  for factory in (models.resnet8, models.wrn_16_1, models.vgg8,
                  models.mobile_half, models.shufflev2, models.hinton_student,
                  models.vit_tiny):
    assert isinstance(factory(num_classes=3), nn.Module)
