r"""Adversarial distillation: GAN losses for a teacher-versus-student critic.

A discriminator :math:`D` sees teacher outputs or features ("real") and the
student's ("fake") and returns one logit per example; the student, as the
generator, is trained to make its outputs look like the teacher's. The
losses are the GAN losses of Goodfellow et al. (2014), the generator's in its
non-saturating form, written with ``softplus``
(:math:`-\log \sigma(x) = \mathrm{softplus}(-x)`) so that they stay finite
and exact for logits of any size.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxkd.losses import validation as v

Array = jax.Array
ArrayLike = Any


def _prepare_logits(
    name: str, logits: ArrayLike, where: ArrayLike | None
) -> tuple[Array, Array | None]:
  """Checks and casts ``logits``; zeros the entries masked out by ``where``."""
  v.check_floating(name, logits)
  (logits,) = v.as_compute_dtype(logits)
  where = v.broadcast_where(where, logits.shape)
  if where is not None:
    logits = jnp.where(where, logits, jnp.zeros((), logits.dtype))
  return logits, where


def discriminator_loss(
    real_logits: ArrayLike,
    fake_logits: ArrayLike,
    *,
    where: ArrayLike | None = None,
) -> Array:
  r"""Discriminator loss: teacher outputs are real, student outputs fake.

  .. math::
    \mathcal{L}_D = -\log \sigma(d_{real}) - \log\big(1 - \sigma(d_{fake})\big)
    = \mathrm{softplus}(-d_{real}) + \mathrm{softplus}(d_{fake})

  where :math:`d` are the discriminator's logits. Written with ``softplus``,
  the loss is exact and finite for any finite logits (no
  ``log(sigmoid(x))``, which underflows to ``-inf`` for large negative
  ``x``).

  When this loss updates the discriminator, the student's output that
  produced ``fake_logits`` should be under ``jax.lax.stop_gradient`` (or
  differentiated only with respect to the discriminator's parameters);
  otherwise the student would be pushed to help the discriminator.

  Args:
    real_logits: Floating discriminator logits for the teacher's outputs,
      shape ``[...]`` (one logit per example; a discriminator that returns
      ``[batch, 1]`` gives ``[batch, 1]``, squeeze it first if you want
      ``[batch]``).
    fake_logits: Floating logits for the student's outputs on the same
      examples, the same shape.
    where: Optional boolean mask broadcastable to ``[...]``; masked-out
      examples give 0 and no gradient.

  Returns:
    The per-example loss with the shape of the logits (float32 for 16-bit
    inputs).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses
    >>> real = jnp.array([0.0, 3.0])
    >>> fake = jnp.array([0.0, -3.0])
    >>> print(losses.discriminator_loss(real, fake).round(4))  # 2 log 2, ...
    [1.3863 0.0972]

  References:
    Goodfellow, Pouget-Abadie, Mirza, Xu, Warde-Farley, Ozair, Courville and
    Bengio, `Generative Adversarial Nets
    <https://arxiv.org/abs/1406.2661>`_, 2014.

    Wang, Zhang, Sun and Qi, `KDGAN: Knowledge Distillation with Generative
    Adversarial Networks
    <https://papers.nips.cc/paper/7358-kdgan-knowledge-distillation-with-generative-adversarial-networks>`_,
    2018.

    Xu, Hsu and Huang, `Training Shallow and Thin Networks for Acceleration
    via Knowledge Distillation with Conditional Adversarial Networks
    <https://arxiv.org/abs/1709.00513>`_, 2018.

  .. seealso:: :func:`generator_loss`.

  .. versionadded:: 0.1.0
  """
  v.check_floating("real_logits", real_logits)
  v.check_floating("fake_logits", fake_logits)
  v.check_same_shape("real_logits", real_logits, "fake_logits", fake_logits)
  real_logits, fake_logits = v.as_compute_dtype(real_logits, fake_logits)
  real_logits, where = _prepare_logits("real_logits", real_logits, where)
  fake_logits, _ = _prepare_logits("fake_logits", fake_logits, where)
  # softplus(x) = logaddexp(x, 0): exact for large |x| in both directions.
  loss = jax.nn.softplus(-real_logits) + jax.nn.softplus(fake_logits)
  return v.apply_where(loss, where)


def generator_loss(
    fake_logits: ArrayLike, *, where: ArrayLike | None = None
) -> Array:
  r"""Non-saturating generator loss: the student tries to look like the teacher.

  .. math::
    \mathcal{L}_G = -\log \sigma(d_{fake}) = \mathrm{softplus}(-d_{fake})

  The non-saturating form (rather than minimising
  :math:`\log(1 - \sigma(d_{fake}))`) keeps a strong gradient while the
  discriminator confidently rejects the student's outputs. The gradient
  reaches the student through ``fake_logits``; the discriminator's
  parameters should not be updated with it.

  Args:
    fake_logits: Floating discriminator logits for the student's outputs,
      shape ``[...]``.
    where: Optional boolean mask broadcastable to ``[...]``; masked-out
      examples give 0 and no gradient.

  Returns:
    The per-example loss with the shape of ``fake_logits`` (float32 for
    16-bit inputs).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses
    >>> print(losses.generator_loss(jnp.array([0.0, 3.0, -3.0])).round(4))
    [0.6931 0.0486 3.0486]

  References:
    Goodfellow, Pouget-Abadie, Mirza, Xu, Warde-Farley, Ozair, Courville and
    Bengio, `Generative Adversarial Nets
    <https://arxiv.org/abs/1406.2661>`_, 2014.

    Xu, Hsu and Huang, `Training Shallow and Thin Networks for Acceleration
    via Knowledge Distillation with Conditional Adversarial Networks
    <https://arxiv.org/abs/1709.00513>`_, 2018.

  .. seealso:: :func:`discriminator_loss`.

  .. versionadded:: 0.1.0
  """
  fake_logits, where = _prepare_logits("fake_logits", fake_logits, where)
  return v.apply_where(jax.nn.softplus(-fake_logits), where)
