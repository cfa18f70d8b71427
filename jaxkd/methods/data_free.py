r"""Data-free distillation: generator and student trained in one jitted step.

No real image reaches the step. A generator :math:`G` maps noise to images;
the frozen teacher :math:`T` judges them and the student :math:`S` is
distilled on them. Each step draws noise :math:`z`, makes :math:`x = G(z)`
and

1. updates :math:`G` on

   .. math::
     \mathcal{L}_G = w_{bn} \sum_l \mathcal{R}_l(x)
       + w_{oh} \mathcal{L}_{oh} + w_a \mathcal{L}_a + w_{ie} \mathcal{L}_{ie}
       - w_{adv} \tfrac{1}{BC} \lVert S(x) - T(x) \rVert_1

   where :math:`\mathcal{R}_l` compares the batch statistics of the input of
   the teacher's batch-normalisation layer :math:`l` with its running
   statistics (DeepInversion, ``losses.batchnorm_statistics_loss``),
   :math:`\mathcal{L}_{oh}, \mathcal{L}_a, \mathcal{L}_{ie}` are DAFL's
   one-hot, activation and information-entropy losses, and the last term is
   the adversarial DFAD discrepancy that the generator maximises (the
   student's parameters held fixed);
2. updates :math:`S` on :math:`T^2\,\mathrm{KL}` (``losses.kd_loss``) to the
   teacher on ``stop_gradient(x)``, the same images, so that the student's
   gradient never reaches the generator.

The student's half is the engine's own step: :attr:`DataFreeDistillation.
distillation` is a plain :class:`jaxkd.Distillation` (a ``kd_loss`` term and
the teacher group), and the data-free step calls it on the generated images
with the teachers' logits, already computed for the generator, passed as
cached ``teacher_logits`` (the teachers run once per step). The state is a
:class:`jaxkd.DistillState`; the generator's parameters, BatchNorm statistics
and optimiser state live in ``state.model_state["generator"]``, which the
engine carries untouched and checkpoints with the rest.

With ``K`` teachers in the group the generator's losses are averaged over
the teachers and the student learns from their probability ensemble.

Capturing the teacher's batch-normalisation layers: the teacher runs inside
``flax.linen.intercept_methods``, which records, for every call of an
``nn.BatchNorm`` module, its input and its ``batch_stats`` (``mean``,
``var``). This works for teachers that are ``flax.linen`` modules wrapped by
``jaxkd.models.from_linen`` (every bundled model is one), as long as the
BatchNorm layers are not inside a lifted ``nn.scan``/``nn.vmap``. A teacher in
which no BatchNorm call is seen (an ``nnx`` model, a BN-free network) raises a
``ValueError`` unless ``bn_weight=0``.

References:
  Chen, Wang, Xu, Yang, Liu, Shi, Xu, Xu and Tian, `Data-Free Learning of
  Student Networks <https://arxiv.org/abs/1904.01186>`_, 2019.

  Yin, Molchanov, Li, Alvarez, Mallya, Hoiem, Jha and Kautz, `Dreaming to
  Distill: Data-free Knowledge Transfer via DeepInversion
  <https://arxiv.org/abs/1912.08795>`_, 2020.

  Fang, Song, Zhang, Wang and Song, `Data-Free Adversarial Distillation
  <https://arxiv.org/abs/1912.11006>`_, 2019.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxkd import losses
from jaxkd import objective
from jaxkd import teachers as teachers_lib
from jaxkd import train_step
from jaxkd.methods._inversion import BatchNormRecord as BatchNormRecord
from jaxkd.methods._inversion import batchnorm_statistics_sum
from jaxkd.methods._inversion import Generator as Generator
from jaxkd.methods._inversion import record_batchnorm as record_batchnorm
from jaxkd.models import Model
from jaxkd.state import DistillState

__all__ = [
    "BatchNormRecord",
    "DataFreeDistillation",
    "GENERATOR",
    "Generator",
    "make_data_free_step",
    "record_batchnorm",
]

PyTree = Any

# The key of the generator's arrays in ``DistillState.model_state``.
GENERATOR = "generator"

_WEIGHTS = ("bn_weight", "one_hot_weight", "activation_weight",
            "entropy_weight", "adversarial_weight")


@dataclasses.dataclass(frozen=True, eq=False)
class DataFreeDistillation:
  """Data-free distillation: what is generated, judged and distilled, and how.

  Attributes:
    student: The student :class:`jaxkd.models.Model`.
    teacher: The frozen teachers (a ``TeacherGroup``); a linen model with
      BatchNorm layers for the DeepInversion term.
    generator: A linen module, ``__call__(noise, train)`` mapping
      ``[B, noise_dim]`` to images ``[B, *image_shape]``; see
      :class:`Generator`.
    student_optimizer: Optax transformation of the student.
    generator_optimizer: Optax transformation of the generator.
    noise_dim: Size ``D`` of the noise vectors.
    batch_size: Generated images per step.
    temperature: Of the student's ``kd_loss``.
    bn_weight: :math:`w_{bn}` (DeepInversion feature statistics).
    one_hot_weight: :math:`w_{oh}` (DAFL).
    activation_weight: :math:`w_a` (DAFL).
    entropy_weight: :math:`w_{ie}` (DAFL).
    adversarial_weight: :math:`w_{adv}` (DFAD); 0 turns it off.
    activation_feature: The teacher feature of DAFL's activation loss (the
      features before the classifier).

  Every weight and the temperature may be a float or a ``jaxkd.schedules``
  schedule of the step.

  Example::

    dfd = DataFreeDistillation(
        student, group, Generator(image_shape=(32, 32, 3)),
        optax.adam(1e-3), optax.adam(1e-3), noise_dim=128, batch_size=256)
    state = dfd.init(jax.random.key(0), teacher_variables, (32, 32, 3))
    step = make_data_free_step(dfd)
    for _ in range(num_steps):
      state, metrics = step(state)

  .. versionadded:: 0.1.0
  """

  student: Model
  teacher: teachers_lib.TeacherGroup
  generator: nn.Module
  student_optimizer: optax.GradientTransformation
  generator_optimizer: optax.GradientTransformation
  _: dataclasses.KW_ONLY
  noise_dim: int
  batch_size: int
  temperature: objective.ScheduleOrValue = 1.0
  bn_weight: objective.ScheduleOrValue = 1.0
  one_hot_weight: objective.ScheduleOrValue = 1.0
  activation_weight: objective.ScheduleOrValue = 0.1
  entropy_weight: objective.ScheduleOrValue = 5.0
  adversarial_weight: objective.ScheduleOrValue = 0.0
  activation_feature: str = "embedding"

  def __post_init__(self):
    for name in ("noise_dim", "batch_size"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    for name in _WEIGHTS:
      objective.check_hyperparameter(
          "DataFreeDistillation", name, getattr(self, name), "weight"
      )
    if not isinstance(self.teacher, teachers_lib.TeacherGroup):
      raise TypeError(
          "`teacher` must be a jaxkd.teachers.TeacherGroup, got"
          f" {type(self.teacher).__name__}."
      )
    # The student's half: the engine's own distillation, fed the generated
    # images and the teachers' logits as a cached batch.
    object.__setattr__(self, "distillation", train_step.Distillation(
        student=self.student,
        objective=[objective.LogitTerm(
            losses.kd_loss, temperature=self.temperature, name="kd")],
        optimizer=self.student_optimizer,
        teachers=(self.teacher,),
    ))

  def _uses(self, weight) -> bool:
    """Whether a term is on (a schedule always is)."""
    return not (isinstance(weight, (int, float)) and weight == 0)

  # -- The teachers, with their BatchNorm layers -----------------------------

  def teacher_forward(
      self, variables: teachers_lib.TeacherVariables, images: jax.Array
  ) -> tuple[jax.Array, jax.Array | None, jax.Array, int]:
    """Runs the K teachers on ``images``, differentiably in the images.

    Returns:
      ``(logits [K, B, C], activation feature [K, ...] or None,
      BN-statistics loss [K], number of BatchNorm layers)``.
    """
    model = self.teacher.model
    counts = []
    need_feature = self._uses(self.activation_weight)

    def one_teacher(params, state, x):
      (logits, features, _), records = record_batchnorm(
          model.apply, params, state, x, train=False, rng=None
      )
      if self._uses(self.bn_weight) and not records:
        raise ValueError(
            f"No BatchNorm layer was seen in the teacher {model.name!r}:"
            " the DeepInversion term needs a flax.linen teacher (wrapped by"
            " `from_linen`) with nn.BatchNorm layers. Pass `bn_weight=0` to"
            " go without it."
        )
      counts.append(len(records))
      feature = None
      if need_feature:
        if self.activation_feature not in features:
          raise ValueError(
              f"`activation_feature` is {self.activation_feature!r}, but the"
              f" teacher produces {sorted(features)}."
          )
        feature = features[self.activation_feature]
      return logits, feature, batchnorm_statistics_sum(records)

    # The teachers are constants: no gradient reaches their variables, only
    # the images are differentiated.
    params = jax.lax.stop_gradient(variables.params)
    state = jax.lax.stop_gradient(variables.state)
    strategy = teachers_lib.resolve_strategy(self.teacher.strategy)
    if strategy == "vmap":
      out = jax.vmap(one_teacher, in_axes=(0, 0, None))(params, state, images)
    elif strategy == "scan":
      _, out = jax.lax.scan(
          lambda carry, ps: (carry, one_teacher(ps[0], ps[1], images)),
          None, (params, state),
      )
    else:
      k = teachers_lib.num_stacked(params, name=f"{self.teacher.name}.params")
      take = lambda tree, i: jax.tree.map(lambda leaf: leaf[i], tree)
      outs = [one_teacher(take(params, i), take(state, i), images)
              for i in range(k)]
      out = jax.tree.map(lambda *leaves: jnp.stack(leaves), *outs)
    logits, feature, bn_loss = out
    return logits, feature, bn_loss, counts[-1]

  # -- Losses ----------------------------------------------------------------

  def _generator_loss(self, generator_params, state, noise, student_key):
    generator_state = state.model_state[GENERATOR]["state"]
    images, new_generator_state = self.generator.apply(
        {"params": generator_params, **generator_state},
        noise, train=True, mutable=list(generator_state),
    )
    logits, feature, bn_loss, num_layers = self.teacher_forward(
        state.teachers[0], images
    )
    logits = logits.astype(jnp.float32)
    step = state.step
    w = lambda value: objective.resolve(value, step)
    parts = {
        "bn_statistics": jnp.mean(bn_loss),
        "one_hot": jnp.mean(jax.vmap(losses.dafl_one_hot_loss)(logits)),
        "information_entropy": jnp.mean(
            jax.vmap(losses.dafl_information_entropy_loss)(logits)
        ),
    }
    total = (
        w(self.bn_weight) * parts["bn_statistics"]
        + w(self.one_hot_weight) * parts["one_hot"]
        + w(self.entropy_weight) * parts["information_entropy"]
    )
    if feature is not None:
      parts["activation"] = jnp.mean(
          jax.vmap(losses.dafl_activation_loss)(feature)
      )
      total = total + w(self.activation_weight) * parts["activation"]
    if self._uses(self.adversarial_weight):
      # DFAD: the generator seeks images where the (fixed) student and the
      # teachers disagree most, in mean absolute logit difference.
      student_logits, _, _ = self.student.apply(
          jax.lax.stop_gradient(state.student_params), state.student_state,
          images, train=True, rng=student_key,
      )
      discrepancy = jnp.mean(jnp.abs(
          student_logits.astype(jnp.float32) - jnp.mean(logits, axis=0)
      ))
      parts["discrepancy"] = discrepancy
      total = total - w(self.adversarial_weight) * discrepancy
    aux = (images, dict(new_generator_state), logits, parts, num_layers)
    return total, aux

  # -- The step --------------------------------------------------------------

  def _step(self, state: DistillState) -> tuple[DistillState, dict]:
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    # The engine's step draws from `key` itself; the generator's side from
    # keys folded apart from it.
    noise_key, adversary_key = jax.random.split(jax.random.fold_in(key, 2))
    noise = jax.random.normal(
        noise_key, (self.batch_size, self.noise_dim), jnp.float32
    )
    generator = state.model_state[GENERATOR]
    (generator_loss, aux), generator_grads = jax.value_and_grad(
        self._generator_loss, has_aux=True
    )(generator["params"], state, noise, adversary_key)
    images, generator_state, teacher_logits, parts, num_layers = aux
    # Optax's adam family mixes dtypes in its bias correction.
    with jax.numpy_dtype_promotion("standard"):
      updates, generator_opt_state = self.generator_optimizer.update(
          generator_grads, generator["opt_state"], generator["params"]
      )
      generator_params = optax.apply_updates(generator["params"], updates)
    # The student learns on the same images, as constants: no gradient of
    # its loss reaches the generator; the teachers' logits are reused.
    batch = {
        "image": jax.lax.stop_gradient(images),
        "teacher_logits": jax.lax.stop_gradient(teacher_logits),
    }
    # pylint: disable-next=protected-access
    state, metrics = self.distillation._train_step(state, batch)
    model_state = dict(state.model_state)
    model_state[GENERATOR] = {
        "params": generator_params,
        "state": generator_state,
        "opt_state": generator_opt_state,
    }
    metrics = {
        **metrics,
        "generator_loss": generator_loss,
        "bn_layers": jnp.asarray(num_layers, jnp.int32),
        **{f"generator/{name}": value for name, value in parts.items()},
        **_teacher_view(teacher_logits),
    }
    return state.replace(model_state=model_state), metrics

  # -- Initialisation and generation ----------------------------------------

  def init(
      self,
      key: jax.Array,
      teacher_variables: teachers_lib.TeacherVariables,
      sample_image_shape: Sequence[int],
  ) -> DistillState:
    """Builds the first state and checks the whole step on abstract values.

    Args:
      key: PRNG key of the generator's and the student's initialisation and
        of every step's noise.
      teacher_variables: The teacher group's stacked variables.
      sample_image_shape: The shape of one image, ``(H, W, C)`` for NHWC
        models (without the batch axis).

    Returns:
      The initial :class:`jaxkd.DistillState`, the generator in
      ``model_state["generator"]``.

    Raises:
      ValueError: When the generator's images do not have
        ``sample_image_shape``, the teachers and the student disagree on the
        number of classes, or the teacher has no BatchNorm layer (with
        ``bn_weight > 0``).
    """
    if not isinstance(teacher_variables, teachers_lib.TeacherVariables):
      raise TypeError(
          "`teacher_variables` must be a TeacherVariables, got"
          f" {type(teacher_variables).__name__}."
      )
    image_shape = tuple(int(d) for d in sample_image_shape)
    generator_key, student_key = jax.random.split(key)
    noise = jnp.zeros((self.batch_size, self.noise_dim), jnp.float32)
    variables = dict(self.generator.init(generator_key, noise, train=False))
    generator_params = variables.pop("params")
    generated = jax.eval_shape(
        lambda v: self.generator.apply(v, noise, train=False),
        {"params": generator_params, **variables},
    )
    expected = (self.batch_size,) + image_shape
    if tuple(generated.shape) != expected:
      raise ValueError(
          f"The generator makes images of shape {tuple(generated.shape)}, but"
          f" `sample_image_shape` asks for {expected} (batch first)."
      )
    sample = {"image": jnp.zeros(expected, jnp.float32)}
    state = self.distillation.initial_state(
        student_key, sample, (teacher_variables,), None
    )
    model_state = dict(state.model_state)
    model_state[GENERATOR] = {
        "params": generator_params,
        "state": variables,
        "opt_state": self.generator_optimizer.init(generator_params),
    }
    state = state.replace(model_state=model_state)
    # Trace one step abstractly: errors surface now, not at step 1.
    jax.eval_shape(self._step, state)
    return state

  def generate(
      self, state: DistillState, noise: jax.Array, *, train: bool = False
  ) -> jax.Array:
    """Images of the current generator for ``noise`` ``[N, noise_dim]``.

    ``train=True`` normalises with the batch's statistics (as in training)
    without updating the state; ``False`` uses the running statistics.
    """
    generator = state.model_state[GENERATOR]
    variables = {"params": generator["params"], **generator["state"]}
    if train and generator["state"]:
      images, _ = self.generator.apply(
          variables, noise, train=True, mutable=list(generator["state"])
      )
      return images
    return self.generator.apply(variables, noise, train=train)


def _teacher_view(teacher_logits: jax.Array) -> dict[str, jax.Array]:
  """How the teachers see a generated batch (``[K, B, C]`` logits).

  * ``teacher/class_balance``: the entropy of the batch's mean ensemble
    distribution over the classes divided by :math:`\\log C` (1: the batch
    is spread evenly over the classes, 0: one class only), what DAFL's
    information-entropy term pushes up;
  * ``teacher/classes_seen``: how many classes are some image's argmax;
  * ``teacher/confidence``: the mean of the ensemble's top probability.
  """
  log_ensemble = losses.ensemble_log_soft_targets(
      teacher_logits.astype(jnp.float32))
  num_classes = log_ensemble.shape[-1]
  log_mean = jax.nn.logsumexp(log_ensemble, axis=0) - jnp.log(
      log_ensemble.shape[0])
  entropy = -jnp.sum(jnp.exp(log_mean) * log_mean)
  counts = jnp.sum(
      jax.nn.one_hot(jnp.argmax(log_ensemble, -1), num_classes), axis=0)
  return {
      "teacher/class_balance": entropy / jnp.log(num_classes),
      "teacher/classes_seen": jnp.sum(counts > 0).astype(jnp.int32),
      "teacher/confidence": jnp.mean(jnp.exp(jnp.max(log_ensemble, -1))),
  }


def make_data_free_step(
    distillation: DataFreeDistillation, *, donate: bool = True
) -> Callable[[DistillState], tuple[DistillState, dict]]:
  """The jitted step ``state -> (state, metrics)``; it takes no data.

  Metrics: the engine's (``loss``, ``loss/kd``, ``teacher_agreement``,
  ``grad_norm``, ``nonfinite``) for the student, and ``generator_loss`` and
  its parts (``generator/bn_statistics``, ``generator/one_hot``,
  ``generator/information_entropy``, ``generator/activation``,
  ``generator/discrepancy``), ``bn_layers`` (the number of teacher
  BatchNorm layers in the DeepInversion sum) and the teachers' view of the
  batch (``teacher/class_balance``, ``teacher/classes_seen``,
  ``teacher/confidence``), all measured on the step's generated images
  before the updates; ``teacher_agreement`` is the student's agreement with
  the teachers on them. The state is donated unless
  ``donate=False``.
  """
  return jax.jit(
      distillation._step,  # pylint: disable=protected-access
      donate_argnums=(0,) if donate else (),
  )
