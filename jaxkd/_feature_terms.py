"""Terms between named features: feature and relational losses through
adaptors (:class:`FeatureTerm`) and contrastive distillation with a queue of
negatives (:class:`CRDTerm`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd import adaptors
from jaxkd import losses
from jaxkd._hyper import ScheduleOrValue
from jaxkd._term import StepOutputs
from jaxkd._term import Term
from jaxkd._term import accepts
from jaxkd._term import mean_loss

PyTree = Any


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
  kwargs = {"train": train} if accepts(module.__call__, "train") else {}
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
    return mean_loss(value), state


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
    return mean_loss(value), {"queue": queue}
