"""Tests of the feature-map losses against float64 NumPy formulas."""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxkd import losses
from tests import helpers


# Independent float64 references, written from the formulas.
def np_unit(x, axis):
  norm = np.sqrt(np.sum(np.square(x), axis=axis, keepdims=True))
  return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def np_hint(student, teacher, kind="mse"):
  s = np.asarray(student, np.float64)
  t = np.asarray(teacher, np.float64)
  batch = s.shape[0]
  if kind == "mse":
    return np.square(s - t).reshape(batch, -1).mean(axis=1)
  if kind == "l1":
    return np.abs(s - t).reshape(batch, -1).mean(axis=1)
  cosine = np.sum(np_unit(s, -1) * np_unit(t, -1), axis=-1)
  return (1 - cosine).reshape(batch, -1).mean(axis=1)


def np_pool(x, size):
  """Average pooling over explicit windows of [..., H, W, C] (loops)."""
  x = np.asarray(x, np.float64)
  height, width = x.shape[-3:-1]
  kh, kw = height // size[0], width // size[1]
  out = np.zeros(x.shape[:-3] + (size[0], size[1], x.shape[-1]))
  for i in range(size[0]):
    for j in range(size[1]):
      window = x[..., i * kh:(i + 1) * kh, j * kw:(j + 1) * kw, :]
      out[..., i, j, :] = window.mean(axis=(-3, -2))
  return out


def np_match(student, teacher):
  s = np.asarray(student, np.float64)
  t = np.asarray(teacher, np.float64)
  size = (min(s.shape[-3], t.shape[-3]), min(s.shape[-2], t.shape[-2]))
  return np_pool(s, size), np_pool(t, size)


def np_attention(student, teacher, p=2):
  s, t = np_match(student, teacher)

  def attention(f):
    q = np.mean(np.abs(f) ** p, axis=-1)
    return np_unit(q.reshape(q.shape[:-2] + (-1,)), -1)

  return np.mean(np.square(attention(s) - attention(t)), axis=-1)


def np_nst(student, teacher):
  """The three-kernel-mean MMD form, one example at a time."""
  s, t = np_match(student, teacher)
  lead = s.shape[:-3]
  s = s.reshape((-1,) + s.shape[-3:])
  t = t.reshape((-1,) + t.shape[-3:])
  out = []
  for fs, ft in zip(s, t):
    a = np_unit(fs.reshape(-1, fs.shape[-1]).T, 1)  # [C_s, HW]
    b = np_unit(ft.reshape(-1, ft.shape[-1]).T, 1)  # [C_t, HW]
    k = lambda x, y: np.mean(np.square(x @ y.T))
    out.append(k(b, b) + k(a, a) - 2 * k(a, b))
  return np.array(out).reshape(lead)


def maps(rng, shape, dtype=np.float64, scale=1.0):
  return (scale * rng.standard_normal(shape)).astype(dtype)


# Tests call jitted losses: one compilation per shape instead of one per
# primitive in eager mode (jit-vs-eager agreement is tested separately).
HINT = [jax.jit(functools.partial(losses.hint_loss, kind=k)) for k in ("mse", "l1", "cosine")]
AT = jax.jit(losses.attention_transfer_loss)
NST = jax.jit(losses.nst_loss)
HINT_IDS = ["mse", "l1", "cosine"]

# (function, NumPy reference, student shape, teacher shape); AT and NST are
# given different channel counts and, in some cases, spatial sizes.
CASES = {
    "hint_mse": (HINT[0], functools.partial(np_hint, kind="mse"), (3, 4, 4, 5), (3, 4, 4, 5)),
    "hint_l1": (HINT[1], functools.partial(np_hint, kind="l1"), (3, 4, 4, 5), (3, 4, 4, 5)),
    "hint_cosine": (HINT[2], functools.partial(np_hint, kind="cosine"), (3, 4, 4, 5), (3, 4, 4, 5)),
    "hint_cosine_2d": (HINT[2], functools.partial(np_hint, kind="cosine"), (3, 6), (3, 6)),
    "at_p2": (AT, np_attention, (3, 4, 4, 5), (3, 4, 4, 7)),
    "at_p3": (
        jax.jit(functools.partial(losses.attention_transfer_loss, p=3)),
        functools.partial(np_attention, p=3), (3, 4, 4, 5), (3, 2, 2, 7),
    ),
    "at_p1.5": (
        jax.jit(functools.partial(losses.attention_transfer_loss, p=1.5)),
        functools.partial(np_attention, p=1.5), (3, 4, 2, 5), (3, 2, 4, 7),
    ),
    # 4 positions, 12 channels in all: the second-moment (HW x HW) route.
    "nst_moment": (NST, np_nst, (3, 2, 2, 5), (3, 4, 4, 7)),
    # 16 positions, 5 channels in all: the Gram (C x C) route.
    "nst_gram": (NST, np_nst, (3, 4, 4, 2), (3, 8, 8, 3)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_reference(name, x64, rng):
  fn, ref, s_shape, t_shape = CASES[name]
  s, t = maps(rng, s_shape), maps(rng, t_shape)
  out = fn(s, t)
  assert out.dtype == jnp.float64
  assert out.shape == s_shape[:1]
  helpers.assert_close(out, ref(s, t), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", list(CASES))
def test_float32_and_bfloat16(name, rng):
  fn, ref, s_shape, t_shape = CASES[name]
  s, t = maps(rng, s_shape, np.float32), maps(rng, t_shape, np.float32)
  out = fn(s, t)
  assert out.dtype == jnp.float32
  helpers.assert_close(out, ref(s, t), rtol=2e-5, atol=1e-6)
  # bfloat16 inputs are computed in float32: compared with the float64
  # reference of the bf16-rounded inputs, only float32 rounding remains
  # (looser than above because of the Gram route's cancellation).
  s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  out16 = fn(s16, t16)
  assert out16.dtype == jnp.float32
  helpers.assert_close(out16, ref(np.asarray(s16), np.asarray(t16)), rtol=1e-4, atol=1e-6)


# Golden values computed by hand.
def test_hint_golden():
  s = jnp.array([[1.0, 2.0], [0.0, 1.0]])
  t = jnp.array([[1.0, 0.0], [0.0, 3.0]])
  np.testing.assert_allclose(HINT[0](s, t), [2.0, 2.0], rtol=1e-6)
  np.testing.assert_allclose(HINT[1](s, t), [1.0, 1.0], rtol=1e-6)
  # cos([1, 2], [1, 0]) = 1 / sqrt(5); cos([0, 1], [0, 3]) = 1.
  np.testing.assert_allclose(
      HINT[2](s, t), [1 - 5**-0.5, 0.0], rtol=1e-6, atol=1e-7
  )
  # An all-zero vector has cosine 0 with anything.
  z = jnp.zeros((1, 3))
  np.testing.assert_allclose(HINT[2](z, z + 1.0), [1.0])


def test_attention_golden():
  # Channel-mean of |f|^p over two positions [3, 4] vs [1, 0].
  s = jnp.array([3.0, 4.0]).reshape(1, 1, 2, 1)
  t = jnp.array([1.0, 0.0]).reshape(1, 1, 2, 1)
  # p = 1: maps [0.6, 0.8] and [1, 0]: ((0.4)^2 + 0.8^2) / 2 = 0.4.
  at_p1 = jax.jit(functools.partial(losses.attention_transfer_loss, p=1))
  np.testing.assert_allclose(at_p1(s, t), [0.4], rtol=1e-6)
  # p = 2: maps [9, 16] / sqrt(337) and [1, 0]: 1 - 9 / sqrt(337).
  np.testing.assert_allclose(
      AT(s, t), [1 - 9 / 337**0.5], rtol=1e-6
  )
  # Constant features give uniform maps whatever the channel count.
  np.testing.assert_allclose(
      AT(jnp.ones((2, 4, 4, 3)), 5 * jnp.ones((2, 2, 2, 8))),
      [0.0, 0.0],
  )


def test_nst_golden():
  # Student: one all-ones channel s = [1, 1, 1, 1] / 2; teacher: four one-hot
  # channels e_j. ||s s^T - I / 4||_F^2 = 12 / 16.
  s = jnp.ones((1, 2, 2, 1))
  t = jnp.eye(4).reshape(1, 2, 2, 4)
  np.testing.assert_allclose(NST(s, t), [0.75], rtol=1e-6)
  # Gram route (16 positions > 3 channels): the same numbers, pooled.
  s = jnp.ones((1, 4, 4, 1))
  np.testing.assert_allclose(NST(s, s), [0.0], atol=1e-7)


@pytest.mark.parametrize("name", list(CASES))
def test_grads(name, x64, rng):
  fn, _, s_shape, t_shape = CASES[name]
  s, t = maps(rng, s_shape), maps(rng, t_shape)
  check_grads(lambda a, b: fn(a, b), (s, t), order=2, modes=["rev"])


@pytest.mark.parametrize(
    "name, eager",
    [
        ("hint_cosine", functools.partial(losses.hint_loss, kind="cosine")),
        ("at_p2", losses.attention_transfer_loss),
        ("nst_gram", losses.nst_loss),
    ],
)
def test_jit_and_vmap(name, eager, rng):
  fn, _, s_shape, t_shape = CASES[name]
  s, t = maps(rng, s_shape, np.float32), maps(rng, t_shape, np.float32)
  helpers.assert_jit_matches_eager(eager, s, t)
  # vmap over the batch of single-example calls equals the batched call.
  single = jax.vmap(lambda a, b: fn(a[None], b[None])[0])(s, t)
  helpers.assert_close(single, fn(s, t), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["at_p2", "nst_moment", "nst_gram"])
def test_leading_shape_equals_loop(name, rng):
  # AT and NST accept any leading shape [..., H, W, C].
  fn, _, s_shape, t_shape = CASES[name]
  s = maps(rng, (2,) + s_shape, np.float32)
  t = maps(rng, (2,) + t_shape, np.float32)
  out = fn(s, t)
  assert out.shape == (2, s_shape[0])
  loop = np.stack([fn(s[i], t[i]) for i in range(2)])
  helpers.assert_close(out, loop, rtol=1e-6, atol=1e-7)
  helpers.assert_close(jax.vmap(fn)(s, t), loop, rtol=1e-6, atol=1e-7)
  # A single example [H, W, C] gives a scalar.
  assert fn(s[0, 0], t[0, 0]).shape == ()


# One case per code path (the other kinds and powers share it).
@pytest.mark.parametrize("name", ["hint_mse", "hint_cosine", "at_p3", "nst_moment", "nst_gram"])
def test_where_matches_slicing(name, rng):
  fn, _, s_shape, t_shape = CASES[name]
  s, t = maps(rng, s_shape, np.float32), maps(rng, t_shape, np.float32)
  where = np.array([True, False, True])
  helpers.assert_where_matches_slicing(fn, (s, t), where)
  # Whatever a dropped example holds reaches neither value nor gradient.
  s[1], t[1] = np.nan, np.inf
  masked = jax.jit(jax.value_and_grad(
      lambda a, b: jnp.sum(fn(a, b, where=jnp.asarray(where))), argnums=(0, 1)
  ))
  value, grads = masked(s, t)
  assert np.isfinite(value)
  for g in grads:
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(g[1], 0.0)


def test_where_on_leading_shape(rng):
  s = maps(rng, (2, 3, 2, 2, 4), np.float32)
  t = maps(rng, (2, 3, 2, 2, 5), np.float32)
  where = np.array([[True, False, True], [False, True, True]])
  for fn in (AT, NST):
    helpers.assert_where_matches_slicing(fn, (s, t), where)
    # Broadcasting: one mask per leading row.
    out = fn(s, t, where=jnp.array([[True], [False]]))
    np.testing.assert_array_equal(out[1], 0.0)


def test_pooling_route_equals_manually_pooled_input(rng):
  s_big = maps(rng, (2, 8, 8, 3), np.float32)
  t = maps(rng, (2, 4, 4, 6), np.float32)
  s_pooled = np_pool(s_big, (4, 4)).astype(np.float32)
  for fn in (AT, NST):
    helpers.assert_close(fn(s_big, t), fn(s_pooled, t), rtol=1e-6, atol=1e-7)
    # The teacher is pooled when it is the larger one.
    helpers.assert_close(fn(t, s_big), fn(t, s_pooled), rtol=1e-6, atol=1e-7)
  # Per axis: [4, 2] and [2, 4] are both pooled to [2, 2].
  a, b = maps(rng, (2, 4, 2, 3), np.float32), maps(rng, (2, 2, 4, 3), np.float32)
  a2 = np_pool(a, (2, 2)).astype(np.float32)
  b2 = np_pool(b, (2, 2)).astype(np.float32)
  helpers.assert_close(
      AT(a, b), AT(a2, b2),
      rtol=1e-6, atol=1e-7,
  )


ALL_FNS = [*HINT, AT, NST]
ALL_IDS = [*HINT_IDS, "at", "nst"]
# Jitted value-and-gradient of the summed loss: the helpers' eager version
# recompiles every primitive of the backward pass for each shape and dtype.
VALUE_AND_GRAD = [
    jax.jit(jax.value_and_grad(lambda a, b, fn=fn: jnp.sum(fn(a, b)), argnums=(0, 1)))
    for fn in ALL_FNS
]


def assert_finite_value_and_grad(index, s, t):
  value, grads = VALUE_AND_GRAD[index](s, t)
  assert np.isfinite(value), value
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g, np.float64))), g


@pytest.mark.parametrize("index", range(len(ALL_FNS)), ids=ALL_IDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_extreme_and_degenerate_inputs(index, dtype, rng):
  shape = (3, 2, 2, 4)
  big = jnp.asarray(maps(rng, shape, np.float32, scale=1e4), dtype)
  other = jnp.asarray(maps(rng, shape, np.float32, scale=1e4), dtype)
  assert_finite_value_and_grad(index, big, other)
  # All-zero features (all-zero channel vectors, attention maps and channel
  # columns) keep a finite gradient.
  zeros = jnp.zeros(shape, dtype)
  assert_finite_value_and_grad(index, zeros, other)
  assert_finite_value_and_grad(index, zeros, zeros)
  # One zero example, one zero pixel, in otherwise normal features.
  partly = np.asarray(maps(rng, shape, np.float32))
  partly[0] = 0.0
  partly[1, 0, 0] = 0.0
  assert_finite_value_and_grad(index, jnp.asarray(partly, dtype), other)


def test_zero_features_second_order_grads(x64, rng):
  s = maps(rng, (2, 2, 2, 3))
  s[0] = 0.0
  t = maps(rng, (2, 2, 2, 3))
  for fn in ALL_FNS:
    hessian = jax.jit(jax.hessian(lambda a: jnp.sum(fn(a, t))))(s)
    assert np.all(np.isfinite(hessian))


def test_errors():
  s = jnp.ones((2, 4, 4, 3))
  with pytest.raises(ValueError, match="jaxkd.adaptors"):
    losses.hint_loss(s, jnp.ones((2, 4, 4, 5)))
  with pytest.raises(ValueError, match="`kind`"):
    losses.hint_loss(s, s, kind="l2")
  with pytest.raises(TypeError, match="student_features"):
    losses.hint_loss(jnp.ones((2, 3), jnp.int32), jnp.ones((2, 3)))
  with pytest.raises(TypeError, match="teacher_features"):
    losses.nst_loss(s, jnp.ones((2, 4, 4, 3), jnp.int32))
  with pytest.raises(ValueError, match="student_features.*at least 2"):
    losses.hint_loss(jnp.ones(3), jnp.ones(3))
  with pytest.raises(ValueError, match="teacher_features.*at least 3"):
    losses.attention_transfer_loss(s, jnp.ones((2, 16)))
  with pytest.raises(ValueError, match="leading"):
    losses.nst_loss(s, jnp.ones((3, 4, 4, 3)))
  with pytest.raises(ValueError, match=r"\(4, 4\).*\(3, 3\)"):
    losses.attention_transfer_loss(s, jnp.ones((2, 3, 3, 3)))
  with pytest.raises(ValueError, match=r"\(4, 4\).*\(8, 6\)"):
    losses.nst_loss(s, jnp.ones((2, 8, 6, 3)))
  with pytest.raises(ValueError, match="`p`"):
    losses.attention_transfer_loss(s, s, p=0)
  with pytest.raises(TypeError, match="`where`"):
    losses.hint_loss(s, s, where=jnp.ones(2))
  with pytest.raises(ValueError, match="`where`"):
    losses.attention_transfer_loss(s, s, where=jnp.ones(3, bool))


SEEDS = st.integers(0, 2**32 - 1)


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(seed=SEEDS, scale=st.floats(0.01, 100.0))
def test_properties(seed, scale):
  rng = np.random.default_rng(seed)
  s = maps(rng, (2, 2, 2, 3), np.float32)
  t = maps(rng, (2, 2, 2, 3), np.float32)
  channel_scale = rng.uniform(0.1, 10.0, (3,)).astype(np.float32)
  for fn in ALL_FNS:
    value = np.asarray(fn(s, t))
    assert np.all(value >= -1e-6)  # Gram-route NST may round below 0.
    np.testing.assert_allclose(fn(s, s), 0.0, atol=1e-6)
  # Positive rescaling of the features leaves the normalised maps unchanged.
  for fn in (HINT[2], AT, NST):
    helpers.assert_close(fn(scale * s, t), fn(s, t), rtol=1e-4, atol=1e-6)
  # NST normalises each channel separately: per-channel scales drop out.
  helpers.assert_close(
      NST(s * channel_scale, t), NST(s, t), rtol=1e-4, atol=1e-6
  )
  # Permuting channels changes neither AT nor NST.
  perm = rng.permutation(3)
  for fn in (AT, NST):
    helpers.assert_close(fn(s[..., perm], t), fn(s, t), rtol=1e-5, atol=1e-6)
