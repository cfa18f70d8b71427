r"""Deep mutual learning: students that teach each other in one jitted step.

Deep mutual learning (Zhang, Xiang, Hospedales and Lu, 2018) trains ``N >= 2``
students together, without a pre-trained teacher: each learns from the labels
and from its peers' predictions. Student :math:`i` minimises

.. math::
  \mathcal{L}_i = \mathrm{CE}(y, z_i) + \frac{w}{N - 1} \sum_{j \ne i}
    T^2\, \mathrm{KL}\big(\mathrm{softmax}(z_j / T) \,\big\|\,
    \mathrm{softmax}(z_i / T)\big)

with the peers' logits :math:`z_j` under ``stop_gradient``. The paper's
Algorithm 1 *alternates*: it updates student 1, recomputes the predictions,
updates student 2, and so on. This module takes the practical variant the
paper also describes (and most implementations use): every student is
evaluated once on the batch and all are updated *simultaneously* from the same
predictions, which is one forward and one backward pass per student. Since
each peer's logits are constants in :math:`\mathcal{L}_i`, the gradient of
:math:`\sum_i \mathcal{L}_i` with respect to student :math:`i` is the
gradient of :math:`\mathcal{L}_i` alone: a step equals ``N`` separate
distillation steps, each with the peers' current logits as a fixed teacher.

The students may have different architectures; each has its own parameters,
state and optimiser state in :class:`MutualState`.

References:
  Zhang, Xiang, Hospedales and Lu, `Deep Mutual Learning
  <https://arxiv.org/abs/1706.00384>`_, 2018.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxkd import losses
from jaxkd import objective
from jaxkd.models._contract import Model

PyTree = Any
Batch = Mapping[str, jax.Array]


class PeerState(struct.PyTreeNode):
  """One student's arrays: ``params``, ``model_state`` and ``opt_state``."""

  params: PyTree
  model_state: PyTree
  opt_state: PyTree


class MutualState(struct.PyTreeNode):
  """Everything a mutual-learning step reads and writes.

  Attributes:
    step: Number of updates applied so far (int32 scalar).
    students: One :class:`PeerState` per student, in the order of
      ``MutualDistillation.students``.
    rng: PRNG key data; step ``s`` draws from ``fold_in(rng, s)``.
  """

  step: jax.Array
  students: tuple[PeerState, ...]
  rng: jax.Array


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cross-entropy with integer ``[B]`` or soft ``[B, C]`` labels."""
  if jnp.issubdtype(labels.dtype, jnp.integer):
    labels = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
  labels = labels.astype(jnp.float32)
  return jnp.mean(-jnp.sum(labels * jax.nn.log_softmax(logits), axis=-1))


@dataclasses.dataclass(frozen=True, eq=False)
class MutualDistillation:
  """Deep mutual learning of two or more students.

  Attributes:
    students: The students (:class:`jaxkd.models.Model`), two or more, all
      producing the same number of classes.
    optimizer: One Optax transformation used by every student (each with its
      own state), or a sequence of one per student.
    temperature: :math:`T` of the peers' KL terms; a float or a schedule of
      the step.
    weight: :math:`w`, the weight of the mean peer KL; a float or a
      schedule.

  Example::

    md = MutualDistillation([resnet_a, resnet_b], optax.adam(1e-3))
    state = md.init(jax.random.key(0), batch)
    step = make_mutual_step(md)
    for batch in batches:
      state, metrics = step(state, batch)

  .. versionadded:: 0.1.0
  """

  students: Sequence[Model]
  optimizer: optax.GradientTransformation | Sequence[
      optax.GradientTransformation]
  _: dataclasses.KW_ONLY
  temperature: objective.ScheduleOrValue = 1.0
  weight: objective.ScheduleOrValue = 1.0

  def __post_init__(self):
    object.__setattr__(self, "students", tuple(self.students))
    if len(self.students) < 2:
      raise ValueError(
          "`students` must hold at least two models for mutual learning, got"
          f" {len(self.students)}."
      )
    if isinstance(self.optimizer, optax.GradientTransformation):
      optimizers = (self.optimizer,) * len(self.students)
    else:
      optimizers = tuple(self.optimizer)
      if len(optimizers) != len(self.students):
        raise ValueError(
            f"`optimizer` holds {len(optimizers)} transformations for"
            f" {len(self.students)} students."
        )
    object.__setattr__(self, "_optimizers", optimizers)
    if isinstance(self.temperature, (int, float)) and self.temperature <= 0:
      raise ValueError(
          f"`temperature` must be > 0, got {self.temperature!r}."
      )
    if isinstance(self.weight, (int, float)) and self.weight < 0:
      raise ValueError(f"`weight` must be >= 0, got {self.weight!r}.")

  @property
  def optimizers(self) -> tuple[optax.GradientTransformation, ...]:
    """One transformation per student."""
    return self._optimizers  # pytype: disable=attribute-error

  # -- Losses ----------------------------------------------------------------

  def _forward(self, params, state: MutualState, images, key, train):
    keys = jax.random.split(key, len(self.students))
    logits, new_states = [], []
    for model, p, peer, k in zip(self.students, params, state.students, keys):
      out, _, new_state = model.apply(
          p, peer.model_state, images, train=train, rng=k if train else None
      )
      logits.append(out.astype(jnp.float32))
      new_states.append(new_state)
    return logits, new_states

  def _objective(self, params, state: MutualState, batch: Batch, key):
    images = jnp.asarray(batch["image"])
    labels = jnp.asarray(batch["label"])
    logits, new_states = self._forward(params, state, images, key, True)
    temperature = objective.resolve(self.temperature, state.step)
    weight = objective.resolve(self.weight, state.step)
    # Each student sees its peers' logits as constants.
    fixed = [jax.lax.stop_gradient(z) for z in logits]
    total = jnp.zeros((), jnp.float32)
    metrics = {}
    for i, z in enumerate(logits):
      ce = _cross_entropy(z, labels)
      kl = jnp.mean(jnp.stack([
          jnp.mean(losses.kd_loss(z, fixed[j], temperature=temperature))
          for j in range(len(logits)) if j != i
      ]))
      loss = ce + weight * kl
      total = total + loss
      metrics.update({f"loss/{i}": loss, f"ce/{i}": ce, f"kl/{i}": kl})
    return total, (new_states, logits, metrics)

  # -- The step ----------------------------------------------------------------

  def _train_step(self, state: MutualState, batch: Batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    params = tuple(peer.params for peer in state.students)
    (total, (new_states, logits, metrics)), grads = jax.value_and_grad(
        self._objective, has_aux=True
    )(params, state, batch, key)
    peers = []
    for i, (peer, grad, new_state, tx) in enumerate(
        zip(state.students, grads, new_states, self.optimizers)
    ):
      # Optax's adam family mixes dtypes in its bias correction.
      with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = tx.update(grad, peer.opt_state, peer.params)
        new_params = optax.apply_updates(peer.params, updates)
      peers.append(PeerState(new_params, new_state, opt_state))
      metrics[f"grad_norm/{i}"] = optax.tree.norm(grad)
    labels = jnp.asarray(batch["label"])
    if not jnp.issubdtype(labels.dtype, jnp.integer):
      labels = jnp.argmax(labels, axis=-1)
    for i, z in enumerate(logits):
      metrics[f"accuracy/{i}"] = jnp.mean(
          (jnp.argmax(z, axis=-1) == labels).astype(jnp.float32)
      )
    metrics["loss"] = total / len(self.students)
    new_state = state.replace(step=state.step + 1, students=tuple(peers))
    return new_state, metrics

  def _eval_step(self, state: MutualState, batch: Batch):
    images = jnp.asarray(batch["image"])
    labels = jnp.asarray(batch["label"])
    params = tuple(peer.params for peer in state.students)
    logits, _ = self._forward(params, state, images, jax.random.key(0), False)
    stacked = jnp.stack(logits)  # [N, B, C]
    weights = (
        jnp.ones(labels.shape[:1], jnp.float32)
        if batch.get("mask") is None
        else jnp.asarray(batch["mask"]).astype(jnp.float32)
    )
    correct = (jnp.argmax(stacked, axis=-1) == labels[None]).astype(
        jnp.float32
    )
    # The ensemble averages the students' probabilities (in log space).
    ensemble = jnp.argmax(losses.ensemble_log_soft_targets(stacked), axis=-1)
    ce = jax.vmap(
        lambda z: optax.softmax_cross_entropy_with_integer_labels(z, labels)
    )(stacked)
    return {
        "count": jnp.sum(weights),
        "correct": jnp.sum(weights[None] * correct, axis=-1),
        "ensemble_correct": jnp.sum(
            weights * (ensemble == labels).astype(jnp.float32)
        ),
        "loss": jnp.sum(weights[None] * ce, axis=-1),
    }

  # -- Initialisation ----------------------------------------------------------

  def init(self, key: jax.Array, sample_batch: Batch) -> MutualState:
    """Initialises every student and checks the step on abstract values.

    Args:
      key: PRNG key of the students' initialisation and of every step.
      sample_batch: A batch (``"image"``, ``"label"``) of the training
        shapes.

    Returns:
      The initial :class:`MutualState`.

    Raises:
      ValueError: When the students produce different numbers of classes.
    """
    keys = jax.random.split(key, len(self.students) + 1)
    images = jnp.asarray(sample_batch["image"])
    peers = []
    for model, k, tx in zip(self.students, keys[:-1], self.optimizers):
      params, model_state = model.init(k, images)
      peers.append(PeerState(params, model_state, tx.init(params)))
    state = MutualState(
        step=jnp.zeros((), jnp.int32),
        students=tuple(peers),
        rng=jax.random.key_data(keys[-1]),
    )
    shapes = [
        jax.eval_shape(
            lambda p, s, m=model: m.apply(p, s, images, train=False,
                                          rng=None)[0],
            peer.params, peer.model_state,
        ).shape
        for model, peer in zip(self.students, peers)
    ]
    if len({shape[-1] for shape in shapes}) > 1:
      listing = ", ".join(
          f"{m.name!r}: {s[-1]}" for m, s in zip(self.students, shapes)
      )
      raise ValueError(
          f"Mutual learning needs students of one number of classes, got"
          f" {listing}."
      )
    jax.eval_shape(self._train_step, state, dict(sample_batch))
    return state


def make_mutual_step(
    distillation: MutualDistillation, *, donate: bool = True
) -> Callable[[MutualState, Batch], tuple[MutualState, dict]]:
  """The jitted step ``(state, batch) -> (state, metrics)``.

  Metrics per student ``i``: ``loss/i``, ``ce/i``, ``kl/i`` (the mean peer
  ``kd_loss``), ``accuracy/i`` and ``grad_norm/i``; ``loss`` is the mean of
  the students' losses. The state is donated unless ``donate=False``.
  """
  return jax.jit(
      distillation._train_step,  # pylint: disable=protected-access
      donate_argnums=(0,) if donate else (),
  )


def make_mutual_eval_step(
    distillation: MutualDistillation,
) -> Callable[[MutualState, Batch], dict]:
  """The jitted ``(state, batch) -> metric sums``.

  Returns sums over the batch (an optional boolean ``"mask"`` ``[B]`` says
  which examples count): ``count``, ``correct`` ``[N]`` (per student),
  ``ensemble_correct`` (the students' probability average) and ``loss``
  ``[N]`` (cross-entropy). :func:`summarize` turns a list of them into
  accuracies.
  """
  return jax.jit(distillation._eval_step)  # pylint: disable=protected-access


def summarize(metric_sums: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Adds eval-step sums over batches and divides by the count.

  Returns:
    ``{"accuracy": [N floats], "ensemble_accuracy": float, "loss": [N
    floats]}``, or ``{}`` when no example was counted.
  """
  total: dict[str, np.ndarray] = {}
  for sums in metric_sums:
    for name, value in sums.items():
      total[name] = total.get(name, 0) + np.asarray(value, np.float64)
  count = float(total.get("count", 0.0))
  if count == 0:
    return {}
  return {
      "accuracy": (total["correct"] / count).tolist(),
      "ensemble_accuracy": float(total["ensemble_correct"] / count),
      "loss": (total["loss"] / count).tolist(),
  }
