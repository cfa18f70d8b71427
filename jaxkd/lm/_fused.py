r"""The fused, vocabulary-tiled output-layer distillation loss.

A language model's logits are ``hidden @ head``: ``[N, H] @ [H, V]``. With
``N = 8192`` tokens and a vocabulary of ``V = 128k`` one float32 logit array
is 4 GiB, and a distillation loss needs the student's, the teacher's, their
log-softmaxes and the gradient. :func:`fused_distillation_loss` never builds
any ``[N, V]`` array: it loops over chunks of tokens and, inside, over tiles
of the vocabulary, so its working memory is a few ``[token_chunk,
vocab_chunk]`` and ``[H, vocab_chunk]`` tiles whatever ``V`` (plus, in the
backward pass, the hidden states' gradient accumulating in float32,
``[N, H]``, unless ``hidden_grad="recompute"``).

The chunked forward computation is in :mod:`jaxkd.lm._fused_kernel`, the
custom backward pass in :mod:`jaxkd.lm._fused_vjp`.
"""

from __future__ import annotations

from typing import Any, Hashable

import jax
import jax.numpy as jnp
from jax import lax

from jaxkd.lm import _fused_kernel
from jaxkd.lm import _fused_vjp
from jaxkd.lm import _tokens
from jaxkd.losses import validation as v

Array = jax.Array
ArrayLike = Any

__all__ = ["DIVERGENCES", "HIDDEN_GRADS", "fused_distillation_loss"]

DIVERGENCES = (
    "forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd",
)
TEACHER_REDUCTIONS = ("mixture", "mean")
REDUCTIONS = ("mean", "sum_and_count", "none")
HIDDEN_GRADS = _fused_vjp.HIDDEN_GRADS


def _check_heads(student_hidden, student_head, teacher_hidden, teacher_head):
  """Shapes -> (leading shape, K); raises naming the argument at fault."""
  for name, x in (
      ("student_hidden", student_hidden), ("student_head", student_head),
      ("teacher_hidden", teacher_hidden), ("teacher_head", teacher_head),
  ):
    v.check_floating(name, x)
  v.check_min_rank("student_hidden", student_hidden, 1)
  v.check_rank("student_head", student_head, 2)
  v.check_rank("teacher_head", teacher_head, (2, 3))
  lead, width = student_hidden.shape[:-1], student_hidden.shape[-1]
  if student_head.shape[0] != width:
    raise ValueError(
        f"`student_head` of shape {tuple(student_head.shape)} must be"
        f" [H, V] with H = {width}, the last axis of `student_hidden` (shape"
        f" {tuple(student_hidden.shape)})."
    )
  stacked = teacher_head.ndim == 3
  k = teacher_head.shape[0] if stacked else 1
  expected_lead = ((k,) if stacked else ()) + tuple(lead)
  if tuple(teacher_hidden.shape[:-1]) != expected_lead:
    what = "[K, ..., H_T] with K = teacher_head.shape[0]" if stacked else (
        "[..., H_T]"
    )
    raise ValueError(
        f"`teacher_hidden` of shape {tuple(teacher_hidden.shape)} must be"
        f" {what} and leading shape {tuple(lead)} of `student_hidden`;"
        f" expected leading shape {expected_lead}."
    )
  if teacher_head.shape[-2] != teacher_hidden.shape[-1]:
    raise ValueError(
        f"`teacher_head` of shape {tuple(teacher_head.shape)} must be"
        f" {'[K, H_T, V]' if stacked else '[H_T, V]'} with H_T ="
        f" {teacher_hidden.shape[-1]}, the last axis of `teacher_hidden`."
    )
  if teacher_head.shape[-1] != student_head.shape[-1]:
    raise ValueError(
        "`student_head` and `teacher_head` must have the same vocabulary"
        f" size V (last axis), got {student_head.shape[-1]} and"
        f" {teacher_head.shape[-1]}."
    )
  return tuple(lead), k


def _varies_over(x: Array, axis_name: Hashable) -> bool | None:
  """Whether ``x`` varies over a ``shard_map`` axis (``None``: unknown)."""
  aval = jax.typeof(x)
  axis_type = getattr(aval, "manual_axis_type", None)
  varying = getattr(axis_type, "varying", getattr(aval, "vma", None))
  return None if varying is None else axis_name in varying


def _check_vocab_axis(axis_name, arrays) -> None:
  """Heads must vary over ``axis_name`` and hidden states must not."""
  for name, x in arrays.items():
    varies = _varies_over(x, axis_name)
    if varies is None:
      continue
    is_head = name.endswith("head")
    if is_head and not varies:
      raise ValueError(
          f"`vocab_axis_name`={axis_name!r}, but `{name}` does not vary over"
          " that axis: call the loss inside `jax.shard_map` (with its default"
          f" check_vma=True) with the heads' vocabulary axis split over"
          f" {axis_name!r}."
      )
    if not is_head and varies:
      raise ValueError(
          f"`{name}` varies over the vocabulary axis {axis_name!r}: the"
          " hidden states must be replicated over it (`P()` or another axis"
          " in its `in_specs`)."
      )


def _params(dtype, k, *, temperature, logit_scale, soft_cap, beta, alpha,
            teacher_weights) -> _fused_kernel.Params:
  """Hyper-parameters as arrays; traced bad values become ``nan``."""
  def scalar(x):
    return jnp.asarray(x).astype(dtype)

  temperature, logit_scale = scalar(temperature), scalar(logit_scale)
  factor = v.nan_unless(
      (temperature > 0) & (logit_scale > 0), logit_scale / temperature
  )
  cap = scalar(1.0 if soft_cap is None else soft_cap)
  cap = v.nan_unless(cap > 0, cap)
  beta, alpha = scalar(beta), scalar(alpha)
  beta = v.nan_unless((beta >= 0) & (beta <= 1), beta)
  alpha = v.nan_unless((alpha >= 0) & (alpha <= 1), alpha)
  if teacher_weights is None:
    weights = jnp.full((k,), 1.0 / k, dtype)
  else:
    weights = jnp.asarray(teacher_weights).astype(dtype)
    weights = v.nan_unless(jnp.all(weights >= 0), weights)
    weights = weights / jnp.sum(weights)
  return _fused_kernel.Params(factor, cap, beta, alpha, weights, jnp.log(weights))


def fused_distillation_loss(
    student_hidden: ArrayLike,
    student_head: ArrayLike,
    teacher_hidden: ArrayLike,
    teacher_head: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    divergence: str = "forward_kl",
    temperature: ArrayLike = 1.0,
    beta: ArrayLike = 0.5,
    alpha: ArrayLike = 0.1,
    teacher_weights: ArrayLike | None = None,
    teacher_reduction: str = "mixture",
    token_chunk: int = 512,
    vocab_chunk: int = 512,
    hidden_grad: str = "accumulate",
    logit_scale: ArrayLike = 1.0,
    soft_cap: ArrayLike | None = None,
    reduction: str = "mean",
    vocab_axis_name: Hashable | None = None,
) -> Array | tuple[Array, Array]:
  r"""A divergence between two language models' outputs, never forming logits.

  The student's logits are ``student_hidden @ student_head`` and the
  teacher's ``teacher_hidden @ teacher_head``; this function computes

  .. math::
    \mathcal{L} = \frac{\sum_i m_i\, D\big(p^T_i, p^S_i\big)}
    {\max(1, \sum_i m_i)}, \qquad
    p_i = \mathrm{softmax}(s_i), \quad
    s_i = \frac{\lambda}{T}\, c \tanh\!\Big(\frac{h_i W}{c}\Big)

  (without the :math:`c \tanh(\cdot / c)` when ``soft_cap`` is ``None``;
  :math:`\lambda` is ``logit_scale``) in chunks of ``token_chunk`` tokens
  and tiles of ``vocab_chunk`` vocabulary entries, so no ``[N, V]`` array
  exists in the forward or the backward pass (see the module docstring for
  the two passes and the exact tile-by-tile log-sum-exp). The divergence
  :math:`D`, with :math:`p^T` the teacher and :math:`p^S` the student:

  * ``"forward_kl"``: :math:`\mathrm{KL}(p^T \| p^S)`;
  * ``"reverse_kl"``: :math:`\mathrm{KL}(p^S \| p^T)`;
  * ``"jsd"``: :math:`\beta\,\mathrm{KL}(p^T \| m) + (1 - \beta)\,
    \mathrm{KL}(p^S \| m)`, :math:`m = \beta p^T + (1 - \beta) p^S`
    (GKD's generalised JSD, as :func:`jaxkd.losses.jensen_shannon_divergence`);
  * ``"skew_kl"``: :math:`\mathrm{KL}(p^T \| \alpha p^T + (1 - \alpha) p^S)`;
  * ``"skew_reverse_kl"``:
    :math:`\mathrm{KL}(p^S \| \alpha p^S + (1 - \alpha) p^T)`;
  * ``"tvd"``: :math:`\frac12 \sum_v |p^T_v - p^S_v|`; not smooth, its
    gradient uses the derivative ``jnp.abs`` defines at 0 (a subgradient).

  No :math:`T^2` factor is applied (multiply by ``temperature**2`` for the
  Hinton KD loss).

  **Gradients.** The function has a custom VJP: it returns the gradients
  with respect to ``student_hidden`` and ``student_head`` (recomputing the
  logits tile by tile), and zero for ``teacher_hidden``, ``teacher_head``
  and the hyper-parameters, as if the teacher went through
  ``jax.lax.stop_gradient`` (a frozen teacher; for mutual learning, where
  the teacher also learns, call it twice with the roles swapped). Forward-
  mode differentiation (``jax.jvp``) is not supported.

  **Precision.** Computation is in float32 (float64 when an input is
  float64); 16-bit hidden states and heads are multiplied with float32
  accumulation (``preferred_element_type``). In the backward pass the
  logits' gradient is rounded to the 16-bit dtype of the operand it is
  multiplied with (as autodiff of a 16-bit matmul does), again with float32
  accumulation; both gradients are summed in float32 and rounded to their
  input's dtype once, at the end.

  **Several teachers.** With ``teacher_head`` of shape ``[K, H_T, V]`` and
  ``teacher_hidden`` of shape ``[K, ..., H_T]``, the weights :math:`w_k`
  (``teacher_weights``, normalised to sum to 1; uniform by default) combine
  the teachers either into one target,
  ``teacher_reduction="mixture"``: :math:`D(\sum_k w_k p^{T_k}, p^S)`, or
  into a weighted mean of divergences, ``"mean"``:
  :math:`\sum_k w_k D(p^{T_k}, p^S)`.

  **Vocabulary-sharded heads.** Called inside ``jax.shard_map`` with the
  heads' vocabulary axis split over the mesh axis ``vocab_axis_name`` (and
  the hidden states replicated over it), each device loops over its own
  shard; the log-sum-exps are combined across devices with ``pmax`` and
  ``psum`` exactly as across tiles, the vocabulary sums with ``psum``, and
  the hidden states' gradient is summed over the axis. Each device gets the
  gradient of its own head shard. This relies on ``shard_map``'s
  replication typing (``check_vma=True``, the default): the loss raises if
  the heads do not vary over the axis or the hidden states do.

  Args:
    student_hidden: The student's final hidden states, floating, shape
      ``[..., H_S]`` (leading axes are flattened into ``N`` tokens).
    student_head: The student's output projection, shape ``[H_S, V]``.
    teacher_hidden: The teacher's final hidden states, shape ``[..., H_T]``
      with the student's leading shape, or ``[K, ..., H_T]`` for ``K``
      teachers.
    teacher_head: The teacher's output projection, ``[H_T, V]``, or
      ``[K, H_T, V]`` for ``K`` teachers. Same ``V`` as the student.
    mask: Optional boolean mask of the leading shape ``[...]``: ``False``
      marks tokens that do not count (padding, prompt). Masked tokens reach
      neither the value nor the gradients, whatever their hidden states hold.
    divergence: One of :data:`DIVERGENCES` (above).
    temperature: Softmax temperature :math:`T > 0` of both models.
    beta: Weight :math:`\beta \in [0, 1]` of the teacher in ``"jsd"``.
    alpha: Skew :math:`\alpha \in [0, 1]` of ``"skew_kl"`` and
      ``"skew_reverse_kl"``.
    teacher_weights: Optional non-negative weights of shape ``[K]``.
    teacher_reduction: ``"mixture"`` or ``"mean"`` (above).
    token_chunk: Tokens per chunk (>= 1; capped at ``N``).
    vocab_chunk: Vocabulary entries per tile (>= 1; capped at ``V``). The
      working memory grows with ``token_chunk * vocab_chunk`` and
      ``H * vocab_chunk``, not with ``V``. 512 (the default) keeps the
      ``[H, vocab_chunk]`` tiles small at ``H = 4096`` and, measured on
      a 2-core CPU at ``N = 1024, H = 256, V = 32768``, is as fast as 2048
      (``benchmarks/fused_loss.py``).
    hidden_grad: How the backward pass sums the hidden states' gradient
      over the vocabulary (:data:`HIDDEN_GRADS`): ``"accumulate"`` (one
      sweep over (tile, chunk) pairs, with a float32 ``[N, H]``
      accumulator) or ``"recompute"`` (a second sweep, token chunks outer,
      that recomputes the logits once more: no buffer grows with ``N``,
      about a third more matrix products for the loss's gradient). The
      gradients are the same.
    logit_scale: Factor :math:`\lambda > 0` applied after the soft cap (for
      heads whose logits are scaled, e.g. tied embeddings with
      ``1 / sqrt(H)``), to both models.
    soft_cap: Optional :math:`c > 0`: logits become
      :math:`c \tanh(z / c)` (Gemma 2's final-logit soft-capping), both
      models.
    reduction: ``"mean"`` (the token mean above, a scalar; 0 when every
      token is masked), ``"sum_and_count"`` (the scalars
      :math:`(\sum_i m_i D_i, \sum_i m_i)`, to combine over shards or
      micro-batches with :func:`jaxkd.lm.mean_from_sum_and_count`) or
      ``"none"`` (the per-token divergence, shape ``[...]``, 0 where masked).
    vocab_axis_name: Mesh axis the heads' vocabulary is sharded over, when
      called inside ``shard_map`` (above); ``None`` otherwise.

  Returns:
    A scalar for ``reduction="mean"``, ``(sum, count)`` for
    ``"sum_and_count"``, per-token divergences ``[...]`` for ``"none"``;
    float32 (float64 for float64 inputs).

  Raises:
    ValueError: If a head's width differs from its hidden states'
      (naming ``student_head`` or ``teacher_head``), the vocabulary sizes
      differ, the mask's shape is not the leading shape, a name is not one
      of the choices, a chunk size is < 1 or a concrete hyper-parameter is
      out of range.
    TypeError: If an array is not floating or the mask not boolean.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jaxkd import lm
    >>> keys = jax.random.split(jax.random.key(0), 4)
    >>> hs, ht = jax.random.normal(keys[0], (6, 8)), jax.random.normal(keys[1], (6, 16))
    >>> ws, wt = jax.random.normal(keys[2], (8, 50)), jax.random.normal(keys[3], (16, 50))
    >>> fused = lm.fused_distillation_loss(hs, ws, ht, wt, token_chunk=4, vocab_chunk=16)
    >>> unfused = jnp.mean(jnp.sum(jax.nn.softmax(ht @ wt) * (
    ...     jax.nn.log_softmax(ht @ wt) - jax.nn.log_softmax(hs @ ws)), -1))
    >>> print(bool(jnp.allclose(fused, unfused, rtol=1e-5)))
    True

  References:
    Agarwal, Vieillard, Zhou, Stanczyk, Ramos Garea, Geist and Bachem,
    `On-Policy Distillation of Language Models: Learning from Self-Generated
    Mistakes <https://arxiv.org/abs/2306.13649>`_, 2024 (generalised JSD).

    Ko, Kim, Chen and Yun, `DistiLLM: Towards Streamlined Distillation for
    Large Language Models <https://arxiv.org/abs/2402.03898>`_, 2024 (skew
    KL and skew reverse KL).

    Wijmans, Huval, Hertzberg, Koltun and Krähenbühl, `Cut Your Losses in
    Large-Vocabulary Language Models <https://arxiv.org/abs/2411.09009>`_,
    2025 (never materialising the logits).

    Milakov and Gimelshein, `Online normalizer calculation for softmax
    <https://arxiv.org/abs/1805.02867>`_, 2018 (the tile-by-tile
    normaliser).

  .. versionadded:: 0.1.0
  """
  lead, k = _check_heads(
      student_hidden, student_head, teacher_hidden, teacher_head
  )
  v.check_choice("divergence", divergence, DIVERGENCES)
  v.check_choice("teacher_reduction", teacher_reduction, TEACHER_REDUCTIONS)
  v.check_choice("reduction", reduction, REDUCTIONS)
  v.check_choice("hidden_grad", hidden_grad, HIDDEN_GRADS)
  token_chunk = v.check_int("token_chunk", token_chunk)
  vocab_chunk = v.check_int("vocab_chunk", vocab_chunk)
  v.check_positive("temperature", temperature)
  v.check_positive("logit_scale", logit_scale)
  if soft_cap is not None:
    v.check_positive("soft_cap", soft_cap)
  v.check_in_unit_interval("beta", beta)
  v.check_in_unit_interval("alpha", alpha)
  if teacher_weights is not None:
    v.check_floating("teacher_weights", teacher_weights)
    if tuple(jnp.shape(teacher_weights)) != (k,):
      raise ValueError(
          f"`teacher_weights` must have shape ({k},), one per teacher, got"
          f" {tuple(jnp.shape(teacher_weights))}."
      )
    known = v.concrete_value(teacher_weights)
    if known is not None and (known.min() < 0 or known.sum() <= 0):
      raise ValueError(
          "`teacher_weights` must be non-negative with a positive sum, got"
          f" {teacher_weights!r}."
      )
  if mask is not None:
    mask = v.check_boolean_mask("mask", mask, lead)
  if vocab_axis_name is not None:
    _check_vocab_axis(vocab_axis_name, {
        "student_hidden": student_hidden, "student_head": student_head,
        "teacher_hidden": teacher_hidden, "teacher_head": teacher_head,
    })

  dtype = v.compute_dtype(
      student_hidden, student_head, teacher_hidden, teacher_head
  )
  prm = _params(
      dtype, k, temperature=temperature, logit_scale=logit_scale,
      soft_cap=soft_cap, beta=beta, alpha=alpha,
      teacher_weights=teacher_weights,
  )
  st = _fused_kernel.Static(
      divergence, teacher_reduction, token_chunk, vocab_chunk,
      soft_cap is not None, vocab_axis_name, hidden_grad,
  )
  hs = jnp.asarray(student_hidden)
  hs = hs.reshape((-1, hs.shape[-1]))
  ht = jnp.asarray(teacher_hidden)
  ht = ht.reshape((k, -1, ht.shape[-1]))
  wt = jnp.asarray(teacher_head)
  wt = wt.reshape((k,) + wt.shape[-2:])
  ws = jnp.asarray(student_head)
  flat_mask = None if mask is None else mask.reshape(-1)
  if flat_mask is not None:
    # Masked rows become zeros, so a nan or inf they held reaches neither the
    # value nor (through the where's transpose) the gradients.
    hs = jnp.where(flat_mask[:, None], hs, jnp.zeros((), hs.dtype))
    ht = jnp.where(flat_mask[None, :, None], ht, jnp.zeros((), ht.dtype))
  ht, wt = lax.stop_gradient(ht), lax.stop_gradient(wt)

  if hs.shape[0] == 0:
    per_token = jnp.zeros((0,), dtype)
  else:
    per_token = _fused_vjp.fused(st, hs, ws, ht, wt, prm)
  if flat_mask is not None:
    per_token = jnp.where(flat_mask, per_token, jnp.zeros((), dtype))
  if reduction == "none":
    return per_token.reshape(lead)
  total, count = _tokens.token_sum_and_count(per_token, flat_mask)
  if reduction == "sum_and_count":
    return total, count
  return _tokens.mean_from_sum_and_count(total, count)
