r"""Deep mutual learning: students that teach each other, on the one engine.

Deep mutual learning (Zhang, Xiang, Hospedales and Lu, 2018) trains ``N >= 2``
students together, without a pre-trained teacher: each learns from the labels
and from its peers' predictions. Student :math:`i` minimises

.. math::
  \mathcal{L}_i = \mathrm{CE}(y, z_i) + \frac{w}{N - 1} \sum_{j \ne i}
    T^2\, \mathrm{KL}\big(\mathrm{softmax}(z_j / T) \,\big\|\,
    \mathrm{softmax}(z_i / T)\big)

with the peers' logits :math:`z_j` under ``stop_gradient``.

Nothing here is a second engine. :func:`peers` makes the ``N`` students one
:class:`jaxkd.models.Model` (their parameters side by side, their logits
stacked in the feature ``"peer_logits"`` ``[N, B, C]``), and
:class:`MutualTerm` is an ordinary objective term, so
:func:`mutual_distillation` returns a plain :class:`jaxkd.Distillation`: one
``DistillState``, ``make_train_step``, ``make_eval_step`` and ``summarize``.

The paper's Algorithm 1 *alternates*: it updates student 1, recomputes the
predictions, updates student 2, and so on. This takes the practical variant
the paper also describes (and most implementations use): every student is
evaluated once on the batch and all are updated *simultaneously* from the same
predictions. The step minimises :math:`\sum_i \mathcal{L}_i`; since each
peer's logits are constants in :math:`\mathcal{L}_i`, the gradient with
respect to student :math:`i` is that of :math:`\mathcal{L}_i` alone: a step
equals ``N`` separate distillation steps, each with the peers' current logits
as a fixed teacher (``tests/test_mutual.py`` checks it). Each student has its
own optimiser state (``optax.multi_transform`` over the students).

References:
  Zhang, Xiang, Hospedales and Lu, `Deep Mutual Learning
  <https://arxiv.org/abs/1706.00384>`_, 2018.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

from jaxkd import losses
from jaxkd import objective
from jaxkd import train_step
from jaxkd.models import Model

__all__ = ["MutualTerm", "PEER_LOGITS", "mutual_distillation", "peers"]

PyTree = Any

PEER_LOGITS = "peer_logits"


def peers(students: Sequence[Model], *, name: str = "peers") -> Model:
  """``N`` models as one :class:`~jaxkd.models.Model`.

  ``params`` and ``state`` are tuples with one entry per student. ``apply``
  returns as logits the students' probability ensemble in log space
  (``losses.ensemble_log_soft_targets``, what the group predicts), and as
  features ``"peer_logits"`` ``[N, B, C]`` and every student's own features
  under ``"peer{i}/{name}"``.

  Raises:
    ValueError: With fewer than two students, or (at ``init``) students of
      different numbers of classes.
  """
  students = tuple(students)
  if len(students) < 2:
    raise ValueError(
        "`students` must hold at least two models for mutual learning, got"
        f" {len(students)}."
    )

  def init(key, x):
    keys = jax.random.split(key, len(students))
    pairs = [model.init(k, x) for model, k in zip(students, keys)]
    params = tuple(p for p, _ in pairs)
    state = tuple(s for _, s in pairs)
    classes = [
        jax.eval_shape(
            lambda p, s, m=model: m.apply(p, s, x, train=False, rng=None)[0],
            p, s,
        ).shape[-1]
        for model, (p, s) in zip(students, pairs)
    ]
    if len(set(classes)) > 1:
      listing = ", ".join(
          f"{m.name!r}: {c}" for m, c in zip(students, classes)
      )
      raise ValueError(
          f"Mutual learning needs students of one number of classes, got"
          f" {listing}."
      )
    return params, state

  def apply(params, state, x, *, train, rng=None):
    keys = (
        [None] * len(students)
        if rng is None
        else list(jax.random.split(rng, len(students)))
    )
    logits, features, new_states = [], {}, []
    for i, (model, p, s, k) in enumerate(zip(students, params, state, keys)):
      z, f, new_s = model.apply(p, s, x, train=train, rng=k)
      logits.append(z.astype(jnp.float32))
      features.update({f"peer{i}/{n}": v for n, v in f.items()})
      new_states.append(new_s)
    stacked = jnp.stack(logits)
    features[PEER_LOGITS] = stacked
    return (
        losses.ensemble_log_soft_targets(stacked),
        features,
        tuple(new_states),
    )

  return Model(init=init, apply=apply, name=name)


@dataclasses.dataclass(frozen=True)
class MutualTerm(objective.Term):
  r"""The sum over peers of :math:`\mathcal{L}_i` (see the module docstring).

  Reads the student feature ``"peer_logits"`` ``[N, B, C]`` made by
  :func:`peers`; needs labels and no teacher. Evaluation adds each peer's
  accuracy (``summarize`` reports ``"{name}/accuracy"``, one value per
  student).
  """

  weight: objective.ScheduleOrValue = 1.0
  temperature: objective.ScheduleOrValue = 1.0
  peer_weight: objective.ScheduleOrValue = 1.0
  label_smoothing: float = 0.0
  name: str = "mutual"
  needs_teacher: bool = False

  def hyperparameters(self):
    return {
        **super().hyperparameters(),
        "temperature": (self.temperature, "temperature"),
        "peer_weight": (self.peer_weight, "weight"),
    }

  def _peer_logits(self, outputs: objective.StepOutputs) -> jax.Array:
    if PEER_LOGITS not in outputs.student_features:
      raise ValueError(
          f"Term {self.name!r} needs the student feature {PEER_LOGITS!r}:"
          " build the student with `jaxkd.methods.mutual.peers(...)`."
      )
    return outputs.student_features[PEER_LOGITS].astype(jnp.float32)

  def loss(self, params, state, outputs):
    del params
    labels = objective.require_labels(self.name, outputs)
    logits = self._peer_logits(outputs)
    temperature = outputs.resolve(self.temperature)
    peer_weight = outputs.resolve(self.peer_weight)
    fixed = jax.lax.stop_gradient(logits)
    n = logits.shape[0]
    total = jnp.zeros((), jnp.float32)
    for i in range(n):
      ce = jnp.mean(losses.cross_entropy(
          logits[i], labels, label_smoothing=self.label_smoothing
      ))
      kl = jnp.mean(jnp.stack([
          jnp.mean(losses.kd_loss(logits[i], fixed[j],
                                  temperature=temperature))
          for j in range(n) if j != i
      ]))
      total = total + ce + peer_weight * kl
    return total, state

  def evaluation_sums(self, outputs, weights):
    if outputs.labels is None:
      return {}
    logits = self._peer_logits(outputs)
    correct = jnp.argmax(logits, axis=-1) == outputs.labels[None]
    return {
        "accuracy": jnp.sum(weights[None] * correct.astype(jnp.float32),
                            axis=-1)
    }


def mutual_distillation(
    students: Sequence[Model],
    optimizer: optax.GradientTransformation
    | Sequence[optax.GradientTransformation],
    *,
    temperature: objective.ScheduleOrValue = 1.0,
    weight: objective.ScheduleOrValue = 1.0,
    label_smoothing: float = 0.0,
    views: train_step.Views = train_step.Views(),
) -> train_step.Distillation:
  """The :class:`~jaxkd.Distillation` of deep mutual learning.

  Args:
    students: Two or more :class:`~jaxkd.models.Model` of one number of
      classes, of any architectures.
    optimizer: One Optax transformation for every student (each keeps its
      own state) or one per student.
    temperature: :math:`T` of the peers' KL terms (a float or a schedule).
    weight: :math:`w`, the weight of the mean peer KL.
    label_smoothing: Of the students' cross-entropy.
    views: Input views, as for any distillation.

  Returns:
    A distillation whose state's ``params["student"]`` holds one entry per
    student.

  Example::

    spec = mutual_distillation([resnet_a, resnet_b], optax.adam(1e-3))
    state = spec.init(jax.random.key(0), batch)
    step = jaxkd.make_train_step(spec)
  """
  students = tuple(students)
  group = peers(students)
  if isinstance(optimizer, optax.GradientTransformation):
    optimizers = (optimizer,) * len(students)
  else:
    optimizers = tuple(optimizer)
    if len(optimizers) != len(students):
      raise ValueError(
          f"`optimizer` holds {len(optimizers)} transformations for"
          f" {len(students)} students."
      )

  def labels(params: PyTree) -> PyTree:
    student = tuple(
        jax.tree.map(lambda _, i=i: str(i), p)
        for i, p in enumerate(params["student"])
    )
    # Terms have no parameters here; the first optimiser owns any.
    terms = jax.tree.map(lambda _: "0", params["terms"])
    return {"student": student, "terms": terms}

  transforms = {str(i): tx for i, tx in enumerate(optimizers)}
  return train_step.Distillation(
      student=group,
      objective=[
          MutualTerm(
              temperature=temperature,
              peer_weight=weight,
              label_smoothing=label_smoothing,
          )
      ],
      optimizer=optax.multi_transform(transforms, labels),
      views=views,
  )
