r"""KL divergence from a sparse (top-k) teacher, as an offline cache stores it.

The teacher arrives as the log-probabilities of its ``k`` most likely tokens
(at temperature 1) and their vocabulary indices; the student is dense over
the whole vocabulary. The divergence is computed with the same accurate
logit-pair machinery as the dense losses (:mod:`jaxkd.losses._log_ratio`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.losses import _log_ratio
from jaxkd.losses import validation as v

Array = jax.Array
ArrayLike = Any

_TAILS = ("bucket", "renormalize", "drop")


def _check_sparse_inputs(
    student_logits: Any,
    teacher_log_probs: Any,
    teacher_indices: Any,
    axis: int,
) -> tuple[int, int, int]:
  """Shapes and dtypes; returns ``(axis, k, vocab)``."""
  v.check_floating("student_logits", student_logits)
  v.check_floating("teacher_log_probs", teacher_log_probs)
  v.check_integer("teacher_indices", teacher_indices)
  v.check_min_rank("student_logits", student_logits, 1)
  axis = v.normalize_axis("student_logits", student_logits, axis)
  v.check_same_shape(
      "teacher_log_probs", teacher_log_probs, "teacher_indices",
      teacher_indices,
  )
  student_shape = tuple(student_logits.shape)
  teacher_shape = tuple(teacher_log_probs.shape)
  vocab = student_shape[axis]
  if len(teacher_shape) != len(student_shape) or any(
      a != b for i, (a, b) in enumerate(zip(teacher_shape, student_shape))
      if i != axis
  ):
    raise ValueError(
        "`teacher_log_probs` and `teacher_indices` must have the shape of"
        f" `student_logits` {student_shape} with the vocabulary axis {axis}"
        f" replaced by k, got {teacher_shape}."
    )
  k = teacher_shape[axis]
  if k < 1 or k > vocab:
    raise ValueError(
        f"The number of teacher entries k = {k} (axis {axis} of"
        f" `teacher_log_probs`) must lie in [1, vocab = {vocab}]."
    )
  return axis, k, vocab


def _check_concrete_indices(
    teacher_log_probs: Any, teacher_indices: Any, vocab: int, axis: int,
    where: Any,
) -> None:
  """Range and duplicates of the used slots, when everything is concrete."""
  indices = v.concrete_value(teacher_indices)
  log_probs = v.concrete_value(teacher_log_probs)
  kept = None if where is None else v.concrete_value(where)
  if indices is None or log_probs is None or (
      where is not None and kept is None
  ):
    return
  indices = np.moveaxis(indices, axis, -1)
  used = np.moveaxis(log_probs, axis, -1) != -np.inf
  if kept is not None:
    used = used & np.broadcast_to(kept, indices.shape[:-1])[..., None]
  bad = used & ((indices < 0) | (indices >= vocab))
  if np.any(bad):
    raise ValueError(
        f"`teacher_indices` must lie in [0, {vocab}) (the vocabulary), got"
        f" {indices[bad].ravel()[:5].tolist()}."
    )
  flat = np.where(used, indices, -1 - np.arange(indices.shape[-1]))
  flat = np.sort(flat.reshape(-1, indices.shape[-1]), axis=-1)
  if np.any(flat[:, 1:] == flat[:, :-1]):
    raise ValueError(
        "`teacher_indices` must not repeat a vocabulary index among the"
        " used slots (those whose log-probability is not -inf)."
    )


def sparse_kl_divergence(
    student_logits: ArrayLike,
    teacher_log_probs: ArrayLike,
    teacher_indices: ArrayLike,
    *,
    temperature: ArrayLike = 1.0,
    tail: str = "bucket",
    axis: int = -1,
    where: ArrayLike | None = None,
) -> Array:
  r"""KL divergence from a top-k teacher to the student's full distribution.

  The teacher is given as the log-probabilities :math:`\ell_i` (at
  temperature 1, as a cache stores them) of ``k`` vocabulary entries
  :math:`v_i`; ``-inf`` marks an unused slot. Its kept mass is
  :math:`P_K = \sum_i e^{\ell_i}` and its tail mass :math:`1 - P_K`. The
  student :math:`q = \mathrm{softmax}(z / T)` is dense over the vocabulary.
  ``temperature`` re-tempers both sides: the teacher's kept entries (and its
  tail, where there is one) become :math:`\propto e^{\ell_i / T}`. Then, with
  :math:`K` the kept set:

  * ``tail="bucket"`` (default): each side keeps its remaining mass as one
    extra class. The teacher is :math:`\mathrm{softmax}([\ell_1, \ldots,
    \ell_k, \log(1 - P_K)] / T)` (the tail tempered as if it were one
    token); the student is :math:`[q_{v_1}, \ldots, q_{v_k}, 1 - \sum_i
    q_{v_i}]`, its tail mass a ``logsumexp`` over the classes outside
    :math:`K` (exact, no cancellation). :math:`\log(1 - P_K)` is
    ``log(-expm1(logsumexp(l)))``; a tail below the float rounding of the
    kept sum (:math:`2 k \epsilon`) counts as 0, so ``k = vocab`` is the
    dense KL.
  * ``tail="renormalize"``: both sides renormalised over :math:`K`:
    :math:`\mathrm{KL}(\hat p \,\|\, \hat q)` with
    :math:`\hat p_i \propto e^{\ell_i / T}`,
    :math:`\hat q_i \propto e^{z_{v_i} / T}`.
  * ``tail="drop"``: the teacher renormalised over :math:`K`, the student's
    full-vocabulary log-probabilities there:
    :math:`\sum_i \hat p_i (\log \hat p_i - \log q_{v_i})`, which is the
    renormalised value plus :math:`-\log \sum_i q_{v_i}`.

  All three are true KL divergences of the distributions they describe
  (:math:`\ge 0`), computed from the logit difference like
  :func:`kl_divergence`, so they are float32-accurate at any temperature;
  with ``k = vocab`` all equal the dense :func:`kl_divergence` of
  ``teacher_log_probs`` scattered back as logits. No :math:`T^2` factor is
  applied.

  Args:
    student_logits: Floating logits of shape ``[..., vocab]`` (vocabulary
      axis ``axis``).
    teacher_log_probs: Floating log-probabilities of shape ``[..., k]``
      (axis ``axis``, ``k <= vocab``), the teacher's at temperature 1;
      ``-inf`` marks an unused slot.
    teacher_indices: Integer vocabulary indices of the same shape. Used
      slots must hold distinct indices in ``[0, vocab)``: a concrete
      violation raises ``ValueError``; a traced one gives ``nan`` for that
      example.
    temperature: Softmax temperature :math:`T > 0` applied to both.
    tail: ``"bucket"``, ``"renormalize"`` or ``"drop"`` (see above).
    axis: The vocabulary axis (of all three arrays).
    where: Optional boolean mask broadcastable to the per-example shape
      ``[...]`` (a token mask); masked-out examples give 0 and no gradient,
      whatever their indices hold.

  Returns:
    The per-example divergence, shape ``[...]``; float32 for bfloat16 and
    float16 inputs.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses
    >>> student = jnp.log(jnp.array([0.5, 0.3, 0.1, 0.1]))
    >>> teacher = jnp.log(jnp.array([0.6, 0.3]))
    >>> indices = jnp.array([0, 1])
    >>> for tail in ("bucket", "renormalize", "drop"):
    ...   kl = losses.sparse_kl_divergence(student, teacher, indices, tail=tail)
    ...   print(tail, f"{kl:.4f}")
    bucket 0.0401
    renormalize 0.0038
    drop 0.2269

  References:
    Anshumann, Zaidi, Kedia, Ahn, Kwon, Lee, Lee and Lee, `Sparse Logit
    Sampling: Accelerating Knowledge Distillation in LLMs
    <https://arxiv.org/abs/2503.16870>`_, 2025 (top-k caches and their bias).

  .. seealso:: :func:`kl_divergence` (the dense teacher).

  .. versionadded:: 0.1.0
  """
  v.check_choice("tail", tail, _TAILS)
  axis, k, vocab = _check_sparse_inputs(
      student_logits, teacher_log_probs, teacher_indices, axis
  )
  valid = v.check_positive("temperature", temperature)
  where = v.example_where(where, student_logits, axis)
  _check_concrete_indices(
      teacher_log_probs, teacher_indices, vocab, axis, where
  )
  student, teacher = v.as_compute_dtype(student_logits, teacher_log_probs)
  indices = jnp.asarray(teacher_indices)
  student = jnp.moveaxis(student, axis, -1)
  teacher = jnp.moveaxis(teacher, axis, -1)
  indices = jnp.moveaxis(indices, axis, -1)
  if where is not None:
    # Masked rows become a harmless one-entry teacher at index 0.
    row = where[..., None]
    first = jnp.arange(k) == 0
    student = jnp.where(row, student, jnp.zeros((), student.dtype))
    teacher = jnp.where(
        row, teacher,
        jnp.where(first, jnp.zeros((), teacher.dtype), -jnp.inf),
    )
    indices = jnp.where(row, indices, jnp.zeros((), indices.dtype))
  loss = _sparse_core(student, teacher, indices, temperature, tail)
  return v.nan_unless(valid, v.apply_where(loss, where))


@functools.partial(jax.jit, static_argnames=("tail",))
def _sparse_core(
    student: Array,
    teacher: Array,
    indices: Array,
    temperature: ArrayLike,
    tail: str,
) -> Array:
  """The per-example loss; the vocabulary axis is last."""
  dtype = student.dtype
  leading = student.shape[:-1]
  vocab, k = student.shape[-1], teacher.shape[-1]
  rows = int(np.prod(leading, dtype=np.int64))
  student = student.reshape(rows, vocab)
  teacher = teacher.reshape(rows, k)
  indices = indices.reshape(rows, k).astype(jnp.int32)
  neg_inf = jnp.full((), -jnp.inf, dtype)

  used = _log_ratio.supported(teacher)
  in_range = (indices >= 0) & (indices < vocab)
  good = used & in_range
  # Traced problems: an out-of-range or repeated index among the used slots.
  slot = jnp.arange(k, dtype=jnp.int32)
  keys = jnp.sort(jnp.where(good, indices, -1 - slot), axis=-1)
  repeated = jnp.any(keys[:, 1:] == keys[:, :-1], axis=-1)
  broken = jnp.any(used & ~in_range, axis=-1) | repeated
  # Unused (or broken) slots scatter into a dummy column `vocab`.
  scatter_at = jnp.where(good, indices, vocab)
  gather_at = jnp.where(good, indices, 0)
  row_ids = jnp.arange(rows)[:, None]

  if tail == "drop":
    dense = jnp.full((rows, vocab + 1), -jnp.inf, dtype)
    dense = dense.at[row_ids, scatter_at].set(
        jnp.where(good, teacher, neg_inf)
    )[:, :vocab]
    pair = _log_ratio.logit_pair(dense, student, temperature, -1)
  else:
    picked = jnp.take_along_axis(student, gather_at, axis=-1)
    if tail == "renormalize":
      pair = _log_ratio.logit_pair(
          teacher, picked, temperature, -1, classes=good
      )
    else:
      kept = jnp.zeros((rows, vocab + 1), jnp.bool_)
      kept = kept.at[row_ids, scatter_at].set(True)[:, :vocab]
      teacher_tail = _teacher_tail(teacher, good, k)
      student_tail = _student_tail(student, ~kept, temperature)
      pair = _log_ratio.logit_pair(
          jnp.concatenate([teacher, teacher_tail[:, None]], axis=-1),
          jnp.concatenate([picked, student_tail[:, None]], axis=-1),
          temperature,
          -1,
          classes=jnp.concatenate(
              [good, jnp.ones((rows, 1), jnp.bool_)], axis=-1
          ),
      )
  loss = _log_ratio.forward_kl(pair)
  loss = jnp.where(broken, jnp.full((), jnp.nan, dtype), loss)
  loss = v.nan_where_nan(loss, student, teacher, axis=-1)
  return loss.reshape(leading)


def _teacher_tail(teacher: Array, good: Array, k: int) -> Array:
  """``log(1 - P_K)``; ``-inf`` for a tail within the rounding of the sum."""
  dtype = teacher.dtype
  log_kept = _log_ratio.masked_logsumexp(teacher, good, -1)
  mass = -jnp.expm1(jnp.minimum(log_kept, jnp.zeros((), dtype)))
  # Summing k probabilities rounds by up to ~k eps: a smaller tail is noise.
  floor = 2 * k * jnp.finfo(dtype).eps
  real = mass > floor
  safe = jnp.where(real, mass, jnp.ones((), dtype))
  return jnp.where(real, jnp.log(safe), jnp.full((), -jnp.inf, dtype))


def _student_tail(
    student: Array, outside: Array, temperature: ArrayLike
) -> Array:
  """A logit ``c`` with ``exp(c / T) = sum_{outside} exp(z / T)``.

  ``T * logsumexp(z / T)`` over the classes outside the kept set, formed as
  ``max + T * log sum exp((z - max) / T)``; ``-inf`` when nothing is left.
  """
  dtype = student.dtype
  temperature = jnp.asarray(temperature).astype(dtype)
  mask = outside & _log_ratio.supported(student)
  top = jnp.max(jnp.where(mask, student, -jnp.inf), axis=-1, keepdims=True)
  top = jax.lax.stop_gradient(
      jnp.where(top == -jnp.inf, jnp.zeros((), dtype), top)
  )
  scaled = jnp.where(mask, (jnp.where(mask, student, top) - top) / temperature,
                     -jnp.inf)
  log_sum = _log_ratio.masked_logsumexp(scaled, mask, -1)
  has = jnp.any(mask, axis=-1)
  safe = jnp.where(has, log_sum, jnp.zeros((), dtype))
  return jnp.where(
      has, jnp.squeeze(top, -1) + temperature * safe,
      jnp.full((), -jnp.inf, dtype),
  )
