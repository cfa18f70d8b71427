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
import inspect
import math
from typing import Any, Callable, Mapping, Sequence

from flax import struct
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import adaptors
from jaxkd import losses

PyTree = Any
ScheduleOrValue = Any  # a float, a `step -> value` schedule or a Hyper

TEACHER_REDUCTIONS = ("ensemble", "ensemble_logits", "mean", "confidence")
HYPERPARAMETER_KINDS = ("weight", "temperature")
# Steps at which a schedule is checked when its term is built.
_CHECKED_STEPS = (0, 1, 10, 100, 1_000, 10_000, 100_000, 1_000_000)

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
class Hyper:
  """A hyper-parameter read from ``state.hparams[name]`` at every step.

  Use it for a weight or temperature that a vmapped sweep varies across
  students (``jaxkd.sweep``), or that the training loop changes without
  recompiling (an adaptive weight).
  """

  name: str


def resolve(
    value: ScheduleOrValue | Hyper,
    step: jax.Array,
    hparams: Mapping[str, jax.Array] | None = None,
) -> jax.Array:
  """The value of a constant, a schedule or a :class:`Hyper` at ``step``."""
  if isinstance(value, Hyper):
    if not hparams or value.name not in hparams:
      raise ValueError(
          f"The objective reads the hyper-parameter {value.name!r}, but the"
          f" state has {sorted(hparams or {})}: pass"
          f" `hparams={{{value.name!r}: ...}}` to `Distillation.init`."
      )
    return jnp.asarray(hparams[value.name], jnp.float32)
  if callable(value):
    return jnp.asarray(value(step), jnp.float32)
  return jnp.asarray(value, jnp.float32)


def is_valid(value: jax.Array, kind: str) -> jax.Array:
  """Whether a (traced) hyper-parameter value is usable: a boolean scalar.

  A temperature must be finite and ``> 0``, a weight finite and ``>= 0``.
  """
  value = jnp.asarray(value, jnp.float32)
  if kind == "temperature":
    return jnp.all(jnp.isfinite(value) & (value > 0))
  return jnp.all(jnp.isfinite(value) & (value >= 0))


def check_hyperparameter(owner: str, name: str, value: Any, kind: str) -> None:
  """Raises ``ValueError`` for an invalid constant or schedule.

  Constants are checked as they are; a schedule (a callable of the step) is
  evaluated at steps 0, 1, 10, ..., 10**6 and every value checked. A
  :class:`Hyper` is read from the state at run time and checked there.
  """
  if kind not in HYPERPARAMETER_KINDS:
    raise ValueError(f"Unknown hyper-parameter kind {kind!r}.")
  if value is None or isinstance(value, (Hyper, jax.core.Tracer)):
    return  # Checked at run time, by the engine.
  need = "> 0" if kind == "temperature" else ">= 0"
  if callable(value):
    for step in _CHECKED_STEPS:
      at = jax.device_get(value(jnp.asarray(step, jnp.int32)))
      if not bool(is_valid(at, kind)):
        raise ValueError(
            f"`{name}` of {owner} is a schedule whose value at step {step} is"
            f" {float(jnp.asarray(at)):g}; a {kind} must be finite and {need}."
        )
    return
  if isinstance(value, bool) or not isinstance(
      value, (int, float, jax.Array, jnp.ndarray, jnp.generic)
  ):
    raise TypeError(
        f"`{name}` of {owner} must be a number, a schedule (a callable of"
        f" the step) or a Hyper, got {type(value).__name__} {value!r}."
    )
  constant = np.asarray(value, np.float64)
  ok = np.isfinite(constant) & (
      constant > 0 if kind == "temperature" else constant >= 0)
  if not np.all(ok):
    raise ValueError(
        f"`{name}` of {owner} must be finite and {need}, got {value!r}."
    )


def require_labels(name: str, outputs: "StepOutputs") -> jax.Array:
  """The step's labels, or a ``ValueError`` naming the term that needs them."""
  if outputs.labels is None:
    raise ValueError(f"Term {name!r} needs labels in the batch.")
  return outputs.labels


class StepOutputs(struct.PyTreeNode):
  """What a term sees of one step: both models' outputs and the batch.

  ``teacher_logits`` has shape ``[K, B, C]`` (``None`` without teachers);
  ``teacher_features`` maps names to ``[K, B, ...]``; ``labels`` are integer
  ``[B]`` or soft ``[B, C]`` (after mixup). For token inputs the logits are
  ``[B, L, V]`` and ``[K, B, L, V]`` and ``batch`` holds the batch's arrays
  (``"tokens"``, ``"mask"``, cached teacher entries).
  """

  student_logits: jax.Array
  student_features: Mapping[str, jax.Array]
  teacher_logits: jax.Array | None
  teacher_features: Mapping[str, jax.Array]
  labels: jax.Array | None
  step: jax.Array
  hparams: Mapping[str, jax.Array]
  train: bool = struct.field(pytree_node=False)
  # The (micro-)batch's arrays for terms that read more than the logits
  # (the tokens and masks of token terms); empty for image inputs.
  batch: Mapping[str, jax.Array] = struct.field(default_factory=dict)

  def resolve(self, value: ScheduleOrValue | Hyper) -> jax.Array:
    """A term's weight or temperature at this step."""
    return resolve(value, self.step, self.hparams)


def _mean_loss(loss: jax.Array) -> jax.Array:
  """Per-example losses are averaged; batch-level scalars pass through."""
  return jnp.mean(loss.astype(jnp.float32))


def _accepts(fn: Callable[..., Any], name: str) -> bool:
  try:
    parameters = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False
  return name in parameters or any(
      p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
  )


class Term:
  """Base class of objective terms.

  A term has a ``name`` (unique in its objective, the key of its parameters,
  state and metric) and a ``weight``. ``init`` returns its trainable
  parameters and state from abstract shapes of the outputs; ``loss`` returns
  the term's scalar loss and its new state.
  """

  name: str
  weight: ScheduleOrValue
  needs_teacher: bool = True

  def __post_init__(self):
    for name, (value, kind) in self.hyperparameters().items():
      check_hyperparameter(f"term {self.name!r}", name, value, kind)

  def hyperparameters(self) -> dict[str, tuple[ScheduleOrValue, str]]:
    """``{name: (value, kind)}`` of the weights and temperatures to check.

    ``kind`` is ``"weight"`` (finite, ``>= 0``) or ``"temperature"``
    (finite, ``> 0``). Subclasses with more add theirs to the base's.
    """
    return {"weight": (self.weight, "weight")}

  def evaluation_sums(
      self, outputs: StepOutputs, weights: jax.Array
  ) -> Mapping[str, jax.Array]:
    """Sums over an evaluation batch that this term adds (default none).

    ``weights`` ``[B]`` are the examples' mask as floats. The eval step
    reports them as ``"{name}/{key}"``; ``summarize`` divides by the count.
    """
    del outputs, weights
    return {}

  def init(
      self, key: jax.Array, outputs: StepOutputs
  ) -> tuple[PyTree, PyTree]:
    del key, outputs
    return {}, {}

  def loss(
      self, params: PyTree, state: PyTree, outputs: StepOutputs
  ) -> tuple[jax.Array, PyTree]:
    raise NotImplementedError

  def token_count(self, batch: Mapping[str, jax.Array]) -> jax.Array | None:
    """How many units (tokens) the loss averages over in ``batch``.

    ``None`` (the default) marks a term whose ``loss`` is a mean over
    examples. A token-normalised term returns a float32 scalar computed from
    the batch alone (its masks), and implements :meth:`loss_sum`.
    """
    del batch
    return None

  def loss_sum(
      self, params: PyTree, state: PyTree, outputs: StepOutputs
  ) -> tuple[tuple[jax.Array, jax.Array], PyTree]:
    """``((sum, count), state)`` of a token-normalised term.

    ``loss`` is then ``sum / max(1, count)``; under gradient accumulation
    the engine divides the sum by the global batch's count instead.
    """
    raise NotImplementedError(
        f"Term {self.name!r} has no `loss_sum` (it is not token-normalised)."
    )

  def update(
      self, state: PyTree, outputs: StepOutputs, key: jax.Array
  ) -> tuple[PyTree, Mapping[str, jax.Array]]:
    """Runs after the student's update, on outputs without gradient.

    A term with a model of its own (a discriminator) trains it here, with
    its own optimiser whose state lives in the term's state. Returns the new
    term state and metrics. The default does nothing.
    """
    del outputs, key
    return state, {}


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
    return _mean_loss(per_example), state


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
          lambda t: _mean_loss(self._call(student, t, outputs, temperature))
      )(teachers)
      return jnp.mean(per_teacher), state
    target = _combine_teachers(
        teachers,
        self.teacher_reduction,
        jnp.float32(1.0) if temperature is None else temperature,
    )
    return _mean_loss(self._call(student, target, outputs, temperature)), state


def _select_teacher(features: jax.Array, teacher: int | str) -> jax.Array:
  if teacher == "mean":
    return jnp.mean(features, axis=0)
  return features[teacher]


def _check_feature(kind: str, name: str, available: Mapping[str, Any], term):
  if name not in available:
    raise ValueError(
        f"Term {term!r} names the {kind} feature {name!r}, but the {kind}"
        f" produces {sorted(available)}."
    )


def _adaptor_call(module: nn.Module, variables, x, *, train: bool):
  """Applies an adaptor, updating its BatchNorm statistics in training."""
  if "batch_stats" in variables and train:
    y, new_state = module.apply(
        variables, x, train=True, mutable=["batch_stats"]
    )
    return y, dict(new_state)
  kwargs = {"train": train} if _accepts(module.__call__, "train") else {}
  y = module.apply(variables, x, **kwargs)
  return y, {k: v for k, v in variables.items() if k != "params"}


@dataclasses.dataclass(frozen=True)
class FeatureTerm(Term):
  """A feature or relational loss between a student and a teacher feature.

  ``loss_fn(student_features, teacher_features, **kwargs)`` is any feature
  loss of ``jaxkd.losses`` (``hint_loss``, ``attention_transfer_loss``,
  ``similarity_preserving_loss``, ``rkd_distance_loss``, ``pkt_loss``, ...).
  ``adaptor`` projects the student feature before the loss: a flax linen
  module, ``"auto"`` (``jaxkd.adaptors.adaptor_for`` when the shapes differ,
  none when they match) or ``None``. ``teacher`` picks the teacher index, or
  ``"mean"`` averages the feature over teachers.
  """

  loss_fn: Callable[..., jax.Array] = losses.hint_loss
  student_feature: str = "embedding"
  teacher_feature: str = "embedding"
  weight: ScheduleOrValue = 1.0
  adaptor: nn.Module | str | None = None
  teacher: int | str = 0
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  name: str = "feature"

  def _features(self, outputs: StepOutputs) -> tuple[jax.Array, jax.Array]:
    _check_feature("student", self.student_feature, outputs.student_features,
                   self.name)
    _check_feature("teacher", self.teacher_feature, outputs.teacher_features,
                   self.name)
    student = outputs.student_features[self.student_feature]
    teacher = _select_teacher(
        outputs.teacher_features[self.teacher_feature], self.teacher
    )
    return student, jax.lax.stop_gradient(teacher)

  def _module(self, student_shape, teacher_shape) -> nn.Module | None:
    if self.adaptor == "auto":
      if tuple(student_shape) == tuple(teacher_shape):
        return None
      return adaptors.adaptor_for(student_shape, teacher_shape)
    return self.adaptor

  def init(self, key, outputs):
    student, teacher = self._features(outputs)
    module = self._module(student.shape, teacher.shape)
    if module is None:
      return {}, {}
    variables = dict(module.init(key, jnp.zeros(student.shape, jnp.float32)))
    params = variables.pop("params", {})
    return params, variables

  def loss(self, params, state, outputs):
    student, teacher = self._features(outputs)
    module = self._module(student.shape, teacher.shape)
    if module is not None:
      student, state = _adaptor_call(
          module, {"params": params, **state},
          student.astype(jnp.float32), train=outputs.train,
      )
    value = self.loss_fn(
        student.astype(jnp.float32), teacher.astype(jnp.float32),
        **self.kwargs,
    )
    return _mean_loss(value), state


@dataclasses.dataclass(frozen=True)
class CRDTerm(Term):
  """Contrastive representation distillation (Tian et al., 2020).

  Linear heads project the student and teacher features to ``dim`` and
  ``losses.crd_loss`` contrasts them against a queue of ``queue_size`` past
  embeddings, kept in the train state.
  """

  student_feature: str = "embedding"
  teacher_feature: str = "embedding"
  dim: int = 128
  queue_size: int = 4096
  temperature: float = 0.07
  weight: ScheduleOrValue = 0.8
  teacher: int | str = 0
  name: str = "crd"

  def hyperparameters(self):
    return {
        **super().hyperparameters(),
        "temperature": (self.temperature, "temperature"),
    }

  def _features(self, outputs):
    return FeatureTerm(
        student_feature=self.student_feature,
        teacher_feature=self.teacher_feature,
        teacher=self.teacher,
        name=self.name,
    )._features(outputs)

  def init(self, key, outputs):
    student, teacher = self._features(outputs)
    head = adaptors.LinearAdaptor(features=self.dim)
    s_key, t_key, q_key = jax.random.split(key, 3)
    flat = lambda x: jnp.zeros((x.shape[0], math.prod(x.shape[1:])))
    params = {
        "student_head": head.init(s_key, flat(student))["params"],
        "teacher_head": head.init(t_key, flat(teacher))["params"],
    }
    queue = losses.init_crd_queue(self.queue_size, self.dim, key=q_key)
    return params, {"queue": queue}

  def loss(self, params, state, outputs):
    student, teacher = self._features(outputs)
    head = adaptors.LinearAdaptor(features=self.dim)
    flatten = lambda x: x.reshape(x.shape[0], -1).astype(jnp.float32)
    student_embed = head.apply({"params": params["student_head"]},
                               flatten(student))
    teacher_embed = head.apply({"params": params["teacher_head"]},
                               flatten(teacher))
    value, queue = losses.crd_loss(
        student_embed, teacher_embed, state["queue"],
        temperature=self.temperature,
    )
    if not outputs.train:
      queue = state["queue"]
    return _mean_loss(value), {"queue": queue}


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
    return _mean_loss(value), state
