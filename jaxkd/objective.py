"""A declarative description of a distillation objective.

An objective is a sequence of terms; the train step minimises

.. math::
  \\mathcal{L}(s) = \\sum_i w_i(s)\\, \\mathrm{mean}_b\\, \\ell_i

where :math:`w_i(s)` is a constant or a ``jaxkd.schedules`` schedule of the
step :math:`s`. Each term says which outputs it compares:

* :class:`LabelTerm`: cross-entropy of the student with the labels;
* :class:`LogitTerm`: any logit loss of ``jaxkd.losses`` between student and
  teacher logits (``kd_loss``, ``dkd_loss``, ``jensen_shannon_divergence``,
  ...), with the teachers combined as an ensemble target or as the mean of
  per-teacher losses;
* :class:`FeatureTerm`: any feature or relational loss between a named
  student feature and a named teacher feature, through an adaptor trained
  jointly with the student;
* :class:`CRDTerm`: contrastive representation distillation with its queue of
  negatives kept in the train state;
* :class:`TeacherFreeTerm`: a loss of the student's logits and the labels
  alone (teacher-free distillation by default).

Extension point. A method plugs into the engine by subclassing :class:`Term`:
``init`` builds its trainable parameters and state, ``loss`` its scalar,
``update`` trains parts of its own after the student's update (the
adversarial discriminator of ``jaxkd.methods.adversarial``), and
``evaluation_sums`` adds per-batch sums to the evaluation (the peers'
accuracies of ``jaxkd.methods.mutual``). ``hyperparameters`` names the
weights and temperatures the engine validates: constants and schedules when
the term is built, traced values at every step (an invalid one makes the loss
NaN and sets ``metrics["invalid/{term}.{name}"]``).

Token-normalised terms (language models, ``jaxkd.methods.lm``) average over
the valid tokens of the whole batch rather than over examples: such a term
returns a count from ``token_count(batch)`` and its ``(sum, count)`` from
``loss_sum``. The engine then divides the sum by the count of the *global*
batch, so that under gradient accumulation micro-batches holding different
numbers of tokens combine exactly as one batch would
(``Distillation.accumulation_steps``).

Terms own their trainable parameters (adaptors) and state (adaptor BatchNorm
statistics, queues); the train step stores them next to the student's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from jaxkd import losses
from jaxkd._feature_terms import CRDTerm
from jaxkd._feature_terms import FeatureTerm
from jaxkd._hyper import Hyper
from jaxkd._hyper import ScheduleOrValue
from jaxkd._hyper import check_hyperparameter
from jaxkd._hyper import is_valid
from jaxkd._hyper import resolve
from jaxkd._term import StepOutputs
from jaxkd._term import Term
from jaxkd._term import mean_loss
from jaxkd._term import require_labels

PyTree = Any

TEACHER_REDUCTIONS = ("ensemble", "ensemble_logits", "mean", "confidence")

__all__ = [
    "CRDTerm",
    "FeatureTerm",
    "Hyper",
    "LabelTerm",
    "LogitTerm",
    "ScheduleOrValue",
    "StepOutputs",
    "TEACHER_REDUCTIONS",
    "TeacherFreeTerm",
    "Term",
    "check_hyperparameter",
    "check_unique_names",
    "is_valid",
    "require_labels",
    "resolve",
]


@dataclasses.dataclass(frozen=True)
class LabelTerm(Term):
  """Cross-entropy of the student's logits with the (possibly soft) labels."""

  weight: ScheduleOrValue = 1.0
  label_smoothing: float = 0.0
  name: str = "labels"
  needs_teacher: bool = False

  def loss(self, params, state, outputs):
    del params
    labels = require_labels(self.name, outputs)
    per_example = losses.cross_entropy(
        outputs.student_logits, labels, label_smoothing=self.label_smoothing
    )
    return mean_loss(per_example), state


def _combine_teachers(
    teacher_logits: jax.Array,
    reduction: str,
    temperature: jax.Array,
) -> jax.Array:
  """Turns ``[K, B, C]`` teacher logits into one ``[B, C]`` target.

  For the probability-space ensemble the returned logits are
  ``T * log p_bar``: a loss that applies ``softmax(. / T)`` to them recovers
  the ensemble ``p_bar`` exactly.
  """
  if reduction == "ensemble_logits":
    return jnp.mean(teacher_logits, axis=0)
  weights = None
  if reduction == "confidence":
    weights = losses.teacher_confidence_weights(
        teacher_logits, temperature=temperature
    )
  log_p = losses.ensemble_log_soft_targets(
      teacher_logits, temperature=temperature, weights=weights
  )
  return temperature * log_p


@dataclasses.dataclass(frozen=True)
class LogitTerm(Term):
  """A logit loss between the student and the teachers.

  ``loss_fn(student_logits, teacher_logits, [labels,] *, temperature, **kw)``
  is any logit loss of ``jaxkd.losses``; labels are passed when
  ``with_labels`` is set (``distillation_loss``, ``dkd_loss``).

  Several teachers (``teacher_logits`` of shape ``[K, B, C]``) are combined by
  ``teacher_reduction``:

  * ``"ensemble"``: one target, the probability average
    :math:`\\bar p = \\frac1K \\sum_k \\mathrm{softmax}(z_k / T)`;
  * ``"ensemble_logits"``: one target from the averaged logits;
  * ``"confidence"``: the probability average weighted per example by
    ``losses.teacher_confidence_weights``;
  * ``"mean"``: the mean over teachers of the per-teacher losses.

  For KL-based losses, ``"mean"`` and ``"ensemble"`` have the same gradient
  and differ in value by the Jensen gap (see
  ``losses.multi_teacher_kd_loss``).
  """

  loss_fn: Callable[..., jax.Array] = losses.kd_loss
  weight: ScheduleOrValue = 1.0
  temperature: ScheduleOrValue | None = 4.0
  teacher_reduction: str = "ensemble"
  with_labels: bool = False
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  name: str = "kd"

  def __post_init__(self):
    super().__post_init__()
    if self.teacher_reduction not in TEACHER_REDUCTIONS:
      raise ValueError(
          f"`teacher_reduction` of term {self.name!r} must be one of"
          f" {TEACHER_REDUCTIONS}, got {self.teacher_reduction!r}."
      )

  def hyperparameters(self):
    return {
        **super().hyperparameters(),
        "temperature": (self.temperature, "temperature"),
    }

  def _call(self, student_logits, teacher_logits, outputs, temperature):
    args = [student_logits, teacher_logits]
    if self.with_labels:
      args.append(require_labels(self.name, outputs))
    kwargs = dict(self.kwargs)
    if temperature is not None:
      kwargs["temperature"] = temperature
    return self.loss_fn(*args, **kwargs)

  def loss(self, params, state, outputs):
    del params
    if outputs.teacher_logits is None:
      raise ValueError(f"Term {self.name!r} needs teacher logits.")
    temperature = (
        None
        if self.temperature is None
        else outputs.resolve(self.temperature)
    )
    student = outputs.student_logits.astype(jnp.float32)
    teachers = outputs.teacher_logits.astype(jnp.float32)
    if self.teacher_reduction == "mean" or teachers.shape[0] == 1:
      per_teacher = jax.vmap(
          lambda t: mean_loss(self._call(student, t, outputs, temperature))
      )(teachers)
      return jnp.mean(per_teacher), state
    target = _combine_teachers(
        teachers,
        self.teacher_reduction,
        jnp.float32(1.0) if temperature is None else temperature,
    )
    return mean_loss(self._call(student, target, outputs, temperature)), state


def check_unique_names(terms: Sequence[Term]) -> None:
  """Raises ``ValueError`` when two terms share a name."""
  seen = set()
  for term in terms:
    if term.name in seen:
      raise ValueError(
          f"Two objective terms are named {term.name!r}; give each a unique"
          " `name=`."
      )
    seen.add(term.name)


@dataclasses.dataclass(frozen=True)
class TeacherFreeTerm(Term):
  """A loss of the student's logits and the labels alone: no teacher runs.

  The default is teacher-free distillation (Yuan et al., 2020):
  ``losses.teacher_free_kd_loss`` towards a virtual teacher built from the
  labels, so no teacher runs.
  """

  loss_fn: Callable[..., jax.Array] = losses.teacher_free_kd_loss
  weight: ScheduleOrValue = 1.0
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  name: str = "teacher_free"
  needs_teacher: bool = False

  def loss(self, params, state, outputs):
    del params
    labels = require_labels(self.name, outputs)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
      labels = jnp.argmax(labels, axis=-1)
    value = self.loss_fn(
        outputs.student_logits.astype(jnp.float32), labels, **self.kwargs
    )
    return mean_loss(value), state
