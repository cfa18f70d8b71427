"""Relational distillation losses: the batch's geometry, not single examples.

Every loss here compares how the examples of a batch relate to each other
(similarities, distances, angles, affinity distributions), so it is a
batch-level loss and returns a scalar. Inputs ``[batch, ...]`` are flattened
to ``[batch, features]``; student and teacher may have different feature
sizes. The optional ``where`` mask (shape ``[batch]``) drops examples from the
batch: the result equals the loss of the sliced batch ``x[where]``, computed
without a data-dependent shape by masking pairs (and triples).

The teacher's side is not wrapped in ``stop_gradient``: these are pure
functions of both arguments, and the caller decides which side is frozen.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxkd.losses import _feature
from jaxkd.losses import _soft_target
from jaxkd.losses import validation as v

Array = jax.Array
ArrayLike = Any

_PRECISION = jax.lax.Precision.HIGHEST


def _prepare_batch_pair(
    student: ArrayLike,
    teacher: ArrayLike,
    where: ArrayLike | None,
    names: tuple[str, str],
) -> tuple[Array, Array, Array | None, Array]:
  """Checks, casts and flattens a ``[batch, ...]`` pair.

  Returns ``(student, teacher, where, count)``: ``[batch, features]`` arrays
  in the compute dtype with masked-out rows zeroed, the mask broadcast to
  ``[batch]`` (or ``None``) and the number of kept examples as a scalar of
  the compute dtype.
  """
  s_name, t_name = names
  v.check_floating(s_name, student)
  v.check_floating(t_name, teacher)
  v.check_min_rank(s_name, student, 2)
  v.check_min_rank(t_name, teacher, 2)
  if student.shape[0] != teacher.shape[0]:
    raise ValueError(
        f"`{s_name}` and `{t_name}` must have the same batch size (first"
        f" dimension), got shapes {tuple(student.shape)} and"
        f" {tuple(teacher.shape)}."
    )
  student, teacher = v.as_compute_dtype(student, teacher)
  batch = student.shape[0]
  student = student.reshape(batch, -1)
  teacher = teacher.reshape(batch, -1)
  where = v.broadcast_where(where, (batch,))
  student = _feature.mask_examples(student, where)
  teacher = _feature.mask_examples(teacher, where)
  if where is None:
    count = jnp.asarray(batch, student.dtype)
  else:
    count = jnp.sum(where).astype(student.dtype)
  return student, teacher, where, count


def _safe_divide(total: Array, denominator: Array) -> Array:
  """``total / denominator``, and 0 (with zero gradient) where it is 0."""
  nonzero = denominator != 0  # nan stays nan
  one = jnp.ones((), denominator.dtype)
  quotient = total / jnp.where(nonzero, denominator, one)
  return jnp.where(nonzero, quotient, jnp.zeros((), quotient.dtype))


def _pair_mask(batch: int, where: Array | None) -> Array:
  """``[batch, batch]``: both examples kept."""
  if where is None:
    return jnp.ones((batch, batch), jnp.bool_)
  return where[:, None] & where[None, :]


def _smooth_l1(x: Array) -> Array:
  """PyTorch ``smooth_l1_loss`` with ``beta=1``: Huber loss with delta 1."""
  absolute = jnp.abs(x)
  return jnp.where(absolute < 1, 0.5 * jnp.square(x), absolute - 0.5)


def similarity_preserving_loss(
    student_features: ArrayLike,
    teacher_features: ArrayLike,
    *,
    where: ArrayLike | None = None,
) -> Array:
  r"""Similarity-preserving distillation: match row-normalised batch Grams.

  With :math:`F` the features flattened to ``[batch, features]``, the
  :math:`B \times B` Gram matrix :math:`G = F F^\top` has each row
  L2-normalised, and

  .. math::
    \mathcal{L}_{SP} = \frac{1}{B^2}
      \big\| \tilde G^S - \tilde G^T \big\|_F^2,
    \qquad \tilde G_{i\cdot} = \frac{G_{i\cdot}}{\|G_{i\cdot}\|_2}

  This is a batch-level loss: it returns a scalar. Feature sizes may differ
  between student and teacher. An all-zero example gives an all-zero row
  (and column) of :math:`G`, which stays zero with a finite gradient.

  Args:
    student_features: Floating features of shape ``[batch, ...]``.
    teacher_features: Floating features of shape ``[batch, ...]`` (any
      trailing shape).
    where: Optional boolean mask of shape ``[batch]`` (or broadcastable to
      it); the loss equals that of the batch sliced with it, and is 0 when no
      example is kept.

  Returns:
    A scalar; float32 for bfloat16 and float16 inputs.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses
    >>> student = jnp.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    >>> teacher = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    >>> print(f"{losses.similarity_preserving_loss(student, teacher):.4f}")
    0.1710

  References:
    Tung and Mori, `Similarity-Preserving Knowledge Distillation
    <https://arxiv.org/abs/1907.09682>`_, 2019.

  .. versionadded:: 0.1.0
  """
  student, teacher, _, count = _prepare_batch_pair(
      student_features, teacher_features, where,
      ("student_features", "teacher_features"),
  )
  # Zeroed (masked-out) rows give zero rows and columns in both Grams, so
  # they change neither the other rows' norms nor the sum.
  grams = [
      _feature.safe_l2_normalize(
          jnp.matmul(x, x.T, precision=_PRECISION), -1
      )
      for x in (student, teacher)
  ]
  total = jnp.sum(jnp.square(grams[0] - grams[1]))
  return _safe_divide(total, jnp.square(count))


def _pairwise_distances(x: Array) -> Array:
  """``[batch, d] -> [batch, batch]`` Euclidean distances from differences.

  Differences are formed first (not ``|x|^2 + |y|^2 - 2 x.y``, which cancels
  for nearby points), and the norm is exactly 0 with a finite gradient for
  coinciding rows.
  """
  return _feature.safe_norm(x[:, None, :] - x[None, :, :], -1)


def rkd_distance_loss(
    student_embeddings: ArrayLike,
    teacher_embeddings: ArrayLike,
    *,
    where: ArrayLike | None = None,
) -> Array:
  r"""Relational KD, distance-wise: match mean-normalised pairwise distances.

  .. math::
    \psi_{ij} = \frac{\|x_i - x_j\|_2}{\mu}, \quad
    \mu = \frac{1}{B(B - 1)} \sum_{i \ne j} \|x_i - x_j\|_2, \qquad
    \mathcal{L}_{RKD-D} = \frac{1}{B^2} \sum_{i \ne j}
      \ell_1^{\mathrm{smooth}}\big(\psi^S_{ij} - \psi^T_{ij}\big)

  with :math:`\ell_1^{\mathrm{smooth}}(x) = x^2 / 2` for :math:`|x| < 1` and
  :math:`|x| - 1/2` otherwise (PyTorch ``smooth_l1_loss``, ``beta=1``). The
  sum runs over the :math:`B(B-1)` distinct pairs but is divided by
  :math:`B^2`: this is the reduction of the reference implementation, which
  averages over all :math:`B^2` entries including the zero diagonal, so the
  numbers match published code. Dividing by the mean distance makes the loss
  invariant to scaling either side's embeddings; it is also invariant to
  rotations and translations. If all of a side's points coincide its mean is
  0 and its distances are taken as 0.

  This is a batch-level loss: it returns a scalar.

  Args:
    student_embeddings: Floating embeddings of shape ``[batch, ...]``.
    teacher_embeddings: Floating embeddings of shape ``[batch, ...]`` (the
      feature sizes may differ).
    where: Optional boolean mask of shape ``[batch]``; the loss equals that
      of the batch sliced with it.

  Returns:
    A scalar; float32 for bfloat16 and float16 inputs.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses
    >>> student = jnp.array([[0.0, 0.0], [3.0, 0.0], [3.0, 4.0]])
    >>> teacher = jnp.array([[0.0, 0.0], [2.0, 0.0], [1.0, 3.0 ** 0.5]])
    >>> print(f"{losses.rkd_distance_loss(student, teacher):.4f}")
    0.0139

  References:
    Park, Kim, Lu and Cho, `Relational Knowledge Distillation
    <https://arxiv.org/abs/1904.05068>`_, 2019.

  .. seealso:: :func:`rkd_angle_loss`.

  .. versionadded:: 0.1.0
  """
  student, teacher, where, count = _prepare_batch_pair(
      student_embeddings, teacher_embeddings, where,
      ("student_embeddings", "teacher_embeddings"),
  )
  batch = student.shape[0]
  pairs = _pair_mask(batch, where) & ~jnp.eye(batch, dtype=jnp.bool_)
  num_pairs = jnp.sum(pairs).astype(student.dtype)
  zero = jnp.zeros((), student.dtype)

  def normalized_distances(x: Array) -> Array:
    distances = jnp.where(pairs, _pairwise_distances(x), zero)
    mean = _safe_divide(jnp.sum(distances), num_pairs)
    return _safe_divide(distances, mean)

  terms = _smooth_l1(
      normalized_distances(student) - normalized_distances(teacher)
  )
  total = jnp.sum(jnp.where(pairs, terms, zero))
  return _safe_divide(total, jnp.square(count))


def _angle_cosines(x: Array) -> Array:
  """``[batch, d] -> [batch, batch, batch]``: ``e_ji . e_jk`` at ``[j, i, k]``.

  ``e_ji = (x_i - x_j) / |x_i - x_j|``; a zero difference (``i == j`` or
  duplicate rows) gives ``e = 0`` with a finite gradient.
  """
  directions = _feature.safe_l2_normalize(x[None, :, :] - x[:, None, :], -1)
  return jnp.einsum(
      "jid,jkd->jik", directions, directions, precision=_PRECISION
  )


def rkd_angle_loss(
    student_embeddings: ArrayLike,
    teacher_embeddings: ArrayLike,
    *,
    where: ArrayLike | None = None,
) -> Array:
  r"""Relational KD, angle-wise: match the cosines of all triplet angles.

  For every triple :math:`(i, j, k)` the cosine of the angle at :math:`x_j`,

  .. math::
    \cos\angle_{ijk} = e_{ij}^\top e_{kj}, \quad
    e_{ij} = \frac{x_i - x_j}{\|x_i - x_j\|_2}, \qquad
    \mathcal{L}_{RKD-A} = \frac{1}{B^3} \sum_{i,j,k}
      \ell_1^{\mathrm{smooth}}\big(\cos\angle^S_{ijk}
      - \cos\angle^T_{ijk}\big)

  with the smooth-L1 of :func:`rkd_distance_loss`. As in the reference
  implementation the mean runs over all :math:`B^3` entries; a degenerate
  triple (:math:`i = j`, :math:`k = j` or coinciding points) has
  :math:`e = 0`, hence cosine 0, on both sides unless only one side
  coincides. The loss is invariant to scaling, rotating and translating
  either side's embeddings.

  This is a batch-level loss: it returns a scalar. It builds
  ``[batch, batch, batch]`` and ``[batch, batch, features]`` intermediates.

  Args:
    student_embeddings: Floating embeddings of shape ``[batch, ...]``.
    teacher_embeddings: Floating embeddings of shape ``[batch, ...]`` (the
      feature sizes may differ).
    where: Optional boolean mask of shape ``[batch]``; the loss equals that
      of the batch sliced with it.

  Returns:
    A scalar; float32 for bfloat16 and float16 inputs.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses
    >>> student = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    >>> teacher = jnp.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    >>> print(f"{losses.rkd_angle_loss(student, teacher):.4f}")
    0.1296

  References:
    Park, Kim, Lu and Cho, `Relational Knowledge Distillation
    <https://arxiv.org/abs/1904.05068>`_, 2019.

  .. seealso:: :func:`rkd_distance_loss`.

  .. versionadded:: 0.1.0
  """
  student, teacher, where, count = _prepare_batch_pair(
      student_embeddings, teacher_embeddings, where,
      ("student_embeddings", "teacher_embeddings"),
  )
  terms = _smooth_l1(_angle_cosines(student) - _angle_cosines(teacher))
  if where is not None:
    triples = where[:, None, None] & where[None, :, None] & where[None, None, :]
    terms = jnp.where(triples, terms, jnp.zeros((), terms.dtype))
  return _safe_divide(jnp.sum(terms), count**3)


def _log_affinities(features: Array, pairs: Array, rows: Array) -> Array:
  """Row-normalised log-affinities ``log p_ij`` of the PKT model.

  ``m_ij = (1 + cos_ij) / 2`` in ``[0, 1]`` and ``p_ij = m_ij / sum_k m_ik``.
  Dropped columns get ``log p = -inf``; dropped rows are filled with finite
  values (and discarded by the caller) so no ``nan`` enters the backward pass.
  """
  unit = _feature.safe_l2_normalize(features, -1)
  cosines = jnp.matmul(unit, unit.T, precision=_PRECISION)
  # log m = log1p(cos) - log 2. The cosine of unit vectors is >= -1; a value
  # at or below -1 (antipodal points, or rounding) is an affinity of exactly
  # 0, i.e. log m = -inf, and the inner `where` keeps log1p away from -1 so
  # the backward pass sees no inf.
  positive = ~(cosines <= -1)  # nan stays nan
  safe = jnp.where(positive, cosines, jnp.zeros((), cosines.dtype))
  log_affinity = jnp.where(
      positive & pairs, jnp.log1p(safe) - math.log(2.0), -jnp.inf
  )
  # Every kept row contains its diagonal (m_ii >= 1/2), so its log-sum is
  # finite; a dropped row is set to 0 to keep logsumexp finite.
  log_affinity = jnp.where(
      rows[:, None], log_affinity, jnp.zeros((), log_affinity.dtype)
  )
  return log_affinity - jax.nn.logsumexp(log_affinity, axis=-1, keepdims=True)


def pkt_loss(
    student_features: ArrayLike,
    teacher_features: ArrayLike,
    *,
    where: ArrayLike | None = None,
) -> Array:
  r"""Probabilistic knowledge transfer: KL between batch affinity distributions.

  Features are flattened and L2-normalised per example; the cosine
  similarities are mapped to :math:`[0, 1]` and each row is normalised into
  a distribution over the batch:

  .. math::
    p_{ij} = \frac{(1 + \cos_{ij}) / 2}{\sum_k (1 + \cos_{ik}) / 2},
    \qquad
    \mathcal{L}_{PKT} = \frac{1}{B^2} \sum_{i, j}
      p^T_{ij} \big(\log p^T_{ij} - \log p^S_{ij}\big)

  The diagonal :math:`j = i` is included, and the sum is divided by
  :math:`B^2` (the mean over all entries), which is the reduction of the
  reference implementation. Unlike it, no epsilon enters the logarithm:
  :math:`0 \log 0 = 0` is exact, and a student affinity of exactly 0
  (antipodal student features) where the teacher's is positive gives
  ``inf``, which is the true divergence. An all-zero example has cosine 0
  with every example, and a finite gradient.

  This is a batch-level loss: it returns a scalar.

  Args:
    student_features: Floating features of shape ``[batch, ...]``.
    teacher_features: Floating features of shape ``[batch, ...]`` (the
      feature sizes may differ).
    where: Optional boolean mask of shape ``[batch]``; the loss equals that
      of the batch sliced with it.

  Returns:
    A scalar; float32 for bfloat16 and float16 inputs.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses
    >>> student = jnp.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    >>> teacher = jnp.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    >>> print(f"{losses.pkt_loss(student, teacher):.4f}")
    0.0644

  References:
    Passalis and Tefas, `Learning Deep Representations with Probabilistic
    Knowledge Transfer <https://arxiv.org/abs/1803.10837>`_, ECCV 2018.

  .. versionadded:: 0.1.0
  """
  student, teacher, where, count = _prepare_batch_pair(
      student_features, teacher_features, where,
      ("student_features", "teacher_features"),
  )
  batch = student.shape[0]
  pairs = _pair_mask(batch, where)
  rows = jnp.ones((batch,), jnp.bool_) if where is None else where
  log_p_teacher = _log_affinities(teacher, pairs, rows)
  log_p_student = _log_affinities(student, pairs, rows)
  per_row = _soft_target.kl_from_log_probs(log_p_teacher, log_p_student, -1)
  total = jnp.sum(jnp.where(rows, per_row, jnp.zeros((), per_row.dtype)))
  return _safe_divide(total, jnp.square(count))
