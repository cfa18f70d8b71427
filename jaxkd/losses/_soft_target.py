"""Soft-target distillation losses (Hinton et al., 2015).

All functions take raw logits. Probabilities are only ever formed in log space
(``log_softmax(z / T)``), so no function takes the log of a softmax, adds an
epsilon or clips. A logit of ``-inf`` marks a class as impossible (for example
a padded vocabulary entry) and is handled exactly.

The divergences are computed from the logit difference (see
:mod:`jaxkd.losses._log_ratio`), so they keep float32's relative precision at
any temperature: the textbook ``sum p (log p - log q)`` cancels at a high
temperature, where the divergence is of order :math:`1 / T^2`, and the
:math:`T^2` of the KD loss would multiply that rounding noise.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxkd.losses import _classification
from jaxkd.losses import _log_ratio
from jaxkd.losses import validation as v

Array = jax.Array
ArrayLike = Any


def prepare_logit_pair(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperature: ArrayLike,
    axis: int,
    where: ArrayLike | None,
) -> tuple[Array, Array, int, Array | None, Any]:
  """Checks a (student, teacher) logit pair and casts it to the compute dtype.

  Returns ``(student_logits, teacher_logits, axis, where, valid)`` with
  ``axis`` non-negative, ``where`` broadcast to the per-example shape and
  ``valid`` the temperature check for :func:`validation.nan_unless`. Rows
  masked out by ``where`` are replaced by zeros so that whatever they held
  (``nan``, ``inf``) reaches neither the value nor the gradient.
  """
  v.check_floating("student_logits", student_logits)
  v.check_floating("teacher_logits", teacher_logits)
  v.check_same_shape(
      "student_logits", student_logits, "teacher_logits", teacher_logits
  )
  v.check_min_rank("student_logits", student_logits, 1)
  valid = v.check_positive("temperature", temperature)
  axis = v.normalize_axis("student_logits", student_logits, axis)
  student_logits, teacher_logits = v.as_compute_dtype(
      student_logits, teacher_logits
  )
  where = v.example_where(where, student_logits, axis)
  student_logits = v.zero_masked_examples(student_logits, where, axis)
  teacher_logits = v.zero_masked_examples(teacher_logits, where, axis)
  return student_logits, teacher_logits, axis, where, valid


def logit_pair_loss(
    core: Callable[[Array, Array, int, Array | None], Array],
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperature: ArrayLike,
    axis: int,
    where: ArrayLike | None,
    checks: tuple[Any, ...] = (),
) -> Array:
  """A per-example loss of a (student, teacher) logit pair, checked and masked.

  :func:`prepare_logit_pair`, then ``core(student_logits, teacher_logits,
  axis, where)`` on the prepared arrays, then the mask and the value checks:
  masked-out examples give 0, and a traced invalid temperature (or any of
  ``checks``, results of the :mod:`validation` value checks) gives ``nan``.
  """
  student_logits, teacher_logits, axis, where, valid = prepare_logit_pair(
      student_logits, teacher_logits, temperature=temperature, axis=axis,
      where=where,
  )
  loss = core(student_logits, teacher_logits, axis, where)
  return v.nan_unless(
      v.all_valid(valid, *checks), v.apply_where(loss, where)
  )


def scaled_log_softmax(
    logits: Array, temperature: ArrayLike, axis: int
) -> Array:
  """``log_softmax(logits / temperature)`` in the dtype of ``logits``."""
  temperature = jnp.asarray(temperature).astype(logits.dtype)
  return jax.nn.log_softmax(logits / temperature, axis=axis)


def kl_from_log_probs(log_p: Array, log_q: Array, axis: int) -> Array:
  """``sum_c p_c (log p_c - log q_c)`` from log-probabilities, 0 log 0 = 0.

  Entries with ``log_p = -inf`` contribute exactly zero to the value and to the
  gradient (the second ``where`` keeps ``0 * inf`` out of the backward pass).
  """
  supported = log_p != -jnp.inf
  safe_log_p = jnp.where(supported, log_p, jnp.zeros((), log_p.dtype))
  terms = jnp.exp(safe_log_p) * (safe_log_p - log_q)
  return jnp.sum(
      jnp.where(supported, terms, jnp.zeros((), terms.dtype)), axis=axis
  )


def cross_entropy_from_log_probs(
    log_p: Array, log_q: Array, axis: int
) -> Array:
  """``-sum_c p_c log q_c`` from log-probabilities, with ``0 log 0 = 0``."""
  supported = log_p != -jnp.inf
  safe_log_p = jnp.where(supported, log_p, jnp.zeros((), log_p.dtype))
  terms = -jnp.exp(safe_log_p) * log_q
  return jnp.sum(
      jnp.where(supported, terms, jnp.zeros((), terms.dtype)), axis=axis
  )


# The numerical cores are jitted (the argument checks stay outside, on
# concrete values): an eager call then compiles one program per shape
# instead of dispatching each of their few hundred operations.
@functools.partial(jax.jit, static_argnames=("axis",))
def kl_from_logits(
    p_logits: Array, q_logits: Array, temperature: ArrayLike, axis: int
) -> Array:
  """``KL(softmax(p_logits / T) || softmax(q_logits / T))``, accurate at any T.

  Computed from the logit difference (:mod:`_log_ratio`); ``-inf`` logits
  are exact (a class ``p`` rules out contributes 0, one that only ``q``
  rules out gives ``inf``), and ``nan`` in either input gives ``nan``.
  """
  pair = _log_ratio.logit_pair(p_logits, q_logits, temperature, axis)
  loss = _log_ratio.forward_kl(pair)
  return v.nan_where_nan(loss, p_logits, q_logits, axis=axis)


def soft_targets(
    logits: ArrayLike, *, temperature: ArrayLike = 1.0, axis: int = -1
) -> Array:
  r"""Temperature-scaled softmax: the teacher's soft targets.

  .. math::
    p_c = \frac{\exp(z_c / T)}{\sum_k \exp(z_k / T)}

  As :math:`T \to 0` the targets approach the one-hot vector of the argmax; as
  :math:`T \to \infty` they approach the uniform distribution.

  Args:
    logits: Floating logits of shape ``[..., num_classes]`` (class axis
      ``axis``).
    temperature: Softmax temperature :math:`T > 0`; a scalar.
    axis: The class axis.

  Returns:
    Probabilities with the shape of ``logits``; bfloat16 and float16 inputs
    give float32 outputs.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses
    >>> probs = losses.soft_targets(jnp.array([9.0, 5.0, 2.0]))
    >>> print(" ".join(f"{p:.4f}" for p in probs))
    0.9811 0.0180 0.0009

  References:
    Hinton, Vinyals and Dean, `Distilling the Knowledge in a Neural Network
    <https://arxiv.org/abs/1503.02531>`_, 2015.

  .. versionadded:: 0.1.0
  """
  return jnp.exp(log_soft_targets(logits, temperature=temperature, axis=axis))


def log_soft_targets(
    logits: ArrayLike, *, temperature: ArrayLike = 1.0, axis: int = -1
) -> Array:
  r"""Log of :func:`soft_targets`, computed as ``log_softmax(z / T)``.

  .. math::
    \log p_c = z_c / T - \log \sum_k \exp(z_k / T)

  Args:
    logits: Floating logits of shape ``[..., num_classes]``.
    temperature: Softmax temperature :math:`T > 0`; a scalar.
    axis: The class axis.

  Returns:
    Log-probabilities with the shape of ``logits`` (float32 for bfloat16 and
    float16 inputs). A ``-inf`` logit gives a ``-inf`` log-probability.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses
    >>> logits = jnp.array([9.0, 5.0, 2.0])
    >>> print(losses.log_soft_targets(logits, temperature=10.0).round(4))
    [-0.7733 -1.1733 -1.4733]

  References:
    Hinton, Vinyals and Dean, `Distilling the Knowledge in a Neural Network
    <https://arxiv.org/abs/1503.02531>`_, 2015.

  .. versionadded:: 0.1.0
  """
  v.check_floating("logits", logits)
  v.check_min_rank("logits", logits, 1)
  valid = v.check_positive("temperature", temperature)
  axis = v.normalize_axis("logits", logits, axis)
  (logits,) = v.as_compute_dtype(logits)
  return v.nan_unless(valid, scaled_log_softmax(logits, temperature, axis))


def kl_divergence(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperature: ArrayLike = 1.0,
    axis: int = -1,
    where: ArrayLike | None = None,
) -> Array:
  r"""KL divergence from the student's to the teacher's soft targets.

  .. math::
    \mathrm{KL}(p^T \,\|\, p^S) = \sum_c p^T_c (\log p^T_c - \log p^S_c),
    \quad p = \mathrm{softmax}(z / T)

  Classes whose teacher logit is ``-inf`` contribute exactly zero; a class
  with a ``-inf`` student logit under teacher mass gives ``inf`` (the true
  divergence). The divergence is computed from the logit difference, so it
  keeps float32's relative precision at any temperature (within 1e-3 of
  float64 from :math:`T = 10^{-3}` to :math:`10^4`), where the textbook
  difference of two log-softmaxes cancels once :math:`T` is large. ``nan`` in
  either input gives ``nan`` for that example.

  Args:
    student_logits: Floating logits of shape ``[..., num_classes]``.
    teacher_logits: Floating logits of the same shape.
    temperature: Softmax temperature :math:`T > 0` applied to both.
    axis: The class axis.
    where: Optional boolean mask broadcastable to the per-example shape
      ``[...]``; masked-out examples give 0 and no gradient.

  Returns:
    The per-example divergence, shape ``[...]`` (the input shape without
    ``axis``); float32 for bfloat16 and float16 inputs.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses
    >>> student = jnp.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    >>> teacher = jnp.array([[1.0, 2.0, 4.0], [0.0, 0.0, 0.0]])
    >>> print(losses.kl_divergence(student, teacher).round(4))
    [0.0816 0.    ]

  References:
    Kullback and Leibler, `On Information and Sufficiency
    <https://doi.org/10.1214/aoms/1177729694>`_, 1951.

  .. seealso:: :func:`kd_loss`, :func:`reverse_kl_divergence`.

  .. versionadded:: 0.1.0
  """
  return logit_pair_loss(
      lambda student, teacher, axis, _: kl_from_logits(
          teacher, student, temperature, axis
      ),
      student_logits, teacher_logits, temperature=temperature, axis=axis,
      where=where,
  )


def kd_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperature: ArrayLike = 1.0,
    axis: int = -1,
    where: ArrayLike | None = None,
) -> Array:
  r"""Hinton knowledge-distillation loss: :math:`T^2` times the KL divergence.

  .. math::
    \mathcal{L}_{KD} = T^2 \, \mathrm{KL}\big(\mathrm{softmax}(z^T / T)
    \,\|\, \mathrm{softmax}(z^S / T)\big)

  The gradient of the KL with respect to the student logits is
  :math:`(p^S - p^T) / T`, of order :math:`1 / T^2` for large :math:`T`; the
  :math:`T^2` factor keeps the gradient's size independent of the temperature,
  so the soft term can be mixed with a hard-label term at a fixed weight.
  It also multiplies any rounding error of the KL by :math:`T^2`; the KL here
  is computed from the logit difference (see :func:`kl_divergence`), so the
  loss stays float32-accurate at :math:`T = 10^4`.

  Args:
    student_logits: Floating logits of shape ``[..., num_classes]``.
    teacher_logits: Floating logits of the same shape.
    temperature: Softmax temperature :math:`T > 0`.
    axis: The class axis.
    where: Optional boolean mask broadcastable to the per-example shape.

  Returns:
    The per-example loss, shape ``[...]`` (float32 for 16-bit inputs).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses
    >>> student = jnp.array([1.0, 2.0, 3.0])
    >>> teacher = jnp.array([1.0, 2.0, 4.0])
    >>> print(losses.kd_loss(student, teacher, temperature=4.0).round(4))
    0.1241

  References:
    Hinton, Vinyals and Dean, `Distilling the Knowledge in a Neural Network
    <https://arxiv.org/abs/1503.02531>`_, 2015.

  .. seealso:: :func:`distillation_loss` (mixed with the hard-label loss).

  .. versionadded:: 0.1.0
  """
  loss = kl_divergence(
      student_logits, teacher_logits, temperature=temperature, axis=axis,
      where=where,
  )
  temperature = jnp.asarray(temperature).astype(loss.dtype)
  return temperature**2 * loss


def soft_cross_entropy(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperature: ArrayLike = 1.0,
    axis: int = -1,
    where: ArrayLike | None = None,
) -> Array:
  r"""Cross-entropy of the student's soft targets against the teacher's.

  .. math::
    H(p^T, p^S) = -\sum_c p^T_c \log p^S_c
    = \mathrm{KL}(p^T \,\|\, p^S) + H(p^T),
    \quad p = \mathrm{softmax}(z / T)

  It differs from :func:`kl_divergence` by the teacher's entropy, a constant
  for a frozen teacher, so both give the same gradient with respect to the
  student; unlike the KL it is not zero when the two distributions agree.
  No :math:`T^2` factor is applied.

  Args:
    student_logits: Floating logits of shape ``[..., num_classes]``.
    teacher_logits: Floating logits of the same shape.
    temperature: Softmax temperature :math:`T > 0` applied to both.
    axis: The class axis.
    where: Optional boolean mask broadcastable to the per-example shape.

  Returns:
    The per-example cross-entropy, shape ``[...]`` (float32 for 16-bit
    inputs).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses
    >>> logits = jnp.array([0.0, 0.0])
    >>> print(losses.soft_cross_entropy(logits, logits).round(4))
    0.6931

  References:
    Hinton, Vinyals and Dean, `Distilling the Knowledge in a Neural Network
    <https://arxiv.org/abs/1503.02531>`_, 2015.

  .. versionadded:: 0.1.0
  """
  def core(student, teacher, axis, _):
    # No cancellation here: the cross-entropy is at least the teacher's
    # entropy, so the plain sum keeps its relative precision.
    return cross_entropy_from_log_probs(
        scaled_log_softmax(teacher, temperature, axis),
        scaled_log_softmax(student, temperature, axis),
        axis,
    )

  return logit_pair_loss(
      core, student_logits, teacher_logits, temperature=temperature,
      axis=axis, where=where,
  )


def distillation_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    labels: ArrayLike,
    *,
    temperature: ArrayLike,
    alpha: ArrayLike,
    label_smoothing: ArrayLike = 0.0,
    axis: int = -1,
    where: ArrayLike | None = None,
) -> Array:
  r"""Hard-label cross-entropy mixed with the Hinton KD loss.

  .. math::
    \mathcal{L} = (1 - \alpha)\, H(y, \mathrm{softmax}(z^S))
    + \alpha\, T^2\, \mathrm{KL}\big(\mathrm{softmax}(z^T / T)
    \,\|\, \mathrm{softmax}(z^S / T)\big)

  where :math:`y` is the (optionally smoothed) label distribution
  :math:`(1 - \epsilon)\,\mathrm{onehot} + \epsilon / C`. The hard term uses
  temperature 1.

  Other conventions and how to convert:

  * ``alpha`` on the hard term (:math:`\alpha H + (1 - \alpha) T^2 KL`, as in
    some tutorials): pass ``alpha = 1 - alpha_hard``.
  * Two independent weights :math:`w_{ce} H + w_{kd} T^2 KL` (the CIFAR-100
    recipes of CRD/RepDistiller use ``0.1 CE + 0.9 KD``): pass
    ``alpha = w_kd / (w_ce + w_kd)`` and multiply the result by
    ``w_ce + w_kd`` (for 0.1/0.9 the sum is 1, so ``alpha = 0.9``).

  Args:
    student_logits: Floating logits of shape ``[..., num_classes]``.
    teacher_logits: Floating logits of the same shape.
    labels: Integer class indices of shape ``[...]``, or one-hot/soft labels
      of the logits' shape (see :func:`cross_entropy`, which computes the
      hard term). Concrete indices outside ``[0, num_classes)`` raise
      ``ValueError``; traced ones give ``nan`` for their example. Labels of
      rows masked out by ``where`` are ignored.
    temperature: Softmax temperature :math:`T > 0` of the soft term.
    alpha: Weight :math:`\alpha \in [0, 1]` of the soft term.
    label_smoothing: :math:`\epsilon \in [0, 1]` applied to the labels.
    axis: The class axis.
    where: Optional boolean mask broadcastable to the per-example shape.

  Returns:
    The per-example loss, shape ``[...]`` (float32 for 16-bit inputs).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses
    >>> student = jnp.array([[2.0, 0.0, 0.0]])
    >>> teacher = jnp.array([[3.0, 1.0, 0.0]])
    >>> loss = losses.distillation_loss(
    ...     student, teacher, jnp.array([0]), temperature=4.0, alpha=0.9)
    >>> print(loss.round(4))
    [0.1065]

  References:
    Hinton, Vinyals and Dean, `Distilling the Knowledge in a Neural Network
    <https://arxiv.org/abs/1503.02531>`_, 2015.

    Tian, Krishnan and Isola, `Contrastive Representation Distillation
    <https://arxiv.org/abs/1910.10699>`_, 2020 (the 0.1 CE + 0.9 KD recipe).

  .. versionadded:: 0.1.0
  """
  alpha_valid = v.check_in_unit_interval("alpha", alpha)
  smoothing_valid = v.check_in_unit_interval(
      "label_smoothing", label_smoothing
  )
  def core(student, teacher, axis, where):
    hard = _classification.cross_entropy_loss(
        student, labels, label_smoothing=label_smoothing, axis=axis,
        where=where,
    )
    soft = kl_from_logits(teacher, student, temperature, axis)
    weight = jnp.asarray(alpha).astype(soft.dtype)
    scale = jnp.asarray(temperature).astype(soft.dtype)
    return (1 - weight) * hard + weight * scale**2 * soft

  return logit_pair_loss(
      core, student_logits, teacher_logits, temperature=temperature,
      axis=axis, where=where, checks=(alpha_valid, smoothing_valid),
  )
