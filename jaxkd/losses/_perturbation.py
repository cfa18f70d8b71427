"""Distillation under random perturbations of the teacher.

:func:`perturbed_kd_loss` perturbs the teacher's logits with seeded noise and
averages the Hinton loss over several draws, in the spirit of the "noisy
teacher" of Sau and Balasubramanian (2016). :func:`perturb_inputs` is its
companion for the train step: it perturbs the teacher's inputs before the
teacher's forward pass. Both are pure functions of their ``key``: the same key
gives the same result.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.losses import _soft_target
from jaxkd.losses import validation as v

Array = jax.Array
ArrayLike = Any

_NOISE_KINDS = ("gaussian", "uniform")


def _check_key(key: Any) -> Array:
  """Checks a PRNG key: a typed scalar key or a raw ``uint32`` key."""
  dtype = getattr(key, "dtype", None)
  if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
    if key.shape != ():
      raise ValueError(
          "`key` must be a single PRNG key (shape ()), got a key array of"
          f" shape {tuple(key.shape)}; vmap over keys instead."
      )
    return key
  if dtype is not None and dtype == jnp.uint32 and np.ndim(key) == 1:
    return jnp.asarray(key)
  raise TypeError(
      "`key` must be a PRNG key from `jax.random.key(seed)` (or a raw uint32"
      f" key from `jax.random.PRNGKey(seed)`), got {v.describe(key)}."
  )


def _perturb_logits(
    logits: Array, key: Array, noise: str, noise_scale: Array
) -> Array:
  """One draw of the documented teacher-logit noise; class axis last."""
  finite = jnp.isfinite(logits)
  if noise == "gaussian":
    # The noise is relative to the spread of each teacher row, so one
    # noise_scale suits teachers of any logit scale. The scale is a constant
    # of the draw (stop_gradient; std's gradient is nan for a constant row).
    spread = jax.lax.stop_gradient(
        jnp.std(logits, axis=-1, keepdims=True, where=finite)
    )
    sigma = noise_scale * spread
    perturbed = logits + sigma * jax.random.normal(
        key, logits.shape, logits.dtype
    )
  else:
    u = jax.random.uniform(
        key, logits.shape, logits.dtype, minval=-noise_scale,
        maxval=noise_scale,
    )
    perturbed = logits * (1 + u)
  # -inf logits (impossible classes) stay exactly as they are.
  return jnp.where(finite, perturbed, logits)


def perturbed_kd_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    key: ArrayLike,
    *,
    temperature: ArrayLike = 1.0,
    noise_scale: ArrayLike = 0.1,
    num_samples: int = 1,
    noise: str = "gaussian",
    axis: int = -1,
    where: ArrayLike | None = None,
) -> Array:
  r"""Hinton KD towards randomly perturbed teacher logits, averaged over draws.

  .. math::
    \mathcal{L} = \frac{1}{S} \sum_{s=1}^{S} T^2 \,
    \mathrm{KL}\big(\mathrm{softmax}((z^T + \epsilon_s) / T) \,\|\,
    \mathrm{softmax}(z^S / T)\big)

  (for ``"uniform"`` noise the perturbed teacher logits are
  :math:`z^T \odot (1 + u_s)` instead of :math:`z^T + \epsilon_s`).

  The noise is drawn exactly as follows, so that the same ``key`` always gives
  the same loss and a test can redraw it. Let ``z`` be the teacher logits in
  the compute dtype (float32 for 16-bit inputs, else the input dtype) with the
  class axis moved last, shape ``[..., C]``, and
  ``keys = jax.random.split(key, num_samples)``. Draw ``s`` is:

  - ``"gaussian"``: ``z + sigma * jax.random.normal(keys[s], z.shape,
    z.dtype)`` with ``sigma = noise_scale * jnp.std(z, axis=-1,
    keepdims=True)`` (population standard deviation over the finite classes
    of each example, ``ddof=0``, treated as a constant: no gradient flows
    through it). That is :math:`\epsilon \sim \mathcal N(0, (\lambda
    \operatorname{std}_c z^T)^2)`, i.i.d. over classes: the noise is relative
    to the spread of each teacher row, and a row of equal logits gets none.
  - ``"uniform"``: multiplicative noise ``z * (1 + u)`` with
    ``u = jax.random.uniform(keys[s], z.shape, z.dtype, minval=-noise_scale,
    maxval=noise_scale)``.

  Non-finite teacher logits (``-inf``: impossible classes) are left as they
  are. The draws run in one ``jax.vmap`` over ``keys``; the student's
  log-probabilities are computed once. With ``noise_scale=0`` the loss is
  exactly :func:`kd_loss`. The gradient flows to both logit arrays (the noise
  is a constant of the draw), so the loss also serves online distillation.

  Args:
    student_logits: Floating logits of shape ``[..., num_classes]``.
    teacher_logits: Floating logits of the same shape.
    key: A PRNG key, ``jax.random.key(seed)`` or a raw ``uint32[2]`` key;
      use a fresh one per step (e.g. ``jax.random.fold_in(key, step)``).
    temperature: Softmax temperature :math:`T > 0`.
    noise_scale: Noise level :math:`\lambda \ge 0`: relative to each row's
      standard deviation for ``"gaussian"``, the half-width of ``u`` for
      ``"uniform"`` (values above 1 can flip the sign of a logit).
    num_samples: Number :math:`S \ge 1` of noise draws averaged (a Python
      int; memory grows linearly with it).
    noise: ``"gaussian"`` (additive) or ``"uniform"`` (multiplicative).
    axis: The class axis.
    where: Optional boolean mask broadcastable to the per-example shape;
      masked-out examples give 0 and no gradient. The noise is drawn for the
      full array, so masking does not change the other examples' draws.

  Returns:
    The per-example loss, shape ``[...]``; float32 for 16-bit inputs.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses
    >>> student = jnp.array([[1.0, 2.0, 3.0]])
    >>> teacher = jnp.array([[1.0, 2.0, 4.0]])
    >>> key = jax.random.key(0)
    >>> loss = losses.perturbed_kd_loss(
    ...     student, teacher, key, temperature=4.0, num_samples=8)
    >>> print(loss.shape)
    (1,)
    >>> exact = losses.perturbed_kd_loss(
    ...     student, teacher, key, temperature=4.0, noise_scale=0.0)
    >>> print(exact.round(4))  # kd_loss
    [0.1241]

  References:
    Sau and Balasubramanian, `Deep Model Compression: Distilling Knowledge
    from Noisy Teachers <https://arxiv.org/abs/1610.09650>`_, 2016.

  .. seealso:: :func:`kd_loss`, :func:`perturb_inputs`.

  .. versionadded:: 0.1.0
  """
  v.check_choice("noise", noise, _NOISE_KINDS)
  num_samples = v.check_int("num_samples", num_samples)
  scale_valid = v.check_non_negative("noise_scale", noise_scale)
  key = _check_key(key)

  def core(student, teacher, axis, _):
    # The class axis goes last so that the draws do not depend on `axis`.
    student = jnp.moveaxis(student, axis, -1)
    teacher = jnp.moveaxis(teacher, axis, -1)
    dtype = student.dtype
    scale = jnp.asarray(noise_scale).astype(dtype)

    def one_draw(draw_key: Array) -> Array:
      perturbed = _perturb_logits(teacher, draw_key, noise, scale)
      # The accurate KL of the logit pair (any temperature, see kd_loss).
      return _soft_target.kl_from_logits(perturbed, student, temperature, -1)

    kl = jax.vmap(one_draw)(jax.random.split(key, num_samples))
    return jnp.asarray(temperature).astype(dtype)**2 * jnp.mean(kl, axis=0)

  return _soft_target.logit_pair_loss(
      core, student_logits, teacher_logits, temperature=temperature,
      axis=axis, where=where, checks=(scale_valid,),
  )


def perturb_inputs(
    inputs: ArrayLike,
    key: ArrayLike,
    *,
    noise_scale: ArrayLike,
    kind: str = "gaussian",
) -> Array:
  r"""Adds seeded noise to the teacher's inputs (e.g. images).

  .. math::
    \tilde x = x + \epsilon, \qquad
    \epsilon \sim \mathcal N(0, \sigma^2) \text{ (gaussian)} \quad\text{or}
    \quad \epsilon \sim \mathcal U(-\sigma, \sigma) \text{ (uniform)},

  i.i.d. per entry, with :math:`\sigma` = ``noise_scale`` in the units of the
  inputs. The noise is ``noise_scale * jax.random.normal(key, x.shape,
  dtype)`` or ``jax.random.uniform(key, x.shape, dtype, -noise_scale,
  noise_scale)``, drawn and added in float32 for 16-bit inputs (else in the
  input dtype) and cast back. A train step calls it on the batch the teacher
  sees (the student keeps the clean batch), with a key split off the step's
  key so it is independent of dropout.

  Args:
    inputs: Floating inputs of any shape, e.g. normalised images
      ``[batch, height, width, channels]``.
    key: A PRNG key, ``jax.random.key(seed)`` or a raw ``uint32[2]`` key.
    noise_scale: Standard deviation (``"gaussian"``) or half-width
      (``"uniform"``) of the noise, ``>= 0``; 0 returns ``inputs`` unchanged.
    kind: ``"gaussian"`` or ``"uniform"``.

  Returns:
    The perturbed inputs, with the shape and dtype of ``inputs``.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from jaxkd import losses
    >>> images = jnp.zeros((2, 4, 4, 3), jnp.bfloat16)
    >>> noisy = losses.perturb_inputs(
    ...     images, jax.random.key(0), noise_scale=0.1)
    >>> print(noisy.shape, noisy.dtype)
    (2, 4, 4, 3) bfloat16

  References:
    Sau and Balasubramanian, `Deep Model Compression: Distilling Knowledge
    from Noisy Teachers <https://arxiv.org/abs/1610.09650>`_, 2016 (noise on
    the teacher's logits; see :func:`perturbed_kd_loss`).

  .. seealso:: :func:`perturbed_kd_loss`.

  .. versionadded:: 0.1.0
  """
  v.check_choice("kind", kind, _NOISE_KINDS)
  dtype = getattr(inputs, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        "`inputs` must be a floating-point array, got"
        f" {v.describe(inputs)}. Normalise integer images first, e.g."
        " `images.astype(jnp.float32) / 255`."
    )
  valid = v.check_non_negative("noise_scale", noise_scale)
  key = _check_key(key)
  (x,) = v.as_compute_dtype(inputs)
  scale = jnp.asarray(noise_scale).astype(x.dtype)
  if kind == "gaussian":
    noise = scale * jax.random.normal(key, x.shape, x.dtype)
  else:
    noise = jax.random.uniform(
        key, x.shape, x.dtype, minval=-scale, maxval=scale
    )
  return v.nan_unless(valid, x + noise).astype(dtype)
