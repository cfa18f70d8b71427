r"""Language-model distillation on the one engine: token terms and their data.

Objective terms for token batches ``{"tokens": [B, L], "mask": [B, L]}``
run by :class:`jaxkd.Distillation` with ``inputs="tokens"``. Each scores the
next-token predictions (position :math:`t` predicts token :math:`t + 1`,
:func:`jaxkd.lm.next_token_targets`) and is normalised over the valid tokens
of the whole batch,

.. math::
  \mathcal{L} = \frac{\sum_{b, t} m_{b,t}\, \ell_{b,t}}
  {\max\big(1, \sum_{b, t} m_{b,t}\big)},

not per sequence: a long sequence weighs more than a short one, and under
gradient accumulation the engine divides every micro-batch's sum by the
count of the full batch (``Term.token_count``/``Term.loss_sum``).

* :class:`NextTokenTerm`: cross-entropy with the shifted tokens;
* :class:`TokenDivergenceTerm`: a per-token divergence to the teachers
  (forward KL, reverse KL, generalised JSD, TVD), several teachers combined
  into a mixture target or a weighted mean of per-teacher divergences;
* :class:`FusedDivergenceTerm`: :func:`jaxkd.lm.fused_distillation_loss` on
  the final hidden states and output heads (every divergence of
  :data:`jaxkd.lm.DIVERGENCES`, skew KL included), never forming the logits
  in the loss; the models must expose their head (:func:`with_output_kernel`);
* :class:`SparseTeacherTerm`: forward KL to a cached top-k teacher with the
  remaining mass in one tail bucket (:func:`sparse_kl_with_tail`).

Data: :func:`teacher_generations` (sequence-level KD) and
:func:`on_policy_mix` (GKD's :math:`\lambda` mixing of student samples).

**Mixture or mean of teachers.** With teacher distributions :math:`p_k` and
weights :math:`w_k` (summing to 1), ``"mixture"`` scores
:math:`D(\bar p, q)` with :math:`\log \bar p = \operatorname{logsumexp}_k
(\log w_k + \log p_k)`, ``"mean"`` scores :math:`\sum_k w_k D(p_k, q)`. For
the forward KL the two differ by a constant of the student (the teachers'
Jensen gap :math:`H(\bar p) - \sum_k w_k H(p_k)`) and have *equal
gradients*, since :math:`\mathrm{KL}(p \| q) = -H(p) - \sum_v p_v \log q_v`
is linear in :math:`p`. For reverse KL, JSD and TVD the divergence is not
linear in the teacher and the gradients differ: reverse KL to the mixture
spreads the student over every teacher's modes, the mean of reverse KLs
pulls it towards the teachers' geometric mean
(``tests/test_lm_engine.py`` checks both claims).

References:
  Hinton, Vinyals and Dean, `Distilling the Knowledge in a Neural Network
  <https://arxiv.org/abs/1503.02531>`_, 2015.

  Kim and Rush, `Sequence-Level Knowledge Distillation
  <https://arxiv.org/abs/1606.07947>`_, 2016.

  Agarwal, Vieillard, Zhou, Stanczyk, Ramos Garea, Geist and Bachem,
  `On-Policy Distillation of Language Models: Learning from Self-Generated
  Mistakes <https://arxiv.org/abs/2306.13649>`_, 2024.

  Gu, Dong, Wei and Huang, `MiniLLM: Knowledge Distillation of Large
  Language Models <https://arxiv.org/abs/2306.08543>`_, 2024 (reverse KL).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from jaxkd import lm
from jaxkd import losses
from jaxkd import models
from jaxkd import objective
from jaxkd.methods._lm_data import on_policy_mix as on_policy_mix
from jaxkd.methods._lm_data import teacher_generations as teacher_generations

__all__ = [
    "DENSE_DIVERGENCES",
    "FusedDivergenceTerm",
    "NextTokenTerm",
    "SparseTeacherTerm",
    "TEACHER_REDUCTIONS",
    "TokenDivergenceTerm",
    "TokenTerm",
    "on_policy_mix",
    "sparse_kl_with_tail",
    "teacher_generations",
    "with_output_kernel",
]

PyTree = Any
Batch = Mapping[str, jax.Array]

DENSE_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
TEACHER_REDUCTIONS = ("mixture", "mean")
OUTPUT_KERNEL = "output_kernel"


def _check_choice(owner: str, name: str, value: Any, choices) -> None:
  if value not in choices:
    raise ValueError(
        f"`{name}` of term {owner!r} must be one of {choices}, got {value!r}."
    )


@dataclasses.dataclass(frozen=True)
class TokenTerm(objective.Term):
  """Base of the token-normalised terms: next-token targets and the count.

  Subclasses implement ``per_token(params, state, outputs, targets) ->
  (values [B, L - 1], state)``. ``tokens``, ``mask`` and ``prompt_mask``
  name the batch entries read (a missing mask means every token counts;
  ``prompt_mask`` ``True`` marks tokens that are not scored, e.g. the
  prompt of GKD's generated continuations).
  """

  weight: objective.ScheduleOrValue = 1.0
  tokens: str = "tokens"
  mask: str | None = "mask"
  prompt_mask: str | None = "prompt_mask"
  name: str = "token_term"

  def targets(self, batch: Batch) -> lm.NextTokenTargets:
    """The next-token targets and mask of ``batch``."""
    if self.tokens not in batch:
      raise ValueError(
          f"Term {self.name!r} reads the tokens from batch[{self.tokens!r}],"
          f" but the batch has {sorted(batch)}."
      )
    get = lambda key: None if key is None or key not in batch else (
        jnp.asarray(batch[key]).astype(jnp.bool_))
    return lm.next_token_targets(
        jnp.asarray(batch[self.tokens]), get(self.mask),
        prompt_mask=get(self.prompt_mask),
    )

  def token_count(self, batch):
    return jnp.sum(self.targets(batch).mask, dtype=jnp.float32)

  def per_token(self, params, state, outputs, targets):
    raise NotImplementedError

  def loss_sum(self, params, state, outputs):
    targets = self.targets(outputs.batch)
    values, state = self.per_token(params, state, outputs, targets)
    return lm.token_sum_and_count(values, targets.mask), state

  def loss(self, params, state, outputs):
    (total, count), state = self.loss_sum(params, state, outputs)
    return lm.mean_from_sum_and_count(total, count), state


@dataclasses.dataclass(frozen=True)
class NextTokenTerm(TokenTerm):
  """Next-token cross-entropy: the labels are the tokens shifted by one.

  .. math::
    \\ell_t = -\\log \\mathrm{softmax}(z_t)_{x_{t+1}}
  """

  label_smoothing: float = 0.0
  name: str = "next_token"
  needs_teacher: bool = False

  def per_token(self, params, state, outputs, targets):
    del params
    logits = lm.next_token_logits(outputs.student_logits)
    values = losses.cross_entropy(
        logits, targets.targets, label_smoothing=self.label_smoothing,
        where=targets.mask,
    )
    return values, state


def _normalised_weights(weights, k: int) -> jax.Array:
  if weights is None:
    return jnp.full((k,), 1.0 / k, jnp.float32)
  w = jnp.asarray(weights, jnp.float32)
  if w.shape != (k,):
    raise ValueError(
        f"`teacher_weights` must hold one weight per teacher ({k}), got shape"
        f" {tuple(w.shape)}."
    )
  return w / jnp.sum(w)


@dataclasses.dataclass(frozen=True)
class TokenDivergenceTerm(TokenTerm):
  """A per-token divergence between the student and the teachers.

  ``divergence`` is one of :data:`DENSE_DIVERGENCES`, computed by
  ``jaxkd.losses`` on the tempered distributions :math:`\\mathrm{softmax}
  (z / T)`: ``"forward_kl"`` :math:`\\mathrm{KL}(p^T \\| p^S)`,
  ``"reverse_kl"`` :math:`\\mathrm{KL}(p^S \\| p^T)`, ``"jsd"`` the
  generalised JSD with teacher weight ``beta``, ``"tvd"`` the total
  variation. No :math:`T^2` factor is applied. Several teachers (logits
  ``[K, B, L, V]``) are combined by ``teacher_reduction`` (``"mixture"`` or
  ``"mean"``, see the module docstring) with ``teacher_weights`` (uniform
  by default).
  """

  divergence: str = "forward_kl"
  temperature: objective.ScheduleOrValue = 1.0
  beta: float = 0.5
  teacher_reduction: str = "mixture"
  teacher_weights: Sequence[float] | None = None
  name: str = "token_kd"

  def __post_init__(self):
    super().__post_init__()
    _check_choice(self.name, "divergence", self.divergence, DENSE_DIVERGENCES)
    _check_choice(self.name, "teacher_reduction", self.teacher_reduction,
                  TEACHER_REDUCTIONS)
    if not 0.0 <= float(self.beta) <= 1.0:
      raise ValueError(
          f"`beta` of term {self.name!r} must lie in [0, 1], got {self.beta}."
      )

  def hyperparameters(self):
    return {
        **super().hyperparameters(),
        "temperature": (self.temperature, "temperature"),
    }

  def _divergence(self, student, teacher, temperature):
    if self.divergence == "forward_kl":
      return losses.kl_divergence(student, teacher, temperature=temperature)
    if self.divergence == "reverse_kl":
      return losses.reverse_kl_divergence(
          student, teacher, temperature=temperature)
    if self.divergence == "jsd":
      return losses.jensen_shannon_divergence(
          student, teacher, beta=self.beta, temperature=temperature)
    return losses.total_variation_distance(
        student, teacher, temperature=temperature)

  def per_token(self, params, state, outputs, targets):
    del params
    if outputs.teacher_logits is None:
      raise ValueError(f"Term {self.name!r} needs teacher logits.")
    temperature = outputs.resolve(self.temperature)
    student = lm.next_token_logits(outputs.student_logits).astype(
        jnp.float32)
    teachers = jax.lax.stop_gradient(
        outputs.teacher_logits[..., :-1, :].astype(jnp.float32))
    weights = _normalised_weights(self.teacher_weights, teachers.shape[0])
    if self.teacher_reduction == "mean" or teachers.shape[0] == 1:
      per_teacher = jax.vmap(
          lambda t: self._divergence(student, t, temperature))(teachers)
      values = jnp.tensordot(weights, per_teacher, axes=1)
    else:
      # softmax(T log p / T) = p: the mixture enters as logits T log p.
      log_mixture = losses.ensemble_log_soft_targets(
          teachers, temperature=temperature, weights=weights)
      values = self._divergence(
          student, temperature * log_mixture, temperature)
    return values, state


def with_output_kernel(model: models.Model) -> models.Model:
  """``model`` with its ``[D, V]`` output kernel as the feature
  ``"output_kernel"`` (:func:`jaxkd.models.lm_output_kernel`), for
  :class:`FusedDivergenceTerm`; stacked teachers give ``[K, D, V]``.
  """

  def apply(params, state, x, *, train, rng):
    logits, features, new_state = model.apply(
        params, state, x, train=train, rng=rng)
    features = {**features, OUTPUT_KERNEL: models.lm_output_kernel(params)}
    return logits, features, new_state

  return models.Model(init=model.init, apply=apply, name=model.name)


@dataclasses.dataclass(frozen=True)
class FusedDivergenceTerm(TokenTerm):
  """:func:`jaxkd.lm.fused_distillation_loss` as a token term.

  Reads ``"final_hidden"`` and ``"output_kernel"`` from the student's and the
  teachers' features (wrap both models with :func:`with_output_kernel`) and
  scores ``divergence`` (any of :data:`jaxkd.lm.DIVERGENCES`: ``"skew_kl"``
  with skew ``alpha``, ``"jsd"`` with ``beta``, ...) in token chunks and
  vocabulary tiles. Several teachers: ``teacher_reduction`` ``"mixture"``
  or ``"mean"``. ``hidden_grad="recompute"`` trades a third more matrix
  products of the loss's gradient for no ``[N, H]`` float32 buffer.
  """

  divergence: str = "forward_kl"
  temperature: float = 1.0
  alpha: float = 0.1
  beta: float = 0.5
  teacher_reduction: str = "mixture"
  token_chunk: int = 512
  vocab_chunk: int = 512
  hidden_grad: str = "accumulate"
  hidden: str = "final_hidden"
  name: str = "fused_kd"

  def __post_init__(self):
    super().__post_init__()
    _check_choice(self.name, "divergence", self.divergence, lm.DIVERGENCES)
    _check_choice(self.name, "teacher_reduction", self.teacher_reduction,
                  TEACHER_REDUCTIONS)
    _check_choice(self.name, "hidden_grad", self.hidden_grad, lm.HIDDEN_GRADS)

  def hyperparameters(self):
    return {
        **super().hyperparameters(),
        "temperature": (self.temperature, "temperature"),
    }

  def per_token(self, params, state, outputs, targets):
    del params
    for who, features in (("student", outputs.student_features),
                          ("teacher", outputs.teacher_features)):
      for key in (self.hidden, OUTPUT_KERNEL):
        if key not in features:
          raise ValueError(
              f"Term {self.name!r} needs the {who} feature {key!r} (wrap the"
              " model with jaxkd.methods.lm.with_output_kernel), got"
              f" {sorted(features)}."
          )
    student_hidden = lm.next_token_logits(
        outputs.student_features[self.hidden])
    teacher_hidden = outputs.teacher_features[self.hidden][..., :-1, :]
    values = lm.fused_distillation_loss(
        student_hidden, outputs.student_features[OUTPUT_KERNEL],
        teacher_hidden, outputs.teacher_features[OUTPUT_KERNEL],
        mask=targets.mask, divergence=self.divergence,
        temperature=self.temperature, alpha=self.alpha, beta=self.beta,
        teacher_reduction=self.teacher_reduction,
        token_chunk=self.token_chunk, vocab_chunk=self.vocab_chunk,
        hidden_grad=self.hidden_grad, reduction="none",
    )
    return values, state


def sparse_kl_with_tail(
    student_logits: jax.Array,
    teacher_log_probs: jax.Array,
    teacher_indices: jax.Array,
    *,
    temperature: float = 1.0,
    where: jax.Array | None = None,
) -> jax.Array:
  r"""Forward KL to a top-k teacher whose remaining mass is one bucket.

  The engine's name for :func:`jaxkd.losses.sparse_kl_divergence` with
  ``tail="bucket"`` on the last axis. With the teacher's cached
  log-probabilities :math:`\log p_i` on its top :math:`k` tokens :math:`S`,
  its tail mass :math:`r = 1 - \sum_{i \in S} p_i`, the student's
  :math:`q = \mathrm{softmax}(z)` and its tail :math:`q_\bot = \sum_{v
  \notin S} q_v`, at :math:`T = 1`:

  .. math::
    \mathrm{KL} = \sum_{i \in S} p_i (\log p_i - \log q_i)
      + r\,(\log r - \log q_\bot)

  the exact KL between the two distributions coarsened to :math:`S` plus one
  bucket; with :math:`k = V` it is the full forward KL. ``temperature``
  tempers both sides, the cached teacher (and its bucket) as well as the
  student, as :class:`TokenDivergenceTerm` does, so with :math:`k = V` the
  two terms agree at every temperature.

  Args:
    student_logits: ``[..., V]`` floating logits.
    teacher_log_probs: ``[..., k]`` log-probabilities normalised over the
      whole vocabulary at temperature 1 (:func:`jaxkd.lm.top_k_log_probs`).
    teacher_indices: ``[..., k]`` integer token ids, distinct per row.
    temperature: The softmax temperature of both sides.
    where: Optional boolean token mask ``[...]``: masked tokens give 0 and
      no gradient, whatever their cache entries hold.

  Returns:
    ``[...]`` per-token divergences, float32 (float64 stays float64).
  """
  return losses.sparse_kl_divergence(
      student_logits, teacher_log_probs, teacher_indices,
      temperature=temperature, tail="bucket", where=where,
  )


@dataclasses.dataclass(frozen=True)
class SparseTeacherTerm(TokenTerm):
  """Forward KL to cached top-k teacher entries with a tail bucket.

  Reads ``batch["teacher_topk_log_probs"]`` and
  ``batch["teacher_topk_indices"]`` ``[B, L, k]`` (position ``t``: the
  teacher's distribution of token ``t + 1``, as
  :class:`jaxkd.lm.TeacherCacheWriter` stores it) and scores
  :func:`sparse_kl_with_tail`. No teacher runs.
  """

  temperature: float = 1.0
  log_probs: str = "teacher_topk_log_probs"
  indices: str = "teacher_topk_indices"
  name: str = "sparse_kd"
  needs_teacher: bool = False

  def hyperparameters(self):
    return {
        **super().hyperparameters(),
        "temperature": (self.temperature, "temperature"),
    }

  def per_token(self, params, state, outputs, targets):
    del params
    for key in (self.log_probs, self.indices):
      if key not in outputs.batch:
        raise ValueError(
            f"Term {self.name!r} reads batch[{key!r}], but the batch has"
            f" {sorted(outputs.batch)}."
        )
    values = sparse_kl_with_tail(
        lm.next_token_logits(outputs.student_logits),
        jax.lax.stop_gradient(outputs.batch[self.log_probs][:, :-1]),
        outputs.batch[self.indices][:, :-1],
        temperature=self.temperature, where=targets.mask,
    )
    return values, state
