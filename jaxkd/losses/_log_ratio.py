r"""Divergences of two softmax distributions, accurate when they are close.

The textbook route to :math:`\mathrm{KL}(p \,\|\, q)` from logits,
``sum(p * (log_softmax(a) - log_softmax(b)))``, subtracts two nearly equal
log-normalisers. At a high temperature both distributions are close to
uniform, the divergence is of order :math:`1 / T^2`, and that subtraction
leaves only rounding noise; the :math:`T^2` of the KD loss then multiplies
the noise (float32 at :math:`T = 10^4` gives negative "divergences").

Here everything is computed from the logit difference instead. With
:math:`a = z^p / T`, :math:`b = z^q / T` and :math:`d = b - a`,

.. math::
  \mathrm{KL}(p \,\|\, q) = \log \sum_c p_c e^{d_c} - \sum_c p_c d_c
  = \log\Big(1 + \sum_c p_c \,\varphi(e_c)\Big),
  \quad e = d - \textstyle\sum_c p_c d_c, \quad \varphi(x) = e^x - 1 - x,

where the first-order terms cancel exactly (:math:`\sum_c p_c e_c = 0`), so
the sum is of non-negative terms that keep their relative precision;
:math:`\varphi` is a Taylor series for small :math:`|x|` and ``expm1`` minus
``x`` otherwise. When the divergence is large the same quantity is a
``logsumexp`` of ``log p + e``, which is used there instead (no overflow).
The logits are shifted by their maximum *before* dividing by :math:`T`, and
:math:`d` is formed from the shifted logits, so :math:`d` carries the
relative precision of the logit difference itself.

Classes outside a distribution's support (``-inf`` logits) are handled
exactly: the divergence is computed on the classes both support, and the
mass that either side has elsewhere enters through ``softplus`` of a
difference of log-masses (never a subtraction of two logs near each other).
``nan`` counts as supported, so it propagates.

These helpers are private; the public losses call them.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
ArrayLike = Any

# phi(x) = e^x - 1 - x = x^2 * sum_j x^j / (j + 2)!. For |x| <= 1/2 the
# series truncated after j = 7 is exact to 2e-9 relative (float32), after
# j = 14 to 1e-19 (float64).
_PHI_TERMS = {4: 8, 8: 15}
_PHI_TAYLOR_RADIUS = 0.5
# Above this, phi(x) is e^x - (1 + x) evaluated as exp(log w + x): no overflow.
_PHI_EXP_FROM = 30.0
_EXP_CLIP = 60.0


def supported(x: Array) -> Array:
  """``x != -inf``: a class with positive probability (``nan`` counts)."""
  return x != -jnp.inf


def _guarded_log(total: Array) -> Array:
  """``log(total)`` with ``log 0 = -inf`` and a zero (not ``nan``) gradient."""
  nonzero = total != 0
  safe = jnp.where(nonzero, total, jnp.ones((), total.dtype))
  return jnp.where(nonzero, jnp.log(safe), jnp.full((), -jnp.inf, total.dtype))


def masked_logsumexp(
    x: Array, mask: Array, axis: int, keepdims: bool = False
) -> Array:
  """``logsumexp`` of ``x`` over ``mask``; ``-inf`` where it selects nothing.

  Entries outside the mask never reach ``exp`` (whatever they hold), and an
  empty selection has a zero (not ``nan``) gradient.
  """
  top = jnp.max(jnp.where(mask, x, -jnp.inf), axis=axis, keepdims=True)
  top = jax.lax.stop_gradient(
      jnp.where(top == -jnp.inf, jnp.zeros((), x.dtype), top)
  )
  terms = jnp.exp(jnp.where(mask, x, top) - top)
  total = jnp.sum(
      jnp.where(mask, terms, jnp.zeros((), x.dtype)), axis=axis, keepdims=True
  )
  out = _guarded_log(total) + top
  return out if keepdims else jnp.squeeze(out, axis)


def shift_by_max(z: Array, mask: Array | None, axis: int) -> Array:
  """``z - max(z over mask)``, the maximum held constant (stop_gradient).

  Softmax and every divergence here are invariant to the shift. A ``nan``
  maximum propagates. With a mask, a maximum of ``-inf`` (nothing supported
  there) is replaced by 0 so the ``-inf`` entries stay ``-inf``; without one
  a row of only ``-inf`` (not a distribution) gives ``nan``.
  """
  if mask is None:
    top = jnp.max(z, axis=axis, keepdims=True)
  else:
    top = jnp.max(jnp.where(mask, z, -jnp.inf), axis=axis, keepdims=True)
    top = jnp.where(top == -jnp.inf, jnp.zeros((), z.dtype), top)
  return z - jax.lax.stop_gradient(top)


def _phi_terms(w: Array, e: Array, log_w_plus_e: Array) -> Array:
  """``w * (exp(e) - 1 - e)``, relative precision kept, never overflowing.

  ``log_w_plus_e`` is ``log w + e``, passed in so that a caller can form it
  without adding a large negative ``log w`` to a large positive ``e``.
  """
  dtype = e.dtype
  small = jnp.abs(e) <= _PHI_TAYLOR_RADIUS
  x = jnp.where(small, e, jnp.zeros((), dtype))
  terms = _PHI_TERMS[jnp.dtype(dtype).itemsize]
  poly = jnp.full((), 1.0 / math.factorial(terms + 1), dtype)
  for j in reversed(range(terms - 1)):
    poly = poly * x + jnp.asarray(1.0 / math.factorial(j + 2), dtype)
  taylor = w * (x * x * poly)
  # Outside the Taylor disc expm1(e) - e does not cancel badly (|e| > 1/2).
  y = jnp.where(small, jnp.ones((), dtype), e)
  moderate = y < _PHI_EXP_FROM
  y_moderate = jnp.where(moderate, y, jnp.zeros((), dtype))
  y_large = jnp.where(moderate, jnp.full((), _PHI_EXP_FROM, dtype), y)
  exp_arg = jnp.where(moderate, jnp.zeros((), dtype), log_w_plus_e)
  direct = jnp.where(
      moderate,
      w * (jnp.expm1(y_moderate) - y_moderate),
      jnp.exp(jnp.minimum(exp_arg, _EXP_CLIP)) - w * (1 + y_large),
  )
  return jnp.where(small, taylor, direct)


def centered_gap(
    log_p: Array,
    d: Array,
    mask: Array,
    axis: int,
    log_p_plus_d: Array | None = None,
) -> tuple[Array, Array]:
  r"""``log sum p e^d - sum p d`` over ``mask``, with ``p`` renormalised there.

  This is :math:`\mathrm{KL}(p \,\|\, q)` for ``d = log q - log p`` up to a
  constant, computed as ``log1p(sum p phi(d - mean))`` while it is below 1
  and as a ``logsumexp`` above. It is :math:`\ge 0`, exactly 0 for a
  constant ``d``, and 0 for an empty ``mask``.

  Args:
    log_p: Log-probabilities (any normalisation; only the relative weights
      over ``mask`` matter).
    d: Log-ratios, finite on ``mask`` (values elsewhere are ignored).
    mask: Boolean mask of the classes to sum over.
    axis: The class axis.
    log_p_plus_d: ``log_p + d`` if the caller can form it more accurately
      (for a class far in ``p``'s tail and large in ``q`` the sum of a large
      negative and a large positive number loses absolute precision, and it
      is the exponent of that class's term).

  Returns:
    ``(gap, mean)``: the gap and the ``p``-weighted mean of ``d``, both of
    the per-example shape.

  Derivatives are analytic (``custom_jvp``), with ``w`` the renormalised
  weights, ``e = d - mean`` and ``r = w exp(e - gap)`` (the other
  distribution restricted to ``mask``): ``d gap / d d = r - w``,
  ``d gap / d log_p = r - w - w e``, ``d mean / d d = w`` and
  ``d mean / d log_p = w e``; ``r - w`` is formed as ``w expm1(e - gap)``.
  ``log_p_plus_d`` is taken to equal ``log_p + d`` (it carries no
  derivative of its own).
  """
  if log_p_plus_d is None:
    log_p_plus_d = log_p + d
  return _centered_gap(log_p, d, mask, log_p_plus_d, axis)


def _centered_gap_parts(log_p, d, mask, log_p_plus_d, axis):
  """The forward computation; also returns what the derivatives need."""
  dtype = log_p.dtype
  zero = jnp.zeros((), dtype)
  # The weights are renormalised by their sum (not a logsumexp): callers pass
  # normalised log-probabilities, whose mass on `mask` underflows only where
  # the result is not used.
  lp = jnp.where(mask, log_p, zero)
  w = jnp.where(mask, jnp.exp(lp), zero)
  total = jnp.sum(w, axis=axis, keepdims=True)
  any_selected = total != 0  # nan stays selected
  total = jnp.where(any_selected, total, jnp.ones((), dtype))
  norm = jnp.log(total)
  d = jnp.where(mask, d, zero)
  mean = jnp.sum(w * d, axis=axis, keepdims=True) / total
  e = jnp.where(mask, d - mean, zero)
  log_w_plus_e = jnp.where(mask, log_p_plus_d, zero) - norm - mean
  terms = jnp.where(mask, _phi_terms(w, e, log_w_plus_e), zero)
  small_gap = jnp.log1p(jnp.sum(terms, axis=axis, keepdims=True) / total)
  big_gap = masked_logsumexp(log_w_plus_e, mask, axis, keepdims=True)
  gap = jnp.where(big_gap < 1, small_gap, big_gap)
  gap = jnp.where(any_selected, gap, zero)
  return gap, mean, (w / total, e, log_w_plus_e)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def _centered_gap(log_p, d, mask, log_p_plus_d, axis):
  gap, mean, _ = _centered_gap_parts(log_p, d, mask, log_p_plus_d, axis)
  return jnp.squeeze(gap, axis), jnp.squeeze(mean, axis)


@_centered_gap.defjvp
def _centered_gap_jvp(axis, primals, tangents):
  log_p, d, mask, log_p_plus_d = primals
  log_p_dot, d_dot = tangents[0], tangents[1]
  gap, mean, (w, e, log_w_plus_e) = _centered_gap_parts(
      log_p, d, mask, log_p_plus_d, axis
  )
  dtype = gap.dtype
  zero = jnp.zeros((), dtype)
  # r - w = w expm1(e - gap), or exp(log w + e - gap) - w where e - gap is
  # large (w is then tiny and expm1 would overflow before the product).
  y = jnp.where(mask, e - gap, zero)
  moderate = y < _PHI_EXP_FROM
  r_minus_w = jnp.where(
      moderate,
      w * jnp.expm1(jnp.where(moderate, y, zero)),
      jnp.exp(jnp.where(moderate, zero, log_w_plus_e - gap)) - w,
  )
  d_dot = jnp.where(mask, d_dot, zero)
  log_p_dot = jnp.where(mask, log_p_dot, zero)
  gap_dot = jnp.sum(
      jnp.where(mask, r_minus_w * d_dot + (r_minus_w - w * e) * log_p_dot,
                zero),
      axis=axis,
  )
  mean_dot = jnp.sum(
      jnp.where(mask, w * d_dot + w * e * log_p_dot, zero), axis=axis
  )
  return (
      (jnp.squeeze(gap, axis), jnp.squeeze(mean, axis)),
      (gap_dot, mean_dot),
  )


def outside_mass(log_q: Array, inside: Array, outside: Array, axis: int):
  r"""``-log Q(inside)`` for normalised ``log_q`` on ``inside | outside``.

  ``-log1p(-Q(outside))`` while the outside mass is at most 1/2 (accurate
  when it is tiny, exactly 0 when ``outside`` selects nothing), else
  ``-logsumexp`` over ``inside``.
  """
  zero = jnp.zeros((), log_q.dtype)
  mass_out = jnp.sum(
      jnp.where(outside, jnp.exp(jnp.where(outside, log_q, zero)), zero),
      axis=axis,
  )
  small = mass_out <= 0.5
  safe_out = jnp.where(small, mass_out, zero)
  return jnp.where(
      small,
      -jnp.log1p(-safe_out),
      -masked_logsumexp(log_q, inside, axis),
  )


def log_two_point(
    g: Array, w0: Array, w1: Array, log_w0: Array, log_w1: Array
) -> Array:
  """``log(w0 + w1 exp(g))`` for ``w0 + w1 = 1``, accurate for small ``g``."""
  dtype = g.dtype
  near = jnp.abs(g) <= 1
  g_near = jnp.where(near, g, jnp.zeros((), dtype))
  g_far = jnp.where(near, jnp.full((), 2.0, dtype), g)
  return jnp.where(
      near,
      jnp.log1p(w1 * jnp.expm1(g_near)),
      jnp.logaddexp(log_w0, log_w1 + g_far),
  )


def log_weighted_mean_exp(
    x: Array, w: Array, log_w: Array, axis: int
) -> Array:
  """``log sum_k w_k exp(x_k)`` over ``axis`` for weights summing to one.

  Where every ``x_k`` with ``w_k > 0`` lies in ``[-1, 1]`` the value is
  ``log1p(sum w expm1(x))``, which keeps the precision of small ``x``;
  elsewhere a ``logsumexp`` of ``log w + x``. ``-inf`` entries (and zero
  weights) are left out; ``-inf`` where nothing is left.
  """
  dtype = x.dtype
  zero = jnp.zeros((), dtype)
  used = w != 0
  near = jnp.all(~used | (jnp.abs(x) <= 1), axis=axis, keepdims=True)
  x_near = jnp.where(near & used, x, zero)
  near_value = jnp.log1p(jnp.sum(w * jnp.expm1(x_near), axis=axis))
  far_value = masked_logsumexp(
      jnp.where(used, log_w, zero) + jnp.where(near, zero, x), used, axis
  )
  return jnp.where(jnp.squeeze(near, axis), near_value, far_value)


class LogitPair(NamedTuple):
  """Two distributions ``p = softmax(z_p / T)``, ``q = softmax(z_q / T)``.

  Over the classes of a mask (all classes unless given); ``-inf`` outside it.
  ``d`` is ``(log q - log p)`` up to a constant on ``both`` (0 elsewhere),
  formed from the shifted logits; ``gap`` and ``mean`` are
  :func:`centered_gap` of ``(log p, d)`` on ``both``, that is the KL of the
  two distributions restricted to ``both``; :func:`p_out` and :func:`q_out`
  give ``-log P(both)`` and ``-log Q(both)``.
  """

  shifted_p: Array  # z_p - max, all classes (the class mask's maximum)
  shifted_q: Array
  norm_p: Array  # logsumexp of the shifted z / T over the support, keepdims
  norm_q: Array
  log_p: Array
  log_q: Array
  both: Array
  p_only: Array
  q_only: Array
  d: Array
  gap: Array
  mean: Array
  axis: int


def logit_pair(
    p_logits: Array,
    q_logits: Array,
    temperature: ArrayLike,
    axis: int,
    classes: Array | None = None,
) -> LogitPair:
  """Everything the divergences of ``p`` and ``q`` need (see :class:`LogitPair`)."""
  dtype = p_logits.dtype
  zero = jnp.zeros((), dtype)
  neg_inf = jnp.full((), -jnp.inf, dtype)
  temperature = jnp.asarray(temperature).astype(dtype)
  shifted_p = shift_by_max(p_logits, classes, axis)
  shifted_q = shift_by_max(q_logits, classes, axis)
  supp_p = supported(p_logits)
  supp_q = supported(q_logits)
  if classes is not None:
    supp_p = supp_p & classes
    supp_q = supp_q & classes
  both = supp_p & supp_q

  def scale(shifted: Array, supp: Array) -> tuple[Array, Array]:
    # Divided by T only where finite: no inf / T in the backward pass.
    scaled = jnp.where(
        supp, jnp.where(supp, shifted, zero) / temperature, neg_inf
    )
    # The largest scaled logit is 0 (the shift), so the sum is >= 1 and
    # needs no further shift; it is 0 only for an empty support.
    total = jnp.sum(jnp.exp(scaled), axis=axis, keepdims=True)
    return scaled, _guarded_log(total)

  scaled_p, norm_p = scale(shifted_p, supp_p)
  scaled_q, norm_q = scale(shifted_q, supp_q)
  log_p = scaled_p - norm_p
  log_q = scaled_q - norm_q
  d = (
      jnp.where(both, shifted_q, zero) - jnp.where(both, shifted_p, zero)
  ) / temperature
  # log p + d = z_q / T - logsumexp(z_p / T), formed without the sum.
  gap, mean = centered_gap(
      log_p, d, both, axis,
      log_p_plus_d=jnp.where(both, scaled_q, zero) - norm_p,
  )
  p_only = supp_p & ~both
  q_only = supp_q & ~both
  return LogitPair(
      shifted_p=shifted_p,
      shifted_q=shifted_q,
      norm_p=norm_p,
      norm_q=norm_q,
      log_p=log_p,
      log_q=log_q,
      both=both,
      p_only=p_only,
      q_only=q_only,
      d=d,
      gap=gap,
      mean=mean,
      axis=axis,
  )


def p_out(pair: LogitPair) -> Array:
  """``-log P(both)``: the mass ``p`` puts where ``q`` is 0, as a log."""
  return outside_mass(pair.log_p, pair.both, pair.p_only, pair.axis)


def q_out(pair: LogitPair) -> Array:
  """``-log Q(both)``: the mass ``q`` puts where ``p`` is 0, as a log."""
  return outside_mass(pair.log_q, pair.both, pair.q_only, pair.axis)


def _inf_where(condition: Array, value: Array) -> Array:
  return jnp.where(condition, jnp.full((), jnp.inf, value.dtype), value)


def forward_kl(pair: LogitPair) -> Array:
  r""":math:`\mathrm{KL}(p \,\|\, q)`; ``inf`` where ``q = 0 < p``."""
  return _inf_where(
      jnp.any(pair.p_only, axis=pair.axis), pair.gap + q_out(pair)
  )


def reverse_kl(pair: LogitPair) -> Array:
  r""":math:`\mathrm{KL}(q \,\|\, p)`; ``inf`` where ``p = 0 < q``."""
  zero = jnp.zeros((), pair.d.dtype)
  scaled_p = jnp.where(pair.both, pair.log_p + pair.norm_p, zero)
  gap, _ = centered_gap(
      pair.log_q, -pair.d, pair.both, pair.axis,
      log_p_plus_d=scaled_p - pair.norm_q,
  )
  return _inf_where(jnp.any(pair.q_only, axis=pair.axis), gap + p_out(pair))


def log_ratio(pair: LogitPair) -> Array:
  """``log q - log p`` on ``both`` (0 elsewhere), accurate when small."""
  axis = pair.axis
  # (d - mean) first: the centred difference keeps d's precision.
  centred = pair.d - jnp.expand_dims(pair.mean, axis)
  rest = jnp.expand_dims(pair.gap + q_out(pair) - p_out(pair), axis)
  zero = jnp.zeros((), pair.d.dtype)
  return jnp.where(pair.both, centred - rest, zero)


def log_normalizer_gap(pair: LogitPair) -> Array:
  """``logsumexp(z_q / T) - logsumexp(z_p / T)`` over the class mask.

  Both in the shifted frame of :class:`LogitPair`. Accurate (from the
  centred gap) when the two share a class; a plain difference otherwise.
  """
  axis = pair.axis
  has_both = jnp.any(pair.both, axis=axis)
  accurate = pair.mean + pair.gap + q_out(pair) - p_out(pair)
  plain = jnp.squeeze(pair.norm_q - pair.norm_p, axis)
  return jnp.where(has_both, accurate, plain)
