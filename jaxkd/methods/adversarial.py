"""Adversarial distillation: a discriminator trained inside the train step.

:class:`AdversarialTerm` is an objective term whose discriminator :math:`D`
tells the teacher's outputs ("real") from the student's ("fake"). The student
is trained, as a GAN generator, to make its outputs indistinguishable from
the teacher's (``losses.generator_loss``); the discriminator is trained on
``losses.discriminator_loss`` by an Optax optimiser of its own. Both updates
happen in the same jitted step:

1. the student's loss reads :math:`D` with its parameters under
   ``stop_gradient``, so the student's gradient never reaches them;
2. after the student's update, the term's ``update`` hook takes one optimiser
   step of :math:`D` on the step's outputs (without gradient).

The discriminator's parameters and optimiser state live in the term's
*state* (``state.model_state["terms"][name] == {"params", "opt_state"}``), not
in ``state.params``: the student's optimiser never sees them, and the
student's checkpoint can leave them out.

References:
  KDGAN (Wang, Zhang, Sun and Qi, 2018) and the conditional adversarial
  distillation of Xu, Hsu and Huang (2018), cited in full with the losses
  this term trains, :func:`jaxkd.losses.discriminator_loss` and
  :func:`jaxkd.losses.generator_loss`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxkd import losses
from jaxkd import objective

__all__ = [
    "AdversarialTerm",
    "Discriminator",
]

PyTree = Any

_FEATURE_PREFIX = "feature:"


class Discriminator(nn.Module):
  """A small MLP critic: flattens its input and returns one logit per example.

  Attributes:
    hidden: Widths of the hidden layers.
    negative_slope: Slope of the leaky ReLU.
  """

  hidden: Sequence[int] = (64,)
  negative_slope: float = 0.2

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = x.reshape(x.shape[0], -1).astype(jnp.float32)
    for width in self.hidden:
      h = nn.leaky_relu(nn.Dense(width)(h), self.negative_slope)
    return nn.Dense(1)(h)[:, 0]


def _default_optimizer() -> optax.GradientTransformation:
  return optax.adam(1e-3)


@dataclasses.dataclass(frozen=True)
class AdversarialTerm(objective.Term):
  """A GAN term: the student learns to fool a discriminator of its outputs.

  The discriminator sees, per example, either the soft targets
  :math:`\\mathrm{softmax}(z / T)` (``on="logits"``) or a named feature
  (``on="feature:<name>"``, the same name on both sides, of one shape). Its
  loss is

  .. math::
    \\mathcal{L}_D = \\mathrm{softplus}(-D(t)) + \\mathrm{softplus}(D(s)),
    \\qquad
    \\mathcal{L}_S = \\mathrm{softplus}(-D(s))

  averaged over the batch, with :math:`t` the teacher's output and :math:`s`
  the student's. :math:`\\mathcal{L}_S` (weighted by ``weight``) joins the
  student's objective; :math:`\\mathcal{L}_D` trains the discriminator, with
  ``optimizer``, in the term's ``update`` hook after the student's update.
  The hook reports ``"{name}/d_loss"`` and ``"{name}/d_accuracy"`` (the
  fraction of real and fake examples the discriminator classifies right,
  both measured before its update).

  Attributes:
    discriminator: A linen module mapping ``[B, ...]`` to ``[B]`` or
      ``[B, 1]`` logits. It may hold only ``"params"`` (no BatchNorm
      statistics, no dropout).
    optimizer: The discriminator's own Optax optimiser.
    on: ``"logits"`` or ``"feature:<name>"``.
    temperature: Softening of the logits (``on="logits"`` only); a float, a
      schedule or an ``objective.Hyper``.
    teacher: With several teachers, ``"ensemble"`` (the probability average
      of the teachers' soft targets, or the mean feature) or the index of one
      teacher.
    weight: The weight of :math:`\\mathcal{L}_S` in the objective.
    name: The term's name.

  Example::

    term = AdversarialTerm(optimizer=optax.adam(1e-3), temperature=4.0,
                           weight=0.5)
    spec = Distillation(student=student, teachers=[group],
                        objective=[LabelTerm(), term], optimizer=tx)

  .. versionadded:: 0.1.0
  """

  discriminator: nn.Module = dataclasses.field(default_factory=Discriminator)
  optimizer: optax.GradientTransformation = dataclasses.field(
      default_factory=_default_optimizer
  )
  on: str = "logits"
  temperature: objective.ScheduleOrValue = 1.0
  teacher: int | str = "ensemble"
  weight: objective.ScheduleOrValue = 1.0
  name: str = "adversarial"

  def __post_init__(self):
    if self.on != "logits" and not (
        self.on.startswith(_FEATURE_PREFIX) and len(self.on) > len(
            _FEATURE_PREFIX)
    ):
      raise ValueError(
          f"`on` of term {self.name!r} must be 'logits' or"
          f" 'feature:<name>', got {self.on!r}."
      )
    if self.teacher != "ensemble" and not (
        isinstance(self.teacher, int) and not isinstance(self.teacher, bool)
    ):
      raise ValueError(
          f"`teacher` of term {self.name!r} must be 'ensemble' or a teacher"
          f" index, got {self.teacher!r}."
      )
    if isinstance(self.temperature, (int, float)) and self.temperature <= 0:
      raise ValueError(
          f"`temperature` of term {self.name!r} must be > 0, got"
          f" {self.temperature!r}."
      )

  # -- What the discriminator sees ------------------------------------------

  @property
  def _feature(self) -> str | None:
    if self.on == "logits":
      return None
    return self.on[len(_FEATURE_PREFIX):]

  def _student_input(self, outputs: objective.StepOutputs) -> jax.Array:
    feature = self._feature
    if feature is None:
      temperature = outputs.resolve(self.temperature)
      return losses.soft_targets(
          outputs.student_logits.astype(jnp.float32), temperature=temperature
      )
    if feature not in outputs.student_features:
      raise ValueError(
          f"Term {self.name!r} names the student feature {feature!r}, but"
          f" the student produces {sorted(outputs.student_features)}."
      )
    return outputs.student_features[feature].astype(jnp.float32)

  def _teacher_input(self, outputs: objective.StepOutputs) -> jax.Array:
    feature = self._feature
    if feature is None:
      if outputs.teacher_logits is None:
        raise ValueError(f"Term {self.name!r} needs teacher logits.")
      stacked = outputs.teacher_logits.astype(jnp.float32)
    else:
      if feature not in outputs.teacher_features:
        raise ValueError(
            f"Term {self.name!r} names the teacher feature {feature!r}, but"
            f" the teachers produce {sorted(outputs.teacher_features)}."
        )
      stacked = outputs.teacher_features[feature].astype(jnp.float32)
    num_teachers = stacked.shape[0]
    if self.teacher != "ensemble" and not (
        -num_teachers <= self.teacher < num_teachers
    ):
      raise ValueError(
          f"`teacher` of term {self.name!r} is {self.teacher}, but there are"
          f" {num_teachers} teachers."
      )
    if feature is None:
      temperature = outputs.resolve(self.temperature)
      if self.teacher == "ensemble":
        target = losses.ensemble_soft_targets(stacked, temperature=temperature)
      else:
        target = losses.soft_targets(
            stacked[self.teacher], temperature=temperature
        )
    else:
      target = (
          jnp.mean(stacked, axis=0)
          if self.teacher == "ensemble"
          else stacked[self.teacher]
      )
    return jax.lax.stop_gradient(target)

  def _logits(self, params: PyTree, x: jax.Array) -> jax.Array:
    logits = self.discriminator.apply({"params": params}, x)
    if logits.ndim == 2 and logits.shape[1] == 1:
      logits = logits[:, 0]
    if logits.shape != x.shape[:1]:
      raise ValueError(
          f"The discriminator of term {self.name!r} must return one logit per"
          f" example, shape ({x.shape[0]},) or ({x.shape[0]}, 1); got"
          f" {logits.shape}."
      )
    return logits.astype(jnp.float32)

  # -- The Term interface ---------------------------------------------------

  def init(self, key, outputs):
    student = self._student_input(outputs)
    teacher = self._teacher_input(outputs)
    if student.shape != teacher.shape:
      raise ValueError(
          f"Term {self.name!r}: the discriminator compares student and"
          f" teacher outputs of one shape, got {student.shape} (student) and"
          f" {teacher.shape} (teacher) for {self.on!r}."
      )
    variables = dict(self.discriminator.init(key, student))
    extra = sorted(set(variables) - {"params"})
    if extra:
      raise ValueError(
          f"The discriminator of term {self.name!r} may hold only 'params',"
          f" but it has the collections {extra}."
      )
    params = variables["params"]
    self._logits(params, student)  # Checks the output shape.
    # Trainable in the term's own loop: kept in the state, away from the
    # student's optimiser.
    return {}, {"params": params, "opt_state": self.optimizer.init(params)}

  def loss(self, params, state, outputs):
    del params
    discriminator = jax.lax.stop_gradient(state["params"])
    fake = self._logits(discriminator, self._student_input(outputs))
    return jnp.mean(losses.generator_loss(fake)), state

  def update(self, state, outputs, key):
    del key
    real_inputs = self._teacher_input(outputs)
    fake_inputs = jax.lax.stop_gradient(self._student_input(outputs))

    def d_loss_fn(d_params):
      real = self._logits(d_params, real_inputs)
      fake = self._logits(d_params, fake_inputs)
      value = jnp.mean(losses.discriminator_loss(real, fake))
      return value, (real, fake)

    (d_loss, (real, fake)), grads = jax.value_and_grad(
        d_loss_fn, has_aux=True
    )(state["params"])
    # Optax's adam family mixes dtypes in its bias correction.
    with jax.numpy_dtype_promotion("standard"):
      updates, opt_state = self.optimizer.update(
          grads, state["opt_state"], state["params"]
      )
      d_params = optax.apply_updates(state["params"], updates)
    correct = jnp.concatenate([real > 0, fake < 0]).astype(jnp.float32)
    metrics = {"d_loss": d_loss, "d_accuracy": jnp.mean(correct)}
    return {"params": d_params, "opt_state": opt_state}, metrics
