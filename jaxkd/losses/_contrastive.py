"""Contrastive representation distillation with a FIFO queue of negatives.

The student and teacher embeddings are compared after L2 normalisation with
an InfoNCE objective (Tian, Krishnan and Isola, 2020, in the queue form of
He et al., 2020). Past embeddings live in a fixed-size first-in first-out
queue, a :class:`CRDQueue`, that the loss returns updated; the caller carries
it from step to step like an optimiser state.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxkd.losses import validation as v

Array = jax.Array
ArrayLike = Any

# The similarity logits are divided by a small temperature (0.07 by default),
# which multiplies any rounding in the dot products by about 14; on
# accelerators the default matmul precision may use bfloat16 passes, so the
# (cheap, [B, N]) similarity matmuls ask for full precision.
_PRECISION = jax.lax.Precision.HIGHEST


class CRDQueue(NamedTuple):
  """FIFO queues of past L2-normalised embeddings, newest first.

  Attributes:
    student: Student embeddings of shape ``[size, dim]``: the negatives of the
      teacher anchors.
    teacher: Teacher embeddings of shape ``[size, dim]``: the negatives of the
      student anchors.

  A row of zeros is an empty slot: it is not used as a negative.

  .. versionadded:: 0.1.0
  """

  student: Array
  teacher: Array


def _l2_normalize(x: Array) -> Array:
  """Rows of ``x`` scaled to unit L2 norm; zero rows stay zero.

  The double ``where`` keeps ``1 / sqrt(0)`` out of both the value and the
  gradient: a zero row gets a zero output and a zero gradient.
  """
  squared_norm = jnp.sum(x * x, axis=-1, keepdims=True)
  nonzero = squared_norm != 0  # nan stays nan
  safe = jnp.where(nonzero, squared_norm, jnp.ones((), x.dtype))
  scale = jnp.where(nonzero, jax.lax.rsqrt(safe), jnp.zeros((), x.dtype))
  return x * scale


def init_crd_queue(
    size: int,
    dim: int,
    *,
    dtype: Any = jnp.float32,
    key: Array | None = None,
) -> CRDQueue:
  """Creates a :class:`CRDQueue` of ``size`` slots for ``dim``-dim embeddings.

  Args:
    size: Number of slots :math:`N` in each of the two queues.
    dim: Embedding dimension :math:`D` (after the adaptors).
    dtype: Floating dtype of the queues.
    key: Optional PRNG key. With a key the queues hold random unit vectors
      (independent for the student and the teacher), which act as negatives
      from the first step on; without one they hold zeros, i.e. empty slots
      that :func:`crd_loss` ignores until real embeddings fill them.

  Returns:
    A :class:`CRDQueue` of two ``[size, dim]`` arrays of ``dtype``.

  Examples:
    >>> from jaxkd import losses
    >>> queue = losses.init_crd_queue(3, 2)
    >>> print(queue.student.shape, queue.teacher.dtype)
    (3, 2) float32

  .. versionadded:: 0.1.0
  """
  size = v.check_int("size", size)
  dim = v.check_int("dim", dim)
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"`dtype` must be a floating dtype, got {dtype}.")
  if key is None:
    zeros = jnp.zeros((size, dim), dtype)
    return CRDQueue(student=zeros, teacher=zeros)
  # Drawn in at least float32 so that 16-bit queues hold rounded unit vectors
  # rather than vectors normalised in 16 bits.
  draw_dtype = jnp.float64 if dtype.itemsize > 4 else jnp.float32
  student_key, teacher_key = jax.random.split(key)
  student = jax.random.normal(student_key, (size, dim), draw_dtype)
  teacher = jax.random.normal(teacher_key, (size, dim), draw_dtype)
  return CRDQueue(
      student=_l2_normalize(student).astype(dtype),
      teacher=_l2_normalize(teacher).astype(dtype),
  )


def _enqueue(queue: Array, batch: Array) -> Array:
  """``concatenate([batch, queue])[:N]``: newest first, oldest dropped."""
  size = queue.shape[0]
  batch = jax.lax.stop_gradient(batch).astype(queue.dtype)
  return jnp.concatenate([batch, queue], axis=0)[:size]


def _info_nce(
    anchors: Array,
    positives: Array,
    queue: Array,
    batch_negatives: Array | None,
    temperature: Array,
) -> Array:
  """Per-anchor InfoNCE: ``-log_softmax([pos, negatives])[0]``.

  ``queue`` rows of zeros and ``False`` entries of ``batch_negatives``
  (``[B, B]``, ``None`` for no in-batch negatives) are left out of the
  softmax with ``-inf`` logits; the positive is always finite, so the softmax
  is well defined and the left-out entries get exactly zero gradient.
  """
  minus_inf = jnp.asarray(-jnp.inf, anchors.dtype)
  positive = jnp.sum(anchors * positives, axis=-1, keepdims=True)
  occupied = jnp.any(queue != 0, axis=-1)
  queue_logits = jnp.matmul(anchors, queue.T, precision=_PRECISION)
  queue_logits = jnp.where(occupied[None, :], queue_logits, minus_inf)
  logits = [positive, queue_logits]
  if batch_negatives is not None:
    batch_logits = jnp.matmul(anchors, positives.T, precision=_PRECISION)
    logits.append(jnp.where(batch_negatives, batch_logits, minus_inf))
  logits = jnp.concatenate(logits, axis=-1) / temperature
  return -jax.nn.log_softmax(logits, axis=-1)[:, 0]


def crd_loss(
    student_embed: ArrayLike,
    teacher_embed: ArrayLike,
    queue: CRDQueue,
    *,
    temperature: ArrayLike = 0.07,
    in_batch_negatives: bool = False,
    where: ArrayLike | None = None,
) -> tuple[Array, CRDQueue]:
  r"""Contrastive representation distillation (InfoNCE with a FIFO queue).

  Both embeddings are L2-normalised (zero rows stay zero). For the student
  anchor :math:`s_i` the positive is the teacher embedding :math:`t_i` of the
  same example and the negatives are the teacher queue :math:`\{u_k\}` (and,
  with ``in_batch_negatives=True``, the other teachers of the batch
  :math:`t_j, j \neq i`); symmetrically for the teacher anchor :math:`t_i`
  against the student queue :math:`\{v_k\}`:

  .. math::
    \ell^S_i = -\log \frac{e^{s_i \cdot t_i / \tau}}
      {e^{s_i \cdot t_i / \tau} + \sum_k e^{s_i \cdot u_k / \tau}},
    \qquad
    \ell^T_i = -\log \frac{e^{t_i \cdot s_i / \tau}}
      {e^{t_i \cdot s_i / \tau} + \sum_k e^{t_i \cdot v_k / \tau}},
    \qquad
    \mathcal{L} = \frac{1}{B} \sum_i \frac{\ell^S_i + \ell^T_i}{2}

  This is a **batch-level** loss: it returns a scalar (the mean over the
  valid anchors), not per-example values.

  Departure from the paper: the original CRD keeps a memory bank with one
  momentum-updated (0.5) slot per training example, draws 16384 negatives
  from it per anchor and optimises a noise-contrastive estimation (NCE)
  bound with a fixed normalisation constant. This function uses instead a
  fixed-size FIFO queue of the most recent embeddings (as in MoCo, He et al.,
  2020), so its memory does not grow with the data set and it needs no
  example indices, and it optimises the exact softmax cross-entropy
  (InfoNCE, van den Oord et al., 2018) over the positive and the queued
  negatives rather than the NCE approximation. The default temperature,
  0.07, is the paper's.

  Gradients flow into both embeddings (the function is pure). In a train
  step the teacher embedding comes from the frozen teacher's features
  through a *trainable* adaptor (projection head), so that gradient trains
  the adaptor, not the teacher; stop it yourself if the adaptor is fixed.
  The queue update is under ``stop_gradient``.

  Args:
    student_embed: Floating embeddings of shape ``[batch, dim]`` (already
      projected to the common dimension).
    teacher_embed: Floating embeddings of the same shape.
    queue: A :class:`CRDQueue` of two ``[size, dim]`` arrays (see
      :func:`init_crd_queue`); zero rows are empty slots and are not used as
      negatives.
    temperature: Softmax temperature :math:`\tau > 0`.
    in_batch_negatives: Also use the other examples of the batch as
      negatives (static Python bool).
    where: Optional boolean mask of shape ``[batch]``. Masked-out examples
      are neither anchors nor in-batch negatives and get no gradient; the
      loss is the mean over the valid anchors (0 if there are none). To keep
      shapes static every row is enqueued, masked rows as zeros, i.e. as
      empty slots.

  Returns:
    ``(loss, new_queue)``: the scalar loss (float32 for 16-bit inputs) and
    the queue with the batch's normalised embeddings in front, newest first,
    and the oldest ``batch`` rows dropped: ``concatenate([batch, queue])
    [:size]``. If ``batch >= size`` the new queue is the first ``size`` rows
    of the batch. The queue keeps its dtype.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses
    >>> queue = losses.init_crd_queue(3, 2)  # empty slots
    >>> student = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    >>> teacher = jnp.array([[3.0, 0.0], [0.0, 1.0]])
    >>> loss, queue = losses.crd_loss(
    ...     student, teacher, queue, temperature=1.0, in_batch_negatives=True)
    >>> print(f"{loss:.4f}")  # log(1 + exp(-1))
    0.3133
    >>> print(queue.student)
    [[1. 0.]
     [0. 1.]
     [0. 0.]]

  References:
    Tian, Krishnan and Isola, `Contrastive Representation Distillation
    <https://arxiv.org/abs/1910.10699>`_, 2020.

    He, Fan, Wu, Xie and Girshick, `Momentum Contrast for Unsupervised Visual
    Representation Learning <https://arxiv.org/abs/1911.05722>`_, 2020.

    van den Oord, Li and Vinyals, `Representation Learning with Contrastive
    Predictive Coding <https://arxiv.org/abs/1807.03748>`_, 2018.

  .. versionadded:: 0.1.0
  """
  v.check_floating("student_embed", student_embed)
  v.check_floating("teacher_embed", teacher_embed)
  v.check_rank("student_embed", student_embed, 2)
  v.check_same_shape(
      "student_embed", student_embed, "teacher_embed", teacher_embed
  )
  if not isinstance(queue, tuple) or len(queue) != 2:
    raise TypeError(
        "`queue` must be a CRDQueue(student, teacher) of two [size, dim]"
        f" arrays, got {type(queue).__name__}."
    )
  old_student_queue, old_teacher_queue = queue
  student_queue, teacher_queue = queue
  v.check_floating("queue.student", student_queue)
  v.check_floating("queue.teacher", teacher_queue)
  v.check_rank("queue.student", student_queue, 2)
  v.check_same_shape(
      "queue.student", student_queue, "queue.teacher", teacher_queue
  )
  if student_queue.shape[1] != student_embed.shape[1]:
    raise ValueError(
        "The embedding dimension of `queue` must match `student_embed`: got"
        f" queue of shape {tuple(student_queue.shape)} and embeddings of"
        f" shape {tuple(student_embed.shape)}."
    )
  if not isinstance(in_batch_negatives, bool):
    raise TypeError(
        f"`in_batch_negatives` must be a bool, got {in_batch_negatives!r}."
    )
  valid = v.check_positive("temperature", temperature)
  student, teacher, student_queue, teacher_queue = v.as_compute_dtype(
      student_embed, teacher_embed, student_queue, teacher_queue
  )
  batch = student.shape[0]
  where = v.broadcast_where(where, (batch,))
  if where is not None:
    # Zeroed before anything else so that nan/inf in masked rows reach
    # neither the value nor the gradient.
    zero = jnp.zeros((), student.dtype)
    student = jnp.where(where[:, None], student, zero)
    teacher = jnp.where(where[:, None], teacher, zero)
  student = _l2_normalize(student)
  teacher = _l2_normalize(teacher)
  temperature = jnp.asarray(temperature).astype(student.dtype)

  batch_negatives = None
  if in_batch_negatives:
    batch_negatives = ~jnp.eye(batch, dtype=bool)
    if where is not None:
      batch_negatives = batch_negatives & where[None, :]
  # [B, B] mask: row i are anchor i's negatives; the teacher anchors' matrix
  # of student negatives is the transpose of the same similarity, and the
  # mask is the same because it only depends on the negative's index.
  loss_student = _info_nce(
      student, teacher, teacher_queue, batch_negatives, temperature
  )
  loss_teacher = _info_nce(
      teacher, student, student_queue, batch_negatives, temperature
  )
  per_anchor = (loss_student + loss_teacher) / 2
  if where is None:
    loss = jnp.mean(per_anchor)
  else:
    per_anchor = v.apply_where(per_anchor, where)
    count = jnp.maximum(jnp.sum(where), 1).astype(per_anchor.dtype)
    loss = jnp.sum(per_anchor) / count
  loss = v.nan_unless(valid, loss)

  new_queue = CRDQueue(
      student=_enqueue(jnp.asarray(old_student_queue), student),
      teacher=_enqueue(jnp.asarray(old_teacher_queue), teacher),
  )
  return loss, new_queue
