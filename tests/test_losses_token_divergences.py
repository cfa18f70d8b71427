"""Token-level divergences for language models: skew KLs, normalised JSD, sparse KL.

Inputs are per-token distributions ``[batch, length, vocab]`` with a token
mask ``where``. References are written here in NumPy extended precision
(see tests/test_losses_extreme_temperature.py for why and for the accuracy
criterion, reused here).
"""

from __future__ import annotations

import functools

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from jaxkd import losses
from tests import helpers
from tests.test_losses_extreme_temperature import (
    REF, SCALES, TEMPERATURES, assert_accurate, np_kl_and_bound,
    np_log_softmax, np_scaled, ref_kl, ref_reverse_kl,
)

B, L, V, K = 2, 5, 12, 4
EPS32 = np.finfo(np.float32).eps


# ---------------------------------------------------------------------------
# References.


def ref_skew(student, teacher, temperature, alpha, reverse=False):
  """KL(r || alpha r + (1 - alpha) o), r the teacher (or the student)."""
  log_t = np_log_softmax(teacher, temperature)
  log_s = np_log_softmax(student, temperature)
  log_r, log_o = (log_s, log_t) if reverse else (log_t, log_s)
  with np.errstate(divide="ignore"):
    log_m = np.logaddexp(
        np.log(REF(alpha)) + log_r, np.log1p(-REF(alpha)) + log_o
    )
  return np_kl_and_bound(log_r, log_m)


def ref_jsd_normalized(student, teacher, temperature, beta):
  log_t = np_log_softmax(teacher, temperature)
  log_s = np_log_softmax(student, temperature)
  b = REF(beta)
  with np.errstate(divide="ignore"):
    log_m = np.logaddexp(np.log(b) + log_t, np.log1p(-b) + log_s)
  kl_t, bound_t = np_kl_and_bound(log_t, log_m)
  kl_s, bound_s = np_kl_and_bound(log_s, log_m)
  scale = b * (1 - b)
  return (b * kl_t + (1 - b) * kl_s) / scale, (bound_t + bound_s) / scale


def np_lse(x):
  x = np.asarray(x, REF)
  if x.size == 0 or np.all(x == -np.inf):
    return REF(-np.inf)
  top = np.max(x)
  return top + np.log(np.sum(np.exp(x - top)))


def ref_sparse(student, log_probs, indices, temperature, tail):
  """Per token, class axis last, from the definitions in the docstring."""
  shape = student.shape[:-1]
  student = np.asarray(student, REF).reshape(-1, student.shape[-1])
  log_probs = np.asarray(log_probs, REF).reshape(-1, log_probs.shape[-1])
  indices = np.asarray(indices).reshape(-1, indices.shape[-1])
  t = REF(temperature)
  values, bounds = [], []
  for z, ell, idx in zip(student, log_probs, indices):
    used = ell != -np.inf
    ell, idx = ell[used], idx[used]
    log_q = z / t - np_lse(z / t)
    a = ell / t
    if tail == "renormalize":
      log_p = a - np_lse(a)
      log_o = z[idx] / t - np_lse(z[idx] / t)
    elif tail == "drop":
      log_p = a - np_lse(a)
      log_o = log_q[idx]
    else:
      rest = np.ones(z.shape, bool)
      rest[idx] = False
      tail_mass = 1 - np.sum(np.exp(ell))
      teacher_tail = (
          np.log(tail_mass) / t if tail_mass > 2 * len(used) * EPS32
          else -np.inf
      )
      a = np.append(a, teacher_tail)
      log_p = a - np_lse(a)
      log_o = np.append(log_q[idx], np_lse(log_q[rest]))
    value, bound = np_kl_and_bound(log_p[None], log_o[None])
    values.append(value[0])
    bounds.append(bound[0])
  return np.array(values).reshape(shape), np.array(bounds).reshape(shape)


# ---------------------------------------------------------------------------
# Inputs: token distributions, half of them near the teacher's.


def token_pair(scale, seed=0, shape=(B, L, V)):
  rng = np.random.default_rng(seed)
  teacher = scale * rng.standard_normal(shape)
  student = scale * rng.standard_normal(shape)
  student[0] = teacher[0] * (1 + 1e-2 * rng.standard_normal(shape[1:]))
  return student.astype(np.float32), teacher.astype(np.float32)


def top_k(teacher, k):
  """The cache: float32 log-probabilities (at T = 1) and indices of the top k."""
  log_p = np_log_softmax(teacher, 1.0)
  order = np.argsort(-log_p, axis=-1)[..., :k]
  return (
      np.take_along_axis(log_p, order, -1).astype(np.float32),
      order.astype(np.int32),
  )


DENSE_CASES = {
    "skew_kl_divergence": (
        jax.jit(lambda s, t, T: losses.skew_kl_divergence(
            s, t, alpha=0.1, temperature=T)),
        functools.partial(ref_skew, alpha=0.1),
    ),
    "skew_reverse_kl_divergence": (
        jax.jit(lambda s, t, T: losses.skew_reverse_kl_divergence(
            s, t, alpha=0.1, temperature=T)),
        functools.partial(ref_skew, alpha=0.1, reverse=True),
    ),
    "jensen_shannon_divergence_normalized": (
        jax.jit(lambda s, t, T: losses.jensen_shannon_divergence(
            s, t, beta=0.3, temperature=T, normalize=True)),
        functools.partial(ref_jsd_normalized, beta=0.3),
    ),
}

_sparse = jax.jit(
    lambda s, lp, i, T, tail: losses.sparse_kl_divergence(
        s, lp, i, temperature=T, tail=tail),
    static_argnames=("tail",),
)
TAILS = ("bucket", "renormalize", "drop")


@pytest.mark.parametrize("name", sorted(DENSE_CASES))
def test_dense_token_divergences_float32_match_reference(name):
  fn, reference = DENSE_CASES[name]
  for scale in SCALES:
    student, teacher = token_pair(scale)
    for temperature in TEMPERATURES:
      actual = fn(student, teacher, jnp.float32(temperature))
      assert actual.dtype == jnp.float32 and actual.shape == (B, L)
      assert_accurate(actual, reference(student, teacher, temperature), 1.0)


@pytest.mark.parametrize("tail", TAILS)
def test_sparse_kl_float32_matches_reference(tail):
  for scale in SCALES:
    student, teacher = token_pair(scale, seed=1)
    log_probs, indices = top_k(teacher, K)
    for temperature in TEMPERATURES:
      actual = _sparse(student, log_probs, indices, jnp.float32(temperature),
                       tail)
      assert actual.dtype == jnp.float32 and actual.shape == (B, L)
      assert_accurate(
          actual,
          ref_sparse(student, log_probs, indices, temperature, tail), 1.0,
      )


# ---------------------------------------------------------------------------
# Limits and identities.


def test_skew_endpoints_are_exact():
  student, teacher = token_pair(3.0, seed=2)
  kl = losses.kl_divergence(student, teacher, temperature=2.0)
  rkl = losses.reverse_kl_divergence(student, teacher, temperature=2.0)
  # Same formula, separately compiled: equal to float32 rounding.
  helpers.assert_close(
      losses.skew_kl_divergence(student, teacher, alpha=0.0, temperature=2.0),
      kl, rtol=1e-6,
  )
  helpers.assert_close(
      losses.skew_reverse_kl_divergence(
          student, teacher, alpha=0.0, temperature=2.0),
      rkl, rtol=1e-6,
  )
  for fn in (losses.skew_kl_divergence, losses.skew_reverse_kl_divergence):
    np.testing.assert_array_equal(fn(student, teacher, alpha=1.0), 0.0)
  # The skew KL is bounded by -log(alpha), even where the KL is infinite.
  student[0, 0, 3] = -np.inf
  skew = losses.skew_kl_divergence(student, teacher, alpha=0.1)
  assert np.all(np.asarray(skew) <= -np.log(0.1) + 1e-6)
  assert losses.kl_divergence(student, teacher)[0, 0] == np.inf


def test_normalized_jsd_endpoints_are_the_kls():
  student, teacher = token_pair(3.0, seed=3)
  jsd = functools.partial(
      losses.jensen_shannon_divergence, student, teacher, normalize=True
  )
  helpers.assert_close(
      jsd(beta=0.0), losses.kl_divergence(student, teacher), rtol=1e-6)
  helpers.assert_close(
      jsd(beta=1.0), losses.reverse_kl_divergence(student, teacher),
      rtol=1e-6)
  # normalize=False is the plain JSD: 0 at the ends, the scaled value inside.
  plain = losses.jensen_shannon_divergence(student, teacher, beta=0.3)
  helpers.assert_close(jsd(beta=0.3) * 0.3 * 0.7, plain, rtol=1e-6)
  with pytest.raises(TypeError, match="normalize"):
    losses.jensen_shannon_divergence(student, teacher, normalize=1)


# Logits in [-3, 3] keep the chi-square divergences (the slopes at the ends)
# below ~2500, so the smallest weights below are in the linear regime.
token_logits = hnp.arrays(
    np.float64, (3, 6), elements=st.floats(-3, 3),
)


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(token_logits, token_logits)
def test_skew_kl_tends_to_kl_as_alpha_tends_to_zero(student, teacher):
  with jax.enable_x64(True):
    for fn, plain in (
        (losses.skew_kl_divergence, losses.kl_divergence),
        (losses.skew_reverse_kl_divergence, losses.reverse_kl_divergence),
    ):
      limit = np.asarray(plain(student, teacher))
      alphas = (1e-5, 1e-7, 1e-9)
      values = [np.asarray(fn(student, teacher, alpha=a)) for a in alphas]
      gaps = [np.abs(x - limit) for x in values]
      # Linear convergence (the derivative at 0 is minus a chi-square
      # divergence, so the gap shrinks 100-fold per step) and monotone:
      # larger alpha, smaller divergence.
      assert np.all(gaps[2] <= 1e-2 * gaps[0] + 1e-12 * (1 + limit)), gaps
      assert np.all(values[0] <= values[1] + 1e-12)
      assert np.all(values[1] <= values[2] + 1e-12)
      assert np.all(values[2] <= limit + 1e-12)


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(token_logits, token_logits)
def test_normalized_jsd_tends_to_the_kls_at_the_ends(student, teacher):
  with jax.enable_x64(True):
    forward = np.asarray(losses.kl_divergence(student, teacher))
    reverse = np.asarray(losses.reverse_kl_divergence(student, teacher))
    for limit, betas in ((forward, (1e-5, 1e-7, 1e-9)),
                         (reverse, (1 - 1e-5, 1 - 1e-7, 1 - 1e-9))):
      gaps = [
          np.abs(np.asarray(losses.jensen_shannon_divergence(
              student, teacher, beta=b, normalize=True)) - limit)
          for b in betas
      ]
      assert np.all(gaps[2] <= 1e-2 * gaps[0] + 1e-10 * (1 + limit)), gaps


@pytest.mark.parametrize("tail", TAILS)
def test_sparse_with_the_whole_vocabulary_is_the_dense_kl(tail):
  rng = np.random.default_rng(4)
  student, teacher = token_pair(3.0, seed=4)
  log_probs, indices = top_k(teacher, V)
  # Any order of the slots.
  perm = rng.permutation(V)
  log_probs, indices = log_probs[..., perm], indices[..., perm]
  dense_teacher = np_log_softmax(teacher, 1.0).astype(np.float32)
  for temperature in (0.5, 1.0, 8.0):
    helpers.assert_close(
        losses.sparse_kl_divergence(
            student, log_probs, indices, temperature=temperature, tail=tail),
        losses.kl_divergence(student, dense_teacher, temperature=temperature),
        rtol=2e-5, atol=1e-7,
    )


def test_sparse_unused_slots_and_tail_identities():
  student, teacher = token_pair(2.0, seed=5)
  log_probs, indices = top_k(teacher, K + 2)
  padded_lp = log_probs.copy()
  padded_lp[..., K:] = -np.inf  # unused slots, whatever index they hold
  padded_idx = indices.copy()
  padded_idx[..., K:] = 0
  for tail in TAILS:
    helpers.assert_close(
        losses.sparse_kl_divergence(student, padded_lp, padded_idx, tail=tail),
        losses.sparse_kl_divergence(
            student, log_probs[..., :K], indices[..., :K], tail=tail),
        rtol=1e-6,
    )
  # drop = renormalize + (-log of the student's kept mass).
  log_q = np_log_softmax(student, 1.0)
  kept = np.take_along_axis(log_q, indices[..., :K], -1)
  minus_log_mass = -np.log(np.exp(kept).sum(-1))
  helpers.assert_close(
      losses.sparse_kl_divergence(
          student, log_probs[..., :K], indices[..., :K], tail="drop"),
      losses.sparse_kl_divergence(
          student, log_probs[..., :K], indices[..., :K], tail="renormalize")
      + minus_log_mass.astype(np.float64),
      rtol=1e-5,
  )


def test_sparse_errors():
  student, teacher = token_pair(1.0, seed=6)
  log_probs, indices = top_k(teacher, K)
  call = functools.partial(losses.sparse_kl_divergence, student)
  with pytest.raises(ValueError, match="tail"):
    call(log_probs, indices, tail="other")
  with pytest.raises(ValueError, match="k = 13"):
    call(np.zeros((B, L, V + 1), np.float32), np.zeros((B, L, V + 1), np.int32))
  with pytest.raises(ValueError, match="same shape"):
    call(log_probs, indices[..., :-1])
  with pytest.raises(ValueError, match="teacher_log_probs"):
    call(log_probs[:, :-1], indices[:, :-1])
  with pytest.raises(TypeError, match="teacher_indices"):
    call(log_probs, indices.astype(np.float32))
  for bad in (V, -1, 1000):
    wrong = indices.copy()
    wrong[1, 2, 0] = bad
    with pytest.raises(ValueError, match="teacher_indices"):
      call(log_probs, wrong)
    traced = np.asarray(_sparse(student, log_probs, wrong, 1.0, "bucket"))
    assert np.isnan(traced[1, 2])
    assert np.sum(np.isnan(traced)) == 1
  repeated = indices.copy()
  repeated[0, 1, 1] = repeated[0, 1, 0]
  with pytest.raises(ValueError, match="repeat"):
    call(log_probs, repeated)
  traced = np.asarray(_sparse(student, log_probs, repeated, 1.0, "drop"))
  assert np.isnan(traced[0, 1]) and np.sum(np.isnan(traced)) == 1
  # Bad indices of masked tokens are ignored.
  where = np.ones((B, L), bool)
  where[0, 1] = False
  out = losses.sparse_kl_divergence(student, log_probs, repeated, where=where)
  assert np.all(np.isfinite(np.asarray(out)))


# ---------------------------------------------------------------------------
# The shared contract: -inf vocabulary padding, extreme logits, masks, dtypes,
# gradients, jit, where, axis.


def _sparse_call(tail):
  def fn(student, teacher, **kwargs):
    axis = kwargs.pop("axis", -1)
    log_probs, indices = top_k(np.moveaxis(np.asarray(teacher), axis, -1), K)
    return losses.sparse_kl_divergence(
        student, np.moveaxis(log_probs, -1, axis).astype(teacher.dtype),
        np.moveaxis(indices, -1, axis), axis=axis, **kwargs)
  return fn


CONTRACT = {
    "skew_kl_divergence": losses.skew_kl_divergence,
    "skew_reverse_kl_divergence": losses.skew_reverse_kl_divergence,
    "jsd_normalized": functools.partial(
        losses.jensen_shannon_divergence, beta=0.2, normalize=True),
    "sparse_bucket": _sparse_call("bucket"),
    "sparse_renormalize": _sparse_call("renormalize"),
    "sparse_drop": _sparse_call("drop"),
}


def _tail_of(name):
  return name.split("_")[1] if name.startswith("sparse") else None


def _contract_fn(name):
  fn = CONTRACT[name]
  tail = _tail_of(name)
  if tail is None:
    return fn
  return functools.partial(fn, tail=tail)


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_padded_vocab_and_extreme_logits_finite(name):
  fn = _contract_fn(name)
  student, teacher = token_pair(3.0, seed=7)
  student[..., -3:] = -np.inf
  teacher[..., -3:] = -np.inf
  if name.startswith("sparse"):
    # The cache holds the teacher's log-probs; grads w.r.t. the student.
    log_probs, indices = top_k(teacher, K)
    tail = _tail_of(name)
    value, grad = jax.value_and_grad(lambda s: jnp.sum(
        losses.sparse_kl_divergence(s, log_probs, indices, tail=tail)))(
            student)
    grads = (grad,)
  else:
    value, grads = jax.value_and_grad(
        lambda s, t: jnp.sum(fn(s, t)), argnums=(0, 1))(student, teacher)
  assert np.isfinite(value)
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_array_equal(np.asarray(g)[..., -3:], 0.0)
  big_s, big_t = token_pair(1e4, seed=8)
  if name.startswith("sparse"):
    log_probs, indices = top_k(big_t, K)
    tail = _tail_of(name)
    helpers.assert_finite_value_and_grad(
        lambda s: losses.sparse_kl_divergence(s, log_probs, indices,
                                              tail=tail),
        big_s, argnums=0,
    )
  else:
    helpers.assert_finite_value_and_grad(fn, big_s, big_t)


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_masks_dtypes_jit_axis(name, rng):
  fn = _contract_fn(name)
  student, teacher = token_pair(2.0, seed=9)
  # All-masked rows: value 0, gradient 0.
  none = np.zeros((B, L), bool)
  if name.startswith("sparse"):
    log_probs, indices = top_k(teacher, K)
    call = lambda s, w=None: losses.sparse_kl_divergence(
        s, log_probs, indices, tail=_tail_of(name), where=w)
    value, grad = jax.value_and_grad(lambda s: jnp.sum(call(s, none)))(student)
    assert value == 0.0 and np.all(np.asarray(grad) == 0.0)
    helpers.assert_jit_matches_eager(call, student)
    where = rng.random((B, L)) > 0.4
    masked = call(student, where)
    sliced = losses.sparse_kl_divergence(
        student[where], log_probs[where], indices[where], tail=_tail_of(name))
    helpers.assert_close(np.asarray(masked)[where], sliced, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(masked)[~where], 0.0)
    bf16 = losses.sparse_kl_divergence(
        jnp.asarray(student, jnp.bfloat16), jnp.asarray(log_probs, jnp.bfloat16),
        indices, tail=_tail_of(name))
    assert bf16.dtype == jnp.float32
  else:
    value, grads = jax.value_and_grad(
        lambda s, t: jnp.sum(fn(s, t, where=none)), argnums=(0, 1)
    )(student, teacher)
    assert value == 0.0
    for g in grads:
      assert np.all(np.asarray(g) == 0.0)
    helpers.assert_jit_matches_eager(fn, student, teacher)
    helpers.assert_where_matches_slicing(
        fn, (student, teacher), rng.random((B, L)) > 0.4)
    bf16 = fn(jnp.asarray(student, jnp.bfloat16),
              jnp.asarray(teacher, jnp.bfloat16))
    assert bf16.dtype == jnp.float32
    rounded = fn(np.asarray(jnp.asarray(student, jnp.bfloat16), np.float32),
                 np.asarray(jnp.asarray(teacher, jnp.bfloat16), np.float32))
    helpers.assert_close(bf16, rounded, rtol=1e-6)
  helpers.assert_axis_matches_moveaxis(
      fn, (np.moveaxis(student, -1, 1), np.moveaxis(teacher, -1, 1)), axis=1)


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_check_grads(name, x64):
  student, teacher = token_pair(1.0, seed=10, shape=(2, 6))
  student, teacher = student.astype(np.float64), teacher.astype(np.float64)
  if name.startswith("sparse"):
    log_probs, indices = top_k(teacher, K)
    tail = _tail_of(name)
    check_grads(
        jax.jit(lambda s, lp: losses.sparse_kl_divergence(
            s, lp, indices, temperature=1.5, tail=tail)),
        (student, log_probs.astype(np.float64)), order=1, modes=["rev"],
    )
  else:
    fn = CONTRACT[name]
    # Second order (through the analytic first derivatives) once; first
    # order for the rest keeps the file fast.
    order = 2 if name == "skew_kl_divergence" else 1
    check_grads(jax.jit(lambda s, t: fn(s, t, temperature=1.5)),
                (student, teacher), order=order, modes=["rev"])
