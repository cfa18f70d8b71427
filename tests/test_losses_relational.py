"""Tests of the relational (batch-level) losses against float64 NumPy formulas."""

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


# Independent float64 references, written from the formulas with loops where
# that is clearer than vectorised code.
def np_flat(x):
  x = np.asarray(x, np.float64)
  return x.reshape(x.shape[0], -1)


def np_unit(x, axis):
  norm = np.sqrt(np.sum(np.square(x), axis=axis, keepdims=True))
  return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def np_smooth_l1(x):
  return np.where(np.abs(x) < 1, 0.5 * x * x, np.abs(x) - 0.5)


def np_sp(student, teacher):
  s, t = np_flat(student), np_flat(teacher)
  gs, gt = np_unit(s @ s.T, 1), np_unit(t @ t.T, 1)
  return np.sum(np.square(gs - gt)) / len(s) ** 2


def np_rkd_distance(student, teacher):
  def normalized(x):
    x = np_flat(x)
    b = len(x)
    d = np.array([[np.linalg.norm(x[i] - x[j]) for j in range(b)] for i in range(b)])
    mean = d[~np.eye(b, dtype=bool)].mean() if b > 1 else 0.0
    return d / mean if mean > 0 else np.zeros_like(d)

  # Distinct pairs only (the diagonal is 0 on both sides), divided by B^2.
  return np.sum(np_smooth_l1(normalized(student) - normalized(teacher))) / len(student) ** 2


def np_rkd_angle(student, teacher):
  def cosines(x):
    x = np_flat(x)
    b = len(x)
    out = np.zeros((b, b, b))
    for i in range(b):
      for j in range(b):
        for k in range(b):
          u, w = x[i] - x[j], x[k] - x[j]
          nu, nw = np.linalg.norm(u), np.linalg.norm(w)
          out[i, j, k] = u @ w / (nu * nw) if nu > 0 and nw > 0 else 0.0
    return out

  return np.mean(np_smooth_l1(cosines(student) - cosines(teacher)))


def np_pkt(student, teacher):
  def probabilities(x):
    unit = np_unit(np_flat(x), 1)
    affinity = (1 + unit @ unit.T) / 2
    return affinity / affinity.sum(axis=1, keepdims=True)

  ps, pt = probabilities(student), probabilities(teacher)
  with np.errstate(divide="ignore", invalid="ignore"):
    terms = np.where(pt > 0, pt * (np.log(pt) - np.log(ps)), 0.0)
  return np.mean(terms)


# The published PyTorch formulas (RepDistiller's RKD and PKT), re-expressed in
# NumPy: Gram-based distances with an eps floor, mean over positive
# distances, and an eps inside PKT's log. Ours match them to their eps.
def published_rkd_distance(student, teacher, eps=1e-12):
  def pdist(x):
    x = np_flat(x)
    sq = np.sum(x * x, axis=1)
    d = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, eps))
    np.fill_diagonal(d, 0.0)
    return d / d[d > 0].mean()

  return np.mean(np_smooth_l1(pdist(student) - pdist(teacher)))


def published_pkt(student, teacher, eps=1e-7):
  def probabilities(x):
    x = np_flat(x)
    x = x / (np.sqrt(np.sum(x * x, axis=1, keepdims=True)) + eps)
    affinity = (x @ x.T + 1) / 2
    return affinity / affinity.sum(axis=1, keepdims=True)

  ps, pt = probabilities(student), probabilities(teacher)
  return np.mean(pt * np.log((pt + eps) / (ps + eps)))


# Tests call jitted losses: one compilation per shape instead of one per
# primitive in eager mode (jit-vs-eager agreement is tested separately).
EAGER = {
    "sp": losses.similarity_preserving_loss,
    "rkd_distance": losses.rkd_distance_loss,
    "rkd_angle": losses.rkd_angle_loss,
    "pkt": losses.pkt_loss,
}
JIT = {name: jax.jit(fn) for name, fn in EAGER.items()}
# Jitted value-and-gradient: the helpers' eager version recompiles every
# primitive of the backward pass for each new shape and dtype.
VALUE_AND_GRAD = {
    name: jax.jit(jax.value_and_grad(fn, argnums=(0, 1))) for name, fn in JIT.items()
}


def assert_finite_value_and_grad(name, s, t):
  value, grads = VALUE_AND_GRAD[name](s, t)
  assert np.isfinite(value), value
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g, np.float64))), g


REF = {
    "sp": np_sp,
    "rkd_distance": np_rkd_distance,
    "rkd_angle": np_rkd_angle,
    "pkt": np_pkt,
}
NAMES = list(EAGER)


def pair(rng, dtype=np.float64, batch=5, scale=1.0):
  # Different feature sizes; the student has a trailing shape to flatten.
  student = (scale * rng.standard_normal((batch, 2, 3))).astype(dtype)
  teacher = (scale * rng.standard_normal((batch, 4))).astype(dtype)
  return student, teacher


@pytest.mark.parametrize("name", NAMES)
def test_matches_float64_reference(name, x64, rng):
  s, t = pair(rng)
  out = JIT[name](s, t)
  assert out.shape == () and out.dtype == jnp.float64
  helpers.assert_close(out, REF[name](s, t), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", NAMES)
def test_float32_and_bfloat16(name, rng):
  s, t = pair(rng, np.float32)
  out = JIT[name](s, t)
  assert out.dtype == jnp.float32
  helpers.assert_close(out, REF[name](s, t), rtol=2e-5, atol=1e-7)
  # bfloat16 inputs are computed in float32: compared with the float64
  # reference of the bf16-rounded inputs only float32 rounding remains.
  s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  out16 = JIT[name](s16, t16)
  assert out16.dtype == jnp.float32
  helpers.assert_close(out16, REF[name](np.asarray(s16), np.asarray(t16)), rtol=1e-4, atol=1e-7)


def test_matches_published_reductions(x64, rng):
  s, t = pair(rng, batch=6)
  helpers.assert_close(JIT["rkd_distance"](s, t), published_rkd_distance(s, t), rtol=1e-6)
  # The published eps shifts PKT by O(eps) only.
  helpers.assert_close(JIT["pkt"](s, t), published_pkt(s, t), rtol=1e-5)


# Golden values computed by hand.
def test_sp_golden():
  # G_S = I; G_T = ones, rows normalised to 1/sqrt(2):
  # (2 (1 - 1/sqrt2)^2 + 2 / 2) / 4 = 1 - sqrt(2) / 2.
  s = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  t = jnp.array([[1.0, 0.0], [1.0, 0.0]])
  np.testing.assert_allclose(JIT["sp"](s, t), 1 - 2**0.5 / 2, rtol=1e-6)


def test_rkd_distance_golden():
  # B = 2: any two distinct points normalise to distance 1.
  s = jnp.array([[0.0, 0.0], [5.0, 1.0]])
  t = jnp.array([[1.0, 1.0], [-2.0, 3.0]])
  np.testing.assert_allclose(JIT["rkd_distance"](s, t), 0.0, atol=1e-7)
  # B = 2 with coinciding student points: mean 0, distances 0; each of the
  # 2 distinct pairs costs smooth_l1(0 - 1) = 0.5, over B^2 = 4 entries.
  np.testing.assert_allclose(JIT["rkd_distance"](jnp.ones((2, 2)), t), 0.25, rtol=1e-6)
  # 3-4-5 triangle (mean 4: 0.75, 1, 1.25) vs equilateral (1, 1, 1):
  # 4 pairs cost 0.5 * 0.25^2, over 9 entries = 1 / 72.
  s = jnp.array([[0.0, 0.0], [3.0, 0.0], [3.0, 4.0]])
  t = jnp.array([[0.0, 0.0], [2.0, 0.0], [1.0, 3.0**0.5]])
  np.testing.assert_allclose(JIT["rkd_distance"](s, t), 1 / 72, rtol=1e-6)


def test_rkd_angle_golden():
  # Equilateral (cos 60 = 0.5 at every vertex) vs collinear 0, 1, 2 (cos 1,
  # -1, 1 at the vertices). Triples with i = k != j have cosine 1 on both
  # sides, degenerate ones 0. Per vertex 2 ordered triples differ by -0.5,
  # 1.5, -0.5: 2 * (0.125 + 1 + 0.125) over 27 entries.
  s = jnp.array([[0.0, 0.0], [2.0, 0.0], [1.0, 3.0**0.5]])
  t = jnp.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
  np.testing.assert_allclose(JIT["rkd_angle"](s, t), 2.5 / 27, rtol=1e-6)


def test_pkt_golden():
  # Teacher antipodal: affinities [[1, 0], [0, 1]], so p_T = I and the zero
  # entries contribute 0 log 0 = 0 exactly. Student orthogonal: affinities
  # [[1, 1/2], [1/2, 1]], p_S rows [2/3, 1/3]. Loss 2 log(3/2) / 4.
  s = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  t = jnp.array([[1.0, 0.0], [-1.0, 0.0]])
  np.testing.assert_allclose(JIT["pkt"](s, t), np.log(1.5) / 2, rtol=1e-6)
  # Antipodal student under a positive teacher affinity: infinite KL.
  assert JIT["pkt"](t, s) == np.inf


@pytest.mark.parametrize("name", NAMES)
def test_grads(name, x64, rng):
  s, t = pair(rng, batch=4)
  check_grads(JIT[name], (s, t), order=2, modes=["rev"])


@pytest.mark.parametrize("name", NAMES)
def test_jit_and_vmap(name, rng):
  s, t = pair(rng, np.float32)
  helpers.assert_jit_matches_eager(EAGER[name], s, t)
  # vmap over a stack of batches equals a loop over them.
  stack_s = np.stack([s, 2 * s[::-1]])
  stack_t = np.stack([t, t[::-1] - 1])
  loop = [JIT[name](stack_s[i], stack_t[i]) for i in range(2)]
  helpers.assert_close(jax.vmap(JIT[name])(stack_s, stack_t), np.stack(loop), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_where_matches_slicing(name, rng):
  fn = JIT[name]
  s, t = pair(rng, np.float32)
  where = np.array([True, False, True, True, False])
  sliced = fn(s[where], t[where])
  helpers.assert_close(fn(s, t, where=where), sliced, rtol=1e-6, atol=1e-7)
  # Whatever the dropped rows hold reaches neither value nor gradient.
  s[1], t[4] = np.nan, np.inf
  value_and_grad = VALUE_AND_GRAD[name]
  value, grads = value_and_grad(s, t, where=where)
  helpers.assert_close(value, sliced, rtol=1e-6, atol=1e-7)
  _, sliced_grads = value_and_grad(s[where], t[where])
  for g, g_sliced in zip(grads, sliced_grads):
    np.testing.assert_array_equal(g[~where], 0.0)
    helpers.assert_close(g[where], g_sliced, rtol=1e-5, atol=1e-7)
  # No example kept: 0 with a zero gradient; one example kept: 0.
  none = np.zeros(5, bool)
  value, grads = value_and_grad(s, t, where=none)
  assert value == 0.0
  for g in grads:
    np.testing.assert_array_equal(g, 0.0)
  one = np.eye(5, dtype=bool)[0]
  np.testing.assert_allclose(fn(s, t, where=one), 0.0, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_extreme_and_degenerate_inputs(name, dtype, rng):
  s, t = pair(rng, np.float32, scale=1e4)
  assert_finite_value_and_grad(name, jnp.asarray(s, dtype), jnp.asarray(t, dtype))
  # Duplicate rows (zero differences) and all-zero rows (zero norms).
  s, t = pair(rng, np.float32)
  s[1] = s[0]
  t[3] = t[2]
  s[4] = 0.0
  t[0] = 0.0
  assert_finite_value_and_grad(name, jnp.asarray(s, dtype), jnp.asarray(t, dtype))
  # Fully degenerate batches: all zero, all equal.
  assert_finite_value_and_grad(name, jnp.zeros(s.shape, dtype), jnp.zeros(t.shape, dtype))
  assert_finite_value_and_grad(name, jnp.ones(s.shape, dtype), jnp.asarray(t, dtype))


@pytest.mark.parametrize("name", NAMES)
def test_degenerate_second_order_grads(name, x64, rng):
  s, t = pair(rng)
  s[1] = s[0]
  s[4] = 0.0
  t[0] = 0.0
  hessian = jax.jit(jax.hessian(JIT[name]))(s, t)
  assert np.all(np.isfinite(hessian))
  # The value at duplicates still equals the reference.
  helpers.assert_close(JIT[name](s, t), REF[name](s, t), rtol=1e-12, atol=1e-15)


def test_errors():
  x = jnp.ones((4, 3))
  for name, fn in EAGER.items():
    prefix = "student_embeddings" if name.startswith("rkd") else "student_features"
    with pytest.raises(ValueError, match="same batch size"):
      fn(x, jnp.ones((5, 3)))
    with pytest.raises(ValueError, match=f"{prefix}.*at least 2"):
      fn(jnp.ones(4), x)
    with pytest.raises(TypeError, match=prefix):
      fn(jnp.ones((4, 3), jnp.int32), x)
    with pytest.raises(TypeError, match="`where`"):
      fn(x, x, where=jnp.ones(4))
    with pytest.raises(ValueError, match="`where`"):
      fn(x, x, where=jnp.ones(3, bool))


def random_rotation(rng, dim):
  q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
  return (q * np.sign(np.diag(r))).astype(np.float32)


SEEDS = st.integers(0, 2**32 - 1)


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(seed=SEEDS, scale=st.floats(0.01, 100.0))
def test_properties(seed, scale):
  rng = np.random.default_rng(seed)
  s = rng.standard_normal((5, 3)).astype(np.float32)
  t = rng.standard_normal((5, 4)).astype(np.float32)
  rotation, shift = random_rotation(rng, 3), rng.standard_normal(3).astype(np.float32)
  for name in NAMES:
    fn = JIT[name]
    value = fn(s, t)
    assert value >= 0
    np.testing.assert_allclose(fn(s, s), 0.0, atol=1e-6)
    # Scaling either side and rotating the features change no relation.
    helpers.assert_close(fn(scale * s, t), value, rtol=1e-4, atol=1e-6)
    helpers.assert_close(fn(s, scale * t), value, rtol=1e-4, atol=1e-6)
    helpers.assert_close(fn(s @ rotation, t), value, rtol=1e-4, atol=1e-6)
    if name.startswith("rkd"):
      # Distances and angles are also translation invariant.
      helpers.assert_close(fn(s @ rotation + shift, t), value, rtol=1e-4, atol=1e-6)
    if name == "pkt":
      # Cosines ignore a positive scale per example.
      per_row = rng.uniform(0.1, 10.0, (5, 1)).astype(np.float32)
      helpers.assert_close(fn(per_row * s, t), value, rtol=1e-4, atol=1e-6)
    # The batch order does not matter.
    perm = rng.permutation(5)
    helpers.assert_close(fn(s[perm], t[perm]), value, rtol=1e-5, atol=1e-7)
