r"""Ensembles of teachers stacked on a leading axis, and confidence weights.

Teacher logits have shape ``[K, ..., num_classes]``: ``K`` teachers, each with
the shape of the student's logits ``[..., num_classes]``. Ensembles are formed
in log space: the probability average :math:`\sum_k w_k p_k` is
``logsumexp_k(log w_k + log_softmax(z_k / T))``, so no function takes the log
of a softmax, adds an epsilon or clips. A ``-inf`` logit marks a class as
impossible for that teacher and is handled exactly.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxkd.losses import _soft_target
from jaxkd.losses import _teacher_stack
from jaxkd.losses import validation as v

Array = jax.Array
ArrayLike = Any

MODES = ("probability", "logit")


def log_mixture(log_probs: Array, weights: Array, axis: int) -> Array:
  """``log sum_k w_k p_k`` over axis 0 from ``log p_k``; exact ``-inf`` zeros.

  ``log_probs`` is ``[K, ..., C]`` with the class axis at ``axis``; ``weights``
  is ``[K, ...]`` (normalised) without it.
  """
  weights = jnp.expand_dims(weights, axis)
  # log 0 = -inf through the double where: a zero weight removes its teacher
  # from the sum, and the gradient never sees log(0) or 1 / 0.
  positive = weights != 0
  safe_weights = jnp.where(positive, weights, jnp.ones((), weights.dtype))
  log_weights = jnp.where(
      positive, jnp.log(safe_weights), jnp.full((), -jnp.inf, weights.dtype)
  )
  terms = log_weights + log_probs
  # A class that no teacher with positive weight supports has log p = -inf.
  # Its logsumexp would be over -inf only, whose gradient is 0 / 0, so it is
  # computed on zeros and replaced afterwards.
  supported = jnp.any(terms != -jnp.inf, axis=0)
  safe_terms = jnp.where(supported[None], terms, jnp.zeros((), terms.dtype))
  log_mixture = jax.nn.logsumexp(safe_terms, axis=0)
  return jnp.where(
      supported, log_mixture, jnp.full((), -jnp.inf, log_mixture.dtype)
  )


def mean_logits(logits: Array, weights: Array, axis: int) -> Array:
  """``sum_k w_k z_k`` over axis 0, with ``-inf`` logits kept exact."""
  weights = jnp.expand_dims(weights, axis)
  finite = logits != -jnp.inf
  safe_logits = jnp.where(finite, logits, jnp.zeros((), logits.dtype))
  # Only finite logits enter the product, so a zero weight on a -inf logit
  # never forms 0 * inf, and the weights' gradient never sees an infinity.
  mean = jnp.sum(weights * safe_logits, axis=0)
  impossible = jnp.any(~finite & (weights > 0), axis=0)
  return jnp.where(impossible, jnp.full((), -jnp.inf, mean.dtype), mean)


def ensemble_log_probs(
    teacher_logits: Array,
    weights: Array,
    *,
    temperature: ArrayLike,
    mode: str,
    axis: int,
) -> Array:
  """The ensemble's log-probabilities ``[..., C]``; ``axis`` is per-teacher."""
  if mode == "probability":
    log_probs = _soft_target.scaled_log_softmax(
        teacher_logits, temperature, axis + 1
    )
    return log_mixture(log_probs, weights, axis + 1)
  mean = mean_logits(teacher_logits, weights, axis + 1)
  return _soft_target.scaled_log_softmax(mean, temperature, axis)



def ensemble_log_soft_targets(
    teacher_logits: ArrayLike,
    *,
    temperature: ArrayLike = 1.0,
    weights: ArrayLike | None = None,
    mode: str = "probability",
    axis: int = -1,
) -> Array:
  r"""Log-probabilities of a weighted ensemble of teachers' soft targets.

  With ``mode="probability"`` (the default) the teachers' soft targets are
  averaged:

  .. math::
    \log \bar p_c = \log \sum_k w_k \, \mathrm{softmax}(z_k / T)_c
    = \operatorname{logsumexp}_k \big(\log w_k
    + \log\mathrm{softmax}(z_k / T)_c\big)

  With ``mode="logit"`` the logits are averaged first:

  .. math::
    \log \bar p_c = \log\mathrm{softmax}\Big(\sum_k w_k z_k \,/\, T\Big)_c

  The weights are normalised over the teacher axis,
  :math:`w_k = \tilde w_k / \sum_j \tilde w_j`. A teacher with weight 0 is
  left out exactly (as :math:`\log 0 = -\infty`), and a class that every
  teacher with positive weight gives a ``-inf`` logit has log-probability
  ``-inf``.

  Args:
    teacher_logits: Floating logits of shape ``[K, ..., num_classes]``: ``K``
      teachers stacked on a leading axis.
    temperature: Softmax temperature :math:`T > 0`; a scalar.
    weights: Non-negative teacher weights, normalised over ``K``: ``None``
      (uniform), shape ``[K]`` (one weight per teacher) or ``[K, ...]`` with
      ``...`` broadcastable to the per-example shape (for example the output
      of :func:`teacher_confidence_weights`). Cast to the logits' compute
      dtype.
    mode: ``"probability"`` to average soft targets, ``"logit"`` to average
      logits.
    axis: The class axis of one teacher's logits ``[..., num_classes]`` (the
      teacher axis is not counted); it is also the class axis of the output.

  Returns:
    Log-probabilities of shape ``[..., num_classes]`` (the input shape without
    the teacher axis); float32 for bfloat16 and float16 inputs.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses
    >>> teachers = jnp.log(jnp.array([[0.5, 0.5], [0.9, 0.1]]))
    >>> log_probs = losses.ensemble_log_soft_targets(teachers)
    >>> print(" ".join(f"{p:.4f}" for p in jnp.exp(log_probs)))
    0.7000 0.3000

  References:
    Hinton, Vinyals and Dean, `Distilling the Knowledge in a Neural Network
    <https://arxiv.org/abs/1503.02531>`_, 2015 (distilling an ensemble).

  .. seealso:: :func:`ensemble_soft_targets` (the probabilities).

  .. versionadded:: 0.1.0
  """
  _teacher_stack.check_teacher_stack(teacher_logits)
  valid = v.check_positive("temperature", temperature)
  v.check_choice("mode", mode, MODES)
  axis = _teacher_stack.per_teacher_axis(teacher_logits, axis)
  (teacher_logits,) = v.as_compute_dtype(teacher_logits)
  per_example_shape = tuple(
      d for i, d in enumerate(teacher_logits.shape[1:]) if i != axis
  )
  weights, weights_valid = _teacher_stack.normalized_weights(
      weights,
      num_teachers=teacher_logits.shape[0],
      per_example_shape=per_example_shape,
      dtype=teacher_logits.dtype,
  )
  return v.nan_unless(
      v.all_valid(valid, weights_valid),
      ensemble_log_probs(
          teacher_logits, weights, temperature=temperature, mode=mode,
          axis=axis,
      ),
  )


def ensemble_soft_targets(
    teacher_logits: ArrayLike,
    *,
    temperature: ArrayLike = 1.0,
    weights: ArrayLike | None = None,
    mode: str = "probability",
    axis: int = -1,
) -> Array:
  r"""Probabilities of a weighted ensemble of teachers' soft targets.

  The exponential of :func:`ensemble_log_soft_targets` (which computes in log
  space; losses use that one):

  .. math::
    \bar p = \sum_k w_k \, \mathrm{softmax}(z_k / T)
    \quad \text{or} \quad
    \bar p = \mathrm{softmax}\Big(\sum_k w_k z_k \,/\, T\Big)

  for ``mode="probability"`` and ``mode="logit"``, with the weights
  normalised over the ``K`` teachers.

  Args:
    teacher_logits: Floating logits of shape ``[K, ..., num_classes]``.
    temperature: Softmax temperature :math:`T > 0`; a scalar.
    weights: Non-negative teacher weights, normalised over ``K``: ``None``
      (uniform), ``[K]`` or ``[K, ...]`` broadcastable to the per-example
      shape.
    mode: ``"probability"`` or ``"logit"``.
    axis: The class axis of one teacher's logits (the teacher axis is not
      counted).

  Returns:
    Probabilities of shape ``[..., num_classes]``; float32 for bfloat16 and
    float16 inputs.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses
    >>> teachers = jnp.log(jnp.array([[0.5, 0.5], [0.9, 0.1]]))
    >>> probs = losses.ensemble_soft_targets(
    ...     teachers, weights=jnp.array([1.0, 3.0]))
    >>> print(" ".join(f"{p:.4f}" for p in probs))
    0.8000 0.2000
    >>> probs = losses.ensemble_soft_targets(teachers, mode="logit")
    >>> print(" ".join(f"{p:.4f}" for p in probs))
    0.7500 0.2500

  References:
    Hinton, Vinyals and Dean, `Distilling the Knowledge in a Neural Network
    <https://arxiv.org/abs/1503.02531>`_, 2015 (distilling an ensemble).

  .. versionadded:: 0.1.0
  """
  return jnp.exp(
      ensemble_log_soft_targets(
          teacher_logits, temperature=temperature, weights=weights, mode=mode,
          axis=axis,
      )
  )


def _entropy_from_log_probs(log_p: Array, axis: int) -> Array:
  """``-sum_c p_c log p_c`` with ``0 log 0 = 0`` (double ``where``)."""
  supported = log_p != -jnp.inf
  safe_log_p = jnp.where(supported, log_p, jnp.zeros((), log_p.dtype))
  terms = jnp.exp(safe_log_p) * safe_log_p
  return -jnp.sum(
      jnp.where(supported, terms, jnp.zeros((), terms.dtype)), axis=axis
  )


def teacher_confidence_weights(
    teacher_logits: ArrayLike,
    *,
    temperature: ArrayLike = 1.0,
    axis: int = -1,
) -> Array:
  r"""Per-example teacher weights from each teacher's entropy.

  A confident teacher (low entropy) gets more weight:

  .. math::
    w_k = \frac{\exp(-H(p_k))}{\sum_j \exp(-H(p_j))}, \quad
    H(p_k) = -\sum_c p_{k,c} \log p_{k,c}, \quad
    p_k = \mathrm{softmax}(z_k / T)

  computed from log-probabilities (classes with a ``-inf`` logit contribute
  :math:`0 \log 0 = 0`). Entropies are in nats and lie in
  :math:`[0, \log C]`, so the largest and smallest weight differ by a factor
  of at most :math:`C`. The weights depend on the teacher logits only; pass
  them as ``weights`` to :func:`multi_teacher_kd_loss` or
  :func:`ensemble_soft_targets`. They are not wrapped in ``stop_gradient``:
  teachers are frozen by the train step, which gives them no gradient.

  Args:
    teacher_logits: Floating logits of shape ``[K, ..., num_classes]``.
    temperature: Softmax temperature :math:`T > 0` of the teachers' soft
      targets whose entropy is measured.
    axis: The class axis of one teacher's logits (the teacher axis is not
      counted).

  Returns:
    Weights of shape ``[K, ...]`` (the input shape without the class axis)
    that sum to one over ``K``; float32 for bfloat16 and float16 inputs.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses
    >>> teachers = jnp.array([[0.0, 0.0], [100.0, 0.0]])
    >>> print(losses.teacher_confidence_weights(teachers).round(4))
    [0.3333 0.6667]

  References:
    Kwon, Na, Lee and Kim, `Adaptive Knowledge Distillation Based on
    Entropy <https://doi.org/10.1109/ICASSP40776.2020.9054698>`_, ICASSP 2020
    (lower-entropy teachers weighted more; the softmax of negative entropies
    above is one such weighting).

    Zhang, Chen and Wang, `Confidence-Aware Multi-Teacher Knowledge
    Distillation <https://arxiv.org/abs/2201.00007>`_, ICASSP 2022 (CA-MKD;
    weights from each teacher's cross-entropy to the labels instead).

  .. versionadded:: 0.1.0
  """
  _teacher_stack.check_teacher_stack(teacher_logits)
  valid = v.check_positive("temperature", temperature)
  axis = _teacher_stack.per_teacher_axis(teacher_logits, axis)
  (teacher_logits,) = v.as_compute_dtype(teacher_logits)
  log_probs = _soft_target.scaled_log_softmax(
      teacher_logits, temperature, axis + 1
  )
  entropy = _entropy_from_log_probs(log_probs, axis + 1)
  return v.nan_unless(valid, jax.nn.softmax(-entropy, axis=0))


