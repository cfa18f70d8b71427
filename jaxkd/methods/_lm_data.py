r"""Data for language-model distillation: sequence-level and on-policy.

:func:`teacher_generations` (sequence-level KD: the teacher's continuations
of the prompts) and :func:`on_policy_mix` (GKD's :math:`\lambda` mixing of
the student's own samples into the batch), re-exported by
:mod:`jaxkd.methods.lm`.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jaxkd import lm
from jaxkd import models

PyTree = Any
Batch = Mapping[str, jax.Array]


def teacher_generations(
    teacher: models.Model,
    params: PyTree,
    state: PyTree,
    prompts: jax.Array,
    *,
    key: jax.Array,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> dict[str, jax.Array]:
  """Sequence-level KD data (Kim and Rush, 2016): the teacher's continuations.

  Every prompt ``[B, P]`` (all of length ``P``) is extended by
  ``max_new_tokens`` tokens sampled from the teacher (``temperature=0``:
  greedy, the paper's beam-search stand-in); the student is then trained on
  the result with :class:`NextTokenTerm`.

  Returns:
    ``{"tokens": [B, P + max_new_tokens], "mask": ..., "prompt_mask": ...}``
    (``prompt_mask`` ``True`` on the prompt, which is not scored).
  """
  prompts = jnp.asarray(prompts, jnp.int32)
  lengths = jnp.full((prompts.shape[0],), prompts.shape[1], jnp.int32)
  tokens, mask = lm.sample(
      teacher, params, state, prompts, lengths, key=key,
      max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
  )
  prompt_mask = jnp.arange(tokens.shape[1])[None, :] < prompts.shape[1]
  return {"tokens": tokens, "mask": mask,
          "prompt_mask": jnp.broadcast_to(prompt_mask, tokens.shape)}


def on_policy_mix(
    student: models.Model,
    params: PyTree,
    state: PyTree,
    batch: Batch,
    *,
    key: jax.Array,
    lam: float | jax.Array,
    prompt_length: int,
    temperature: float = 1.0,
) -> tuple[dict[str, jax.Array], jax.Array]:
  r"""GKD's data mixing: with probability ``lam``, student continuations.

  One Bernoulli(:math:`\lambda`) draw per batch (Agarwal et al., 2024,
  Algorithm 1): on success the tokens after the first ``prompt_length``
  positions are replaced by a sample of the *current* student
  (:func:`jaxkd.lm.sample`, continuing each row's prompt to the batch's
  length); otherwise the batch's own continuations are kept. Either way the
  prompt is marked in ``"prompt_mask"`` so the token terms score the
  continuation only; the teachers then score the same tokens inside the
  train step. Jittable (close over ``student`` and ``prompt_length``);
  ``jax.lax.cond`` runs the sampler only when it is drawn.

  Args:
    student: The student model.
    params, state: The student's current parameters and state.
    batch: ``{"tokens": [B, L], "mask": [B, L]}`` (mask optional).
    key: PRNG key of the draw and the sampling.
    lam: The student-data fraction :math:`\lambda \in [0, 1]`.
    prompt_length: Positions kept as the prompt, ``1 <= P < L``.
    temperature: The student's sampling temperature.

  Returns:
    ``(batch, on_policy)``: the batch with ``"tokens"``, ``"mask"`` and
    ``"prompt_mask"`` replaced, and a float32 scalar, 1 when the student's
    samples were used.
  """
  tokens = jnp.asarray(batch["tokens"]).astype(jnp.int32)
  batch_size, length = tokens.shape
  if not 1 <= prompt_length < length:
    raise ValueError(
        f"`prompt_length` must lie in [1, {length - 1}] for sequences of"
        f" length {length}, got {prompt_length}."
    )
  mask = jnp.asarray(batch.get("mask", jnp.ones_like(tokens, jnp.bool_)))
  mask = mask.astype(jnp.bool_)
  draw_key, sample_key = jax.random.split(key)
  use_student = jax.random.uniform(draw_key) < jnp.asarray(lam, jnp.float32)

  def sampled(_):
    out, out_mask = lm.sample(
        student, params, state, tokens[:, :prompt_length],
        jnp.full((batch_size,), prompt_length, jnp.int32), key=sample_key,
        max_new_tokens=length - prompt_length, temperature=temperature,
    )
    return out, out_mask

  new_tokens, new_mask = jax.lax.cond(
      use_student, sampled, lambda _: (tokens, mask), None)
  prompt_mask = jnp.broadcast_to(
      jnp.arange(length)[None, :] < prompt_length, tokens.shape)
  new_batch = {**batch, "tokens": new_tokens, "mask": new_mask,
               "prompt_mask": prompt_mask}
  return new_batch, use_student.astype(jnp.float32)
