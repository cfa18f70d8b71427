r"""The KL divergence from one of two distributions to their mixture.

The shared step of the generalized Jensen-Shannon divergence and the skew KL
divergences: :math:`\mathrm{KL}(r \,\|\, w r + (1 - w) o)` for the teacher
or the student of a :class:`_log_ratio.LogitPair` as :math:`r`, computed from
the pair's log-ratio so that it keeps float32's precision at any
temperature, and the handling of the endpoint weights 0 and 1.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxkd.losses import _log_ratio

Array = jax.Array
ArrayLike = Any
Weights = tuple[Array, Array, Array, Array]


def weighted_pair(
    student_logits: Array,
    teacher_logits: Array,
    weight: ArrayLike,
    temperature: ArrayLike,
    axis: int,
) -> tuple[_log_ratio.LogitPair, Array, Array, Array]:
  """The (teacher, student) logit pair and the mixture weight's endpoints.

  Returns ``(pair, weight, interior, safe)``: :func:`_log_ratio.logit_pair`
  of the teacher and the student, and :func:`interior_weight` of ``weight``
  in the logits' dtype.
  """
  pair = _log_ratio.logit_pair(
      teacher_logits, student_logits, temperature, axis
  )
  return (pair, *interior_weight(weight, student_logits.dtype))


def interior_weight(
    weight: ArrayLike, dtype: Any
) -> tuple[Array, Array, Array]:
  """``(weight, interior, safe)``: the weight cast, ``0 < w < 1``, a safe w.

  At ``w`` 0 or 1 one of ``log w``, ``log(1 - w)`` is ``-inf`` and its KL
  term is ``0 * (possibly inf)``: the losses compute with the harmless
  ``safe`` weight (``0.5`` at the endpoints) and return the exact limit
  where ``interior`` is false (a double ``where``: no ``nan`` in either
  pass).
  """
  weight = jnp.asarray(weight).astype(dtype)
  interior = (weight > 0) & (weight < 1)
  safe = jnp.where(interior, weight, jnp.full((), 0.5, dtype))
  return weight, interior, safe


def mixture_weights(weight: Array) -> Weights:
  """``(w, 1 - w, log w, log(1 - w))``, each formed directly from ``w``."""
  return weight, 1 - weight, jnp.log(weight), jnp.log1p(-weight)


def swapped(weights: Weights) -> Weights:
  """The weights of the other distribution: ``(1 - w, w, ...)``."""
  weight, other, log_weight, log_other = weights
  return other, weight, log_other, log_weight


def kl_to_mixture(
    pair: _log_ratio.LogitPair, weights: Weights, *, of_student: bool
) -> Array:
  r""":math:`\mathrm{KL}(r \,\|\, w r + (1 - w) o)` of a logit pair.

  :math:`r` is the pair's ``q`` (the student, in the losses' convention
  ``logit_pair(teacher, student)``) when ``of_student``, else its ``p``;
  ``weights`` is :func:`mixture_weights` of :math:`w`, the weight of
  :math:`r`.
  """
  g = _log_ratio.log_ratio(pair)  # log(q / p) on both
  if of_student:
    return _kl_to_mixture_parts(
        pair.log_q, pair.log_p, -g, pair.both, pair.q_only, pair.p_only,
        weights, pair.axis,
    )
  return _kl_to_mixture_parts(
      pair.log_p, pair.log_q, g, pair.both, pair.p_only, pair.q_only,
      weights, pair.axis,
  )


def _kl_to_mixture_parts(
    log_self: Array,
    log_other: Array,
    log_ratio: Array,
    both: Array,
    self_only: Array,
    other_only: Array,
    weights: Weights,
    axis: int,
) -> Array:
  r""":math:`\mathrm{KL}(r \,\|\, m)` for :math:`m = w r + (1 - w) o`.

  ``log_ratio`` is :math:`\log(o / r)` on ``both``; ``log_self`` and
  ``log_other`` are the normalised log-probabilities of :math:`r` and
  :math:`o`. On ``both`` :math:`\log(m / r) = \log(w + (1 - w) e^{g})`;
  where only :math:`r` has mass it is :math:`\log w`. The divergence is the
  centred gap of these log-ratios over :math:`r`'s support plus
  :math:`-\log m(\mathrm{supp}\, r)`, the mixture's mass outside it.
  ``weights`` is ``(w, 1 - w, log w, log(1 - w))``, each formed directly so
  that a tiny ``w`` or ``1 - w`` keeps its precision.
  """
  dtype = log_self.dtype
  zero = jnp.zeros((), dtype)
  weight_self, weight_other, log_w_self, log_w_other = weights
  log_m_over_r = jnp.where(
      both,
      _log_ratio.log_two_point(
          log_ratio, weight_self, weight_other, log_w_self, log_w_other
      ),
      jnp.where(self_only, log_w_self, zero),
  )
  support = both | self_only
  # log m itself, the exponent of each term: for classes where r and o are
  # far apart, log r + log(m / r) would add a large negative and a large
  # positive number, so it is formed as a log-sum of the two parts there.
  safe_self = jnp.where(support, log_self, zero)
  safe_other = jnp.where(both, log_other, zero)
  near = both & (jnp.abs(log_ratio) <= 1)
  log_m = jnp.where(
      near,
      safe_self + log_m_over_r,
      jnp.where(
          both,
          jnp.logaddexp(log_w_self + safe_self, log_w_other + safe_other),
          log_w_self + safe_self,
      ),
  )
  gap, _ = _log_ratio.centered_gap(
      log_self, log_m_over_r, support, axis, log_p_plus_d=log_m
  )
  # m(supp r) = w + (1 - w) O(both) = 1 - (1 - w) O(other only).
  other_out = jnp.exp(_log_ratio.masked_logsumexp(log_other, other_only, axis))
  log_other_in = _log_ratio.masked_logsumexp(log_other, both, axis)
  log_mass = jnp.where(
      other_out < 0.5,
      jnp.log1p(-weight_other * other_out),
      jnp.logaddexp(log_w_self, log_w_other + log_other_in),
  )
  return gap - log_mass
