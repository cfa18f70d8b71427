"""Tests for jaxkd.losses.perturbed_kd_loss and perturb_inputs."""

from __future__ import annotations

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from jaxkd import losses
from tests import helpers

# Numerical tests go through one jit (static: the Python-level choices).
_pkd = jax.jit(
    losses.perturbed_kd_loss,
    static_argnames=("num_samples", "noise", "axis"),
)


# ---------------------------------------------------------------------------
# Reference: the documented noise recipe, redrawn here with jax.random from
# the same key, then the KL computed independently in NumPy float64.


def _np_log_softmax(x):
  shifted = x - x.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def recipe_teacher_draws(teacher, key, *, noise, noise_scale, num_samples):
  """Perturbed teacher logits, float64, shape [num_samples, ..., C].

  ``teacher`` is in the compute dtype with the class axis last.
  """
  teacher = jnp.asarray(teacher)
  z = np.asarray(teacher, np.float64)
  finite = np.isfinite(z)  # -inf logits (impossible classes) stay as they are
  draws = []
  for draw_key in jax.random.split(key, num_samples):
    if noise == "gaussian":
      eps = jax.random.normal(draw_key, teacher.shape, teacher.dtype)
      sigma = noise_scale * np.std(z, axis=-1, keepdims=True, where=finite)
      draws.append(np.where(finite, z + sigma * np.asarray(eps, np.float64), z))
    else:
      u = jax.random.uniform(
          draw_key, teacher.shape, teacher.dtype, minval=-noise_scale,
          maxval=noise_scale,
      )
      draws.append(np.where(finite, z * (1.0 + np.asarray(u, np.float64)), z))
  return np.stack(draws)


def ref_perturbed_kd(student, teacher_draws, temperature):
  log_q = _np_log_softmax(np.asarray(student, np.float64) / temperature)
  log_p = _np_log_softmax(teacher_draws / temperature)
  supported = np.isfinite(log_p)  # 0 log 0 = 0 for impossible classes
  safe_log_p = np.where(supported, log_p, 0.0)
  terms = np.exp(safe_log_p) * (safe_log_p - log_q)
  kl = np.sum(np.where(supported, terms, 0.0), axis=-1)
  return temperature**2 * kl.mean(axis=0)


def _data(rng, shape, scale=2.0, dtype=np.float32):
  student = (scale * rng.standard_normal(shape)).astype(dtype)
  teacher = (scale * rng.standard_normal(shape)).astype(dtype)
  return student, teacher


# ---------------------------------------------------------------------------
# perturbed_kd_loss: agreement with the reference.


@pytest.mark.parametrize("noise", ["gaussian", "uniform"])
@pytest.mark.parametrize(
    "shape,num_samples,temperature", [((5, 6), 1, 1.0), ((2, 3, 4), 3, 2.5)]
)
def test_matches_float64_reference(
    x64, rng, noise, shape, num_samples, temperature
):
  student, teacher = _data(rng, shape, dtype=np.float64)
  key = jax.random.key(3)
  loss = _pkd(
      jnp.asarray(student), jnp.asarray(teacher), key,
      temperature=temperature, noise_scale=0.3, num_samples=num_samples,
      noise=noise,
  )
  assert loss.dtype == jnp.float64
  assert loss.shape == shape[:-1]
  draws = recipe_teacher_draws(
      teacher, key, noise=noise, noise_scale=0.3, num_samples=num_samples
  )
  expected = ref_perturbed_kd(student, draws, temperature)
  helpers.assert_close(loss, expected, rtol=1e-12, atol=1e-14)
  # The noise really changed something.
  assert not np.allclose(
      expected, ref_perturbed_kd(student, teacher[None], temperature)
  )


@pytest.mark.parametrize("noise", ["gaussian", "uniform"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_low_precision_matches_reference(rng, noise, dtype):
  # 16-bit inputs are computed in float32 and the noise is drawn in float32:
  # against the float64 reference of the rounded inputs with the same float32
  # draws, only float32 rounding remains.
  student, teacher = _data(rng, (4, 5))
  student = jnp.asarray(student, dtype)
  teacher = jnp.asarray(teacher, dtype)
  key = jax.random.key(11)
  loss = _pkd(
      student, teacher, key, temperature=2.0, noise_scale=0.2,
      num_samples=2, noise=noise,
  )
  assert loss.dtype == jnp.float32
  draws = recipe_teacher_draws(
      teacher.astype(jnp.float32), key, noise=noise, noise_scale=0.2,
      num_samples=2,
  )
  expected = ref_perturbed_kd(np.asarray(student, np.float64), draws, 2.0)
  helpers.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("noise", ["gaussian", "uniform"])
def test_zero_noise_is_kd_loss(x64, rng, noise):
  student, teacher = _data(rng, (3, 4), dtype=np.float64)
  loss = _pkd(
      student, teacher, jax.random.key(0), temperature=3.0, noise_scale=0.0,
      num_samples=2, noise=noise,
  )
  expected = losses.kd_loss(student, teacher, temperature=3.0)
  helpers.assert_close(loss, expected, rtol=1e-13)


def test_golden_gaussian_row_of_equal_logits(rng):
  # A teacher row of equal logits has standard deviation 0: no noise at all,
  # whatever noise_scale. KL(uniform || softmax([0, log 3])) by hand.
  student = jnp.array([0.0, np.log(3.0)], jnp.float32)
  teacher = jnp.array([1.0, 1.0], jnp.float32)
  loss = _pkd(student, teacher, jax.random.key(0), noise_scale=5.0)
  expected = 0.5 * np.log(0.5 / 0.25) + 0.5 * np.log(0.5 / 0.75)
  helpers.assert_close(loss, expected, rtol=1e-6)


def test_deterministic_per_key(rng):
  student, teacher = _data(rng, (3, 4))
  kwargs = dict(noise_scale=0.5, num_samples=2)
  a = _pkd(student, teacher, jax.random.key(7), **kwargs)
  b = _pkd(student, teacher, jax.random.key(7), **kwargs)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A raw uint32 key of the same seed gives the same draws.
  raw = _pkd(student, teacher, jax.random.PRNGKey(7), **kwargs)
  np.testing.assert_array_equal(np.asarray(raw), np.asarray(a))
  other = _pkd(student, teacher, jax.random.key(8), **kwargs)
  assert not np.allclose(np.asarray(other), np.asarray(a))


def test_monte_carlo_mean_approaches_expectation():
  # The expectation over the gaussian noise, precomputed from independent
  # NumPy draws; the loss with many draws must land within a few standard
  # errors of it.
  student = np.array([[0.5, -1.0, 2.0, 0.0], [1.0, 1.0, -2.0, 0.5]])
  teacher = np.array([[1.0, -0.5, 3.0, 0.0], [-1.0, 2.0, 0.0, 0.5]])
  noise_scale, temperature, num_samples = 0.5, 2.0, 2000
  np_rng = np.random.default_rng(1)
  sigma = noise_scale * teacher.std(axis=-1, keepdims=True)
  eps = np_rng.standard_normal((100_000,) + teacher.shape)
  log_q = _np_log_softmax(student / temperature)
  log_p = _np_log_softmax((teacher + sigma * eps) / temperature)
  per_draw = temperature**2 * np.sum(np.exp(log_p) * (log_p - log_q), -1)
  expectation = per_draw.mean(axis=0)
  standard_error = per_draw.std(axis=0) / np.sqrt(num_samples)
  loss = _pkd(
      jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32),
      jax.random.key(5), temperature=temperature, noise_scale=noise_scale,
      num_samples=num_samples,
  )
  assert np.all(np.abs(np.asarray(loss) - expectation) < 5 * standard_error)
  # And the noise matters at this scale: the expectation is not plain KD.
  log_p_clean = _np_log_softmax(teacher / temperature)
  kd = temperature**2 * np.sum(np.exp(log_p_clean) * (log_p_clean - log_q), -1)
  assert np.all(np.abs(expectation - np.asarray(kd)) > 10 * standard_error)


def test_jit_matches_eager(rng):
  student, teacher = _data(rng, (3, 4))
  helpers.assert_jit_matches_eager(
      lambda s, t: losses.perturbed_kd_loss(
          s, t, jax.random.key(2), num_samples=3, noise="uniform"
      ),
      student,
      teacher,
  )


def test_vmap_over_batch_matches_loop(rng):
  student, teacher = _data(rng, (2, 3, 4))
  keys = jax.random.split(jax.random.key(4), 2)
  batched = jax.jit(jax.vmap(
      lambda s, t, k: losses.perturbed_kd_loss(s, t, k, num_samples=2)
  ))(student, teacher, keys)
  looped = [
      _pkd(student[i], teacher[i], keys[i], num_samples=2) for i in range(2)
  ]
  helpers.assert_close(batched, np.stack(looped), rtol=1e-6, atol=1e-7)


def test_where_keeps_the_draws_and_masks(rng):
  # The noise is drawn for the full array, so masking only zeros examples:
  # the kept ones equal the unmasked loss (slicing would change the draws).
  student, teacher = _data(rng, (3, 4))
  where = np.array([True, False, True])
  key = jax.random.key(9)
  full = _pkd(student, teacher, key, noise_scale=0.4, num_samples=2)
  student[~where] = np.nan
  teacher[~where] = np.inf
  masked = _pkd(
      student, teacher, key, noise_scale=0.4, num_samples=2, where=where
  )
  helpers.assert_close(
      np.asarray(masked)[where], np.asarray(full)[where], rtol=1e-6
  )
  np.testing.assert_array_equal(np.asarray(masked)[~where], 0.0)
  grads = jax.grad(
      lambda s, t: jnp.sum(
          _pkd(s, t, key, noise_scale=0.4, num_samples=2, where=where)
      ),
      argnums=(0, 1),
  )(student, teacher)
  for g in grads:
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(np.asarray(g)[~where], 0.0)


def test_where_with_zero_noise_matches_slicing(rng):
  student, teacher = _data(rng, (3, 4))
  where = np.array([True, False, True])
  helpers.assert_where_matches_slicing(
      lambda s, t, where=None: _pkd(
          s, t, jax.random.key(0), noise_scale=0.0, where=where
      ),
      (student, teacher),
      where,
  )


def test_axis_matches_moveaxis(rng):
  # The draws are made with the class axis moved last, so they do not
  # depend on `axis`.
  axis, noise = 0, "uniform"
  student, teacher = _data(rng, (4, 3))
  helpers.assert_axis_matches_moveaxis(
      lambda s, t, axis: _pkd(
          s, t, jax.random.key(1), noise_scale=0.3, num_samples=2,
          noise=noise, axis=axis,
      ),
      (student, teacher),
      axis,
  )


def test_check_grads_second_order(x64, rng):
  student, teacher = _data(rng, (2, 3), dtype=np.float64)
  student, teacher = jnp.asarray(student), jnp.asarray(teacher)
  key = jax.random.key(6)

  def both_kinds(s, t):
    # Uniform noise: a smooth function of both logit arrays. Gaussian noise:
    # the scale std(z_T) is held constant (stop_gradient), so the teacher
    # gradient is not the total derivative that finite differences see; the
    # teacher is fixed there and only the student side is checked.
    uniform = _pkd(
        s, t, key, temperature=1.5, noise_scale=0.3, num_samples=2,
        noise="uniform",
    )
    gaussian = _pkd(
        s, teacher, key, temperature=1.5, noise_scale=0.3, num_samples=2
    )
    return uniform + 0.5 * gaussian

  check_grads(
      jax.jit(both_kinds), (student, teacher), order=2, modes=["rev"]
  )


def test_impossible_classes_stay_impossible(x64):
  # -inf teacher logits are not perturbed, and the gaussian scale is the
  # standard deviation of the finite logits only.
  student = jnp.array([[0.3, -1.0, 2.0], [0.0, 0.0, 0.0]])
  teacher = jnp.array([[-jnp.inf, 1.0, 2.0], [0.5, -jnp.inf, 1.5]])
  key = jax.random.key(2)
  for noise in ("gaussian", "uniform"):
    loss = _pkd(student, teacher, key, noise_scale=0.5, num_samples=2,
                noise=noise)
    draws = recipe_teacher_draws(
        teacher, key, noise=noise, noise_scale=0.5, num_samples=2
    )
    assert np.all(np.isneginf(draws[:, [0, 1], [0, 1]]))
    helpers.assert_close(
        loss, ref_perturbed_kd(student, draws, 1.0), rtol=1e-12
    )
    helpers.assert_finite_value_and_grad(
        lambda s, t, noise=noise: _pkd(s, t, key, noise=noise, num_samples=2),
        student,
        teacher,
        argnums=(0,),
    )


_EXTREMES = (
    [[1e4, 0.0, 0.0], [0.0, 1e4, -1e4], [-1e4, -1e4, 1e4], [1e4, 1e4, 1e4]],
    [[1e4, 0.0, 0.0], [1e4, 0.0, -1e4], [1e3, -1e3, 0.0], [0.0, 0.0, 0.0]],
)


@pytest.mark.parametrize("noise", ["gaussian", "uniform"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("temperature", [1e-3, 1e3])
def test_extremes_finite_value_and_grad(noise, dtype, temperature):
  student = jnp.asarray(_EXTREMES[0], dtype)
  teacher = jnp.asarray(_EXTREMES[1], dtype)
  helpers.assert_finite_value_and_grad(
      lambda s, t: _pkd(
          s, t, jax.random.key(0), temperature=temperature, noise_scale=0.5,
          num_samples=2, noise=noise,
      ),
      student,
      teacher,
  )


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(
    seed=st.integers(0, 2**31 - 1),
    noise=st.sampled_from(["gaussian", "uniform"]),
    scale=st.sampled_from([0.1, 3.0, 30.0]),
)
def test_non_negative_and_zero_without_noise_at_equality(seed, noise, scale):
  rng = np.random.default_rng(seed)
  student, teacher = _data(rng, (3, 4), scale=scale)
  key = jax.random.key(seed)
  loss = _pkd(student, teacher, key, noise_scale=0.5, num_samples=2,
              noise=noise)
  assert np.all(np.asarray(loss) >= -1e-5)
  same = _pkd(teacher, teacher, key, noise_scale=0.0, num_samples=2,
              noise=noise)
  np.testing.assert_allclose(np.asarray(same), 0.0, atol=1e-6)


# ---------------------------------------------------------------------------
# perturbed_kd_loss: errors.


@pytest.fixture
def logits(rng):
  return _data(rng, (3, 4))


def test_error_noise_kind(logits):
  with pytest.raises(ValueError, match="noise"):
    losses.perturbed_kd_loss(*logits, jax.random.key(0), noise="laplace")


@pytest.mark.parametrize(
    "num_samples,error", [(0, ValueError), (2.0, TypeError), (True, TypeError)]
)
def test_error_num_samples(logits, num_samples, error):
  with pytest.raises(error, match="num_samples"):
    losses.perturbed_kd_loss(
        *logits, jax.random.key(0), num_samples=num_samples
    )


def test_error_noise_scale_and_temperature(logits):
  with pytest.raises(ValueError, match="noise_scale"):
    losses.perturbed_kd_loss(*logits, jax.random.key(0), noise_scale=-0.1)
  with pytest.raises(ValueError, match="temperature"):
    losses.perturbed_kd_loss(*logits, jax.random.key(0), temperature=-1.0)


@pytest.mark.parametrize(
    "key,error",
    [
        (0, TypeError),
        (np.zeros(2, np.float32), TypeError),
        (np.zeros((2, 2), np.uint32), TypeError),
        (jax.random.split(jax.random.key(0), 2), ValueError),
    ],
)
def test_error_key(logits, key, error):
  with pytest.raises(error, match="key"):
    losses.perturbed_kd_loss(*logits, key)


def test_error_logits(logits):
  student, teacher = logits
  with pytest.raises(TypeError, match="teacher_logits"):
    losses.perturbed_kd_loss(
        student, teacher.astype(np.int32), jax.random.key(0)
    )
  with pytest.raises(ValueError, match="student_logits"):
    losses.perturbed_kd_loss(student[:2], teacher, jax.random.key(0))


# ---------------------------------------------------------------------------
# perturb_inputs.

_perturb = jax.jit(losses.perturb_inputs, static_argnames=("kind",))


@pytest.mark.parametrize("kind", ["gaussian", "uniform"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_perturb_inputs_keeps_shape_and_dtype(kind, dtype):
  images = jnp.ones((2, 4, 4, 3), dtype)
  noisy = _perturb(images, jax.random.key(0), noise_scale=0.1, kind=kind)
  assert noisy.shape == images.shape
  assert noisy.dtype == dtype
  assert not np.array_equal(np.asarray(noisy), np.asarray(images))


def test_perturb_inputs_float64(x64):
  images = jnp.zeros((3, 2), jnp.float64)
  noisy = losses.perturb_inputs(images, jax.random.key(0), noise_scale=1.0)
  assert noisy.dtype == jnp.float64
  expected = np.asarray(jax.random.normal(jax.random.key(0), (3, 2)))
  np.testing.assert_array_equal(np.asarray(noisy), expected)


@pytest.mark.parametrize("kind", ["gaussian", "uniform"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_perturb_inputs_zero_scale_is_identity(rng, kind, dtype):
  images = jnp.asarray(rng.standard_normal((2, 4, 4, 3)), dtype)
  noisy = _perturb(images, jax.random.key(1), noise_scale=0.0, kind=kind)
  np.testing.assert_array_equal(np.asarray(noisy), np.asarray(images))


def test_perturb_inputs_empirical_statistics(rng):
  images = jnp.asarray(rng.standard_normal((256, 256)), jnp.float32)
  scale = 0.3
  for kind, expected_std in (
      ("gaussian", scale), ("uniform", scale / np.sqrt(3.0))
  ):
    noise = np.asarray(
        _perturb(images, jax.random.key(2), noise_scale=scale, kind=kind)
        - images,
        np.float64,
    )
    # 65,536 draws: the sample std is within ~0.3% of the truth (1 sigma).
    np.testing.assert_allclose(noise.std(), expected_std, rtol=0.02)
    assert abs(noise.mean()) < 0.02 * scale
    if kind == "uniform":
      assert np.abs(noise).max() <= scale * (1 + 1e-6)


def test_perturb_inputs_recipe_and_determinism():
  images = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
  key = jax.random.key(5)
  a = _perturb(images, key, noise_scale=0.2)
  b = _perturb(images, key, noise_scale=0.2)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The documented recipe (to rounding: XLA may fuse the multiply-add).
  helpers.assert_close(
      a, images + 0.2 * jax.random.normal(key, (3, 4)), rtol=1e-6, atol=1e-7
  )
  raw = _perturb(images, jax.random.PRNGKey(5), noise_scale=0.2)
  np.testing.assert_array_equal(np.asarray(raw), np.asarray(a))
  other = _perturb(images, jax.random.key(6), noise_scale=0.2)
  assert not np.allclose(np.asarray(other), np.asarray(a))
  # The gradient with respect to the inputs is the identity.
  grad = jax.grad(lambda x: jnp.sum(_perturb(x, key, noise_scale=0.2)))(images)
  np.testing.assert_array_equal(np.asarray(grad), 1.0)


def test_perturb_inputs_errors():
  key = jax.random.key(0)
  with pytest.raises(TypeError, match="inputs.*[Nn]ormalise"):
    losses.perturb_inputs(jnp.zeros((2, 2), jnp.uint8), key, noise_scale=0.1)
  with pytest.raises(ValueError, match="noise_scale"):
    losses.perturb_inputs(jnp.zeros((2, 2)), key, noise_scale=-1.0)
  with pytest.raises(ValueError, match="kind"):
    losses.perturb_inputs(jnp.zeros((2, 2)), key, noise_scale=0.1, kind="salt")
  with pytest.raises(TypeError, match="key"):
    losses.perturb_inputs(jnp.zeros((2, 2)), 3, noise_scale=0.1)
