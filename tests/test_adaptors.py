"""Tests of the student-to-teacher feature adaptors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import adaptors
from tests import helpers


def features(rng, shape, dtype=np.float32):
  return jnp.asarray(rng.standard_normal(shape).astype(dtype))


def np_conv1x1(x, kernel, bias=None):
  """The 1x1 convolution as a channel contraction, in float64 NumPy."""
  y = np.einsum(
      "bhwc,co->bhwo", np.asarray(x, np.float64),
      np.asarray(kernel, np.float64)[0, 0],
  )
  return y if bias is None else y + np.asarray(bias, np.float64)


# ------------------------------------------------------------ ConvAdaptor.


@pytest.mark.parametrize("use_bias", [True, False])
def test_conv_adaptor_shapes(rng, use_bias):
  x = features(rng, (2, 5, 4, 3))
  adaptor = adaptors.ConvAdaptor(features=7, use_bias=use_bias)
  variables = adaptor.init(jax.random.key(0), x)
  assert set(variables) == {"params"}  # No batch_stats without batch norm.
  shapes = jax.tree.map(jnp.shape, variables["params"])
  expected = {"kernel": (1, 1, 3, 7)}
  if use_bias:
    expected["bias"] = (7,)
  assert shapes == {"conv": expected}
  y = adaptor.apply(variables, x)
  assert y.shape == (2, 5, 4, 7) and y.dtype == jnp.float32


def test_conv_adaptor_is_a_channel_einsum(x64, rng):
  # Float64 parameters and inputs: the convolution and the einsum agree to
  # rounding.
  x = features(rng, (3, 4, 2, 5), np.float64)
  adaptor = adaptors.ConvAdaptor(
      features=6, param_dtype=jnp.float64,
      bias_init=jax.nn.initializers.normal(1.0),
  )
  variables = adaptor.init(jax.random.key(1), x)
  params = variables["params"]["conv"]
  y = adaptor.apply(variables, x)
  assert y.dtype == jnp.float64
  helpers.assert_close(
      y, np_conv1x1(x, params["kernel"], params["bias"]), rtol=1e-12,
      atol=1e-12,
  )


def test_conv_adaptor_float32_and_bfloat16_inputs(rng):
  x = features(rng, (2, 3, 3, 4))
  adaptor = adaptors.ConvAdaptor(features=3)
  variables = adaptor.init(jax.random.key(0), x)
  kernel = variables["params"]["conv"]["kernel"]
  y = adaptor.apply(variables, x)
  helpers.assert_close(y, np_conv1x1(x, kernel), rtol=1e-5, atol=1e-6)
  # bfloat16 features are projected in float32 (exactly the bf16 values).
  x16 = x.astype(jnp.bfloat16)
  y16 = adaptor.apply(variables, x16)
  assert y16.dtype == jnp.float32
  helpers.assert_close(
      y16, np_conv1x1(x16.astype(jnp.float32), kernel), rtol=1e-5, atol=1e-6
  )


def test_conv_adaptor_default_initialization():
  # LeCun normal: variance 1 / C_s; zero bias.
  c_s, c_t = 256, 64
  adaptor = adaptors.ConvAdaptor(features=c_t)
  variables = adaptor.init(jax.random.key(3), jnp.zeros((1, 1, 1, c_s)))
  kernel = np.asarray(variables["params"]["conv"]["kernel"])
  np.testing.assert_allclose(kernel.var(), 1.0 / c_s, rtol=0.05)
  assert abs(kernel.mean()) < 3 / np.sqrt(c_s * c_t * c_s)
  np.testing.assert_array_equal(variables["params"]["conv"]["bias"], 0.0)


def test_conv_adaptor_batch_norm_train_and_eval(rng):
  x = features(rng, (4, 3, 2, 3)) * 3.0 + 1.0
  adaptor = adaptors.ConvAdaptor(
      features=5, use_batch_norm=True, use_bias=False, momentum=0.9,
      epsilon=1e-5,
  )
  variables = adaptor.init(jax.random.key(0), x, train=False)
  assert jax.tree.map(jnp.shape, variables["batch_stats"]) == {
      "batch_norm": {"mean": (5,), "var": (5,)}
  }
  assert jax.tree.map(jnp.shape, variables["params"]["batch_norm"]) == {
      "scale": (5,), "bias": (5,)
  }
  conv = np_conv1x1(x, variables["params"]["conv"]["kernel"])
  mean, var = conv.mean(axis=(0, 1, 2)), conv.var(axis=(0, 1, 2))

  # Train: normalized by the batch's statistics, running stats updated.
  y, updates = adaptor.apply(
      variables, x, train=True, mutable=["batch_stats"]
  )
  helpers.assert_close(
      y, (conv - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-5
  )
  np.testing.assert_allclose(np.asarray(y).mean(axis=(0, 1, 2)), 0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(y).var(axis=(0, 1, 2)), 1, rtol=1e-3)
  stats = updates["batch_stats"]["batch_norm"]
  helpers.assert_close(stats["mean"], 0.1 * mean, rtol=1e-5, atol=1e-6)
  helpers.assert_close(stats["var"], 0.9 + 0.1 * var, rtol=1e-5)

  # Eval: normalized by the running statistics, nothing to update.
  y_init = adaptor.apply(variables, x, train=False)
  helpers.assert_close(y_init, conv / np.sqrt(1 + 1e-5), rtol=1e-5, atol=1e-6)
  trained = {"params": variables["params"], **updates}
  y_eval = adaptor.apply(trained, x, train=False)
  helpers.assert_close(
      y_eval,
      (conv - 0.1 * mean) / np.sqrt(0.9 + 0.1 * var + 1e-5),
      rtol=1e-5, atol=1e-6,
  )


def test_conv_adaptor_float64_batch_norm(x64, rng):
  x = features(rng, (4, 2, 2, 3), np.float64)
  adaptor = adaptors.ConvAdaptor(
      features=2, use_batch_norm=True, param_dtype=jnp.float64
  )
  variables = adaptor.init(jax.random.key(0), x, train=False)
  y, updates = adaptor.apply(
      variables, x, train=True, mutable=["batch_stats"]
  )
  conv = np_conv1x1(x, variables["params"]["conv"]["kernel"])
  mean, var = conv.mean(axis=(0, 1, 2)), conv.var(axis=(0, 1, 2))
  assert y.dtype == jnp.float64
  helpers.assert_close(
      y, (conv - mean) / np.sqrt(var + 1e-5), rtol=1e-10, atol=1e-12
  )
  assert updates["batch_stats"]["batch_norm"]["mean"].dtype == jnp.float64


def test_conv_adaptor_errors(rng):
  x = features(rng, (2, 3, 3, 4))
  with pytest.raises(ValueError, match="`train`"):
    adaptors.ConvAdaptor(features=3, use_batch_norm=True).init(
        jax.random.key(0), x
    )
  with pytest.raises(ValueError, match="NHWC"):
    adaptors.ConvAdaptor(features=3).init(jax.random.key(0), x[0])
  with pytest.raises(TypeError, match="floating"):
    adaptors.ConvAdaptor(features=3).init(
        jax.random.key(0), x.astype(jnp.int32)
    )
  with pytest.raises(ValueError, match="`features`"):
    adaptors.ConvAdaptor(features=0).init(jax.random.key(0), x)


# ---------------------------------------------------------- LinearAdaptor.


@pytest.mark.parametrize("shape", [(4, 6), (2, 3, 6)])
def test_linear_adaptor_shapes_and_values(rng, shape):
  x = features(rng, shape)
  adaptor = adaptors.LinearAdaptor(
      features=9, bias_init=jax.nn.initializers.normal(1.0)
  )
  variables = adaptor.init(jax.random.key(0), x)
  params = variables["params"]["dense"]
  assert jax.tree.map(jnp.shape, params) == {"kernel": (6, 9), "bias": (9,)}
  y = adaptor.apply(variables, x, train=True)  # `train` is accepted.
  assert y.shape == shape[:-1] + (9,)
  expected = np.asarray(x, np.float64) @ np.asarray(
      params["kernel"], np.float64
  ) + np.asarray(params["bias"], np.float64)
  helpers.assert_close(y, expected, rtol=1e-5, atol=1e-6)


def test_linear_adaptor_without_bias_and_errors(rng):
  x = features(rng, (2, 4))
  adaptor = adaptors.LinearAdaptor(features=3, use_bias=False)
  variables = adaptor.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, variables["params"]) == {
      "dense": {"kernel": (4, 3)}
  }
  with pytest.raises(ValueError, match="`features`"):
    adaptors.LinearAdaptor(features=-1).init(jax.random.key(0), x)
  with pytest.raises(TypeError, match="floating"):
    adaptor.init(jax.random.key(0), jnp.ones((2, 4), jnp.int32))


# ------------------------------------------------------------ adaptor_for.


@pytest.mark.parametrize("use_batch_norm", [False, True])
def test_adaptor_for_feature_maps(use_batch_norm):
  adaptor = adaptors.adaptor_for(
      (8, 7, 7, 16), (8, 7, 7, 64), use_batch_norm=use_batch_norm
  )
  assert isinstance(adaptor, adaptors.ConvAdaptor)
  assert adaptor.features == 64
  assert adaptor.use_batch_norm == use_batch_norm


@pytest.mark.parametrize(
    "student, teacher",
    [((8, 32), (8, 128)), ((8, 10, 32), (8, 10, 48)), ((8, 32), (8, 32))],
)
def test_adaptor_for_embeddings(student, teacher):
  adaptor = adaptors.adaptor_for(student, teacher)
  assert isinstance(adaptor, adaptors.LinearAdaptor)
  assert adaptor.features == teacher[-1]


def test_adaptor_for_accepts_arrays_and_shape_structs(rng):
  student = features(rng, (2, 3, 3, 4))
  teacher = jax.ShapeDtypeStruct((2, 3, 3, 6), jnp.float32)
  adaptor = adaptors.adaptor_for(student, teacher)
  variables = adaptor.init(jax.random.key(0), student)
  assert adaptor.apply(variables, student).shape == teacher.shape
  adaptor = adaptors.adaptor_for(np.zeros((2, 4)), (np.int64(2), np.int64(5)))
  assert adaptor.features == 5


@pytest.mark.parametrize(
    "student, teacher, kwargs, match",
    [
        ((8, 7, 7, 16), (8, 14, 14, 64), {}, "resize or pool"),
        ((8, 7, 7, 16), (8, 7, 8, 64), {}, "spatial"),
        ((8, 10, 32), (8, 12, 32), {}, "leading"),
        ((8, 7, 7, 16), (8, 64), {}, "ranks"),
        ((8, 2, 2, 2, 16), (8, 2, 2, 2, 64), {}, "rank 4"),
        ((8,), (8,), {}, "rank 4"),
        ((8, 32), (8, 64), {"use_batch_norm": True}, "`use_batch_norm`"),
    ],
)
def test_adaptor_for_errors_name_both_shapes(student, teacher, kwargs, match):
  with pytest.raises(ValueError, match=match) as info:
    adaptors.adaptor_for(student, teacher, **kwargs)
  assert str(student) in str(info.value) and str(teacher) in str(info.value)


def test_adaptor_for_rejects_non_shapes():
  with pytest.raises(TypeError, match="`student_shape`"):
    adaptors.adaptor_for(3, (8, 4))
  with pytest.raises(TypeError, match="`teacher_shape`"):
    adaptors.adaptor_for((8, 4), (8, 4.5))


# ---------------------------------------------------------- jit and grad.


def test_adaptors_jit_and_grad(rng):
  """A hint loss through the adaptor: jit equals eager, gradients by hand."""
  x = features(rng, (2, 3, 3, 4))
  target = features(rng, (2, 3, 3, 6))
  adaptor = adaptors.ConvAdaptor(features=6)
  variables = adaptor.init(jax.random.key(0), x)

  def hint_loss(params, x):
    y = adaptor.apply({"params": params}, x)
    return jnp.sum((y - target) ** 2)

  helpers.assert_jit_matches_eager(hint_loss, variables["params"], x)
  grads = jax.jit(jax.grad(hint_loss, argnums=(0, 1)))(variables["params"], x)
  kernel = np.asarray(variables["params"]["conv"]["kernel"], np.float64)
  residual = np_conv1x1(x, kernel) - np.asarray(target, np.float64)
  # d/dK sum (xK - t)^2 = 2 x^T (xK - t); d/dx = 2 (xK - t) K^T.
  helpers.assert_close(
      grads[0]["conv"]["kernel"][0, 0],
      2 * np.einsum("bhwc,bhwo->co", np.asarray(x, np.float64), residual),
      rtol=1e-4, atol=1e-4,
  )
  helpers.assert_close(
      grads[0]["conv"]["bias"], 2 * residual.sum(axis=(0, 1, 2)),
      rtol=1e-4, atol=1e-4,
  )
  helpers.assert_close(
      grads[1], 2 * np.einsum("bhwo,co->bhwc", residual, kernel[0, 0]),
      rtol=1e-4, atol=1e-4,
  )


def test_batch_norm_adaptor_train_step_under_jit(rng):
  """Params and batch stats held apart from the student's, updated in jit."""
  x = features(rng, (4, 2, 2, 3))
  target = features(rng, (4, 2, 2, 5))
  adaptor = adaptors.adaptor_for(x.shape, target.shape, use_batch_norm=True)
  variables = adaptor.init(jax.random.key(0), x, train=False)

  @jax.jit
  def step(params, batch_stats, x):
    def loss_fn(params):
      y, updates = adaptor.apply(
          {"params": params, "batch_stats": batch_stats}, x, train=True,
          mutable=["batch_stats"],
      )
      return jnp.mean((y - target) ** 2), updates["batch_stats"]

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params
    )
    params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    return params, new_stats, loss

  params, stats = variables["params"], variables["batch_stats"]
  losses_seen = []
  for _ in range(3):
    params, stats, loss = step(params, stats, x)
    losses_seen.append(float(loss))
  assert np.all(np.isfinite(losses_seen))
  assert losses_seen[-1] < losses_seen[0]
  assert not np.allclose(stats["batch_norm"]["mean"], 0.0)
