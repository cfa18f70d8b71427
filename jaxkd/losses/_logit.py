"""Regression on logits (Ba and Caruana, 2014).

The student matches the teacher's raw logits rather than its probabilities.
Unlike the divergences of soft targets, this loss is not invariant to adding a
constant to a row of logits: it asks the student to reproduce the teacher's
logits exactly, offset included.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxkd.losses import _soft_target

Array = jax.Array
ArrayLike = Any


def logit_regression_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    axis: int = -1,
    where: ArrayLike | None = None,
) -> Array:
  r"""Mean squared difference between student and teacher logits.

  .. math::
    \mathcal{L} = \frac{1}{C} \sum_{c=1}^{C} (z^S_c - z^T_c)^2

  with :math:`C` the number of classes. The squared error is averaged over
  the class axis, not summed: Ba and Caruana's objective
  :math:`\frac{1}{2} \sum_c (z^S_c - z^T_c)^2` equals ``C / 2`` times this
  loss. There is no temperature: logits are compared as they are, so the loss
  is not invariant to adding a constant to a row of logits. Logits must be
  finite.

  Args:
    student_logits: Floating logits of shape ``[..., num_classes]``.
    teacher_logits: Floating logits of the same shape.
    axis: The class axis.
    where: Optional boolean mask broadcastable to the per-example shape
      ``[...]``; masked-out examples give 0 and no gradient.

  Returns:
    The per-example loss, shape ``[...]`` (the input shape without ``axis``);
    float32 for bfloat16 and float16 inputs.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses
    >>> student = jnp.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    >>> teacher = jnp.array([[1.0, 2.0, 6.0], [1.0, 1.0, 1.0]])
    >>> print(losses.logit_regression_loss(student, teacher).round(4))
    [3. 1.]

  References:
    Ba and Caruana, `Do Deep Nets Really Need to be Deep?
    <https://arxiv.org/abs/1312.6184>`_, 2014.

  .. versionadded:: 0.1.0
  """
  # Temperature 1 only satisfies the shared checks; it is not used.
  return _soft_target.logit_pair_loss(
      lambda student, teacher, axis, _: jnp.mean(
          jnp.square(student - teacher), axis=axis
      ),
      student_logits, teacher_logits, temperature=1.0, axis=axis, where=where,
  )
