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
import math
from typing import Any, Callable, NamedTuple, Sequence

from flax import struct
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxkd import losses
from jaxkd import objective
from jaxkd import state as state_lib
from jaxkd import teachers as teachers_lib
from jaxkd.models._contract import Model

PyTree = Any

_OUTPUTS = ("sigmoid", "tanh", "linear")


class Generator(nn.Module):
  """A small DCGAN-style generator: noise ``[B, D]`` to images ``[B, H, W, C]``.

  Dense to a half-resolution map, BatchNorm, nearest-neighbour upsampling,
  3x3 convolution, BatchNorm, leaky ReLU, a 3x3 convolution to ``C``
  channels, and the output non-linearity. BatchNorm runs in float32.

  Attributes:
    image_shape: ``(H, W, C)`` of one image.
    width: Channels of the hidden maps.
    output: ``"sigmoid"`` (images in ``[0, 1]``), ``"tanh"`` (``[-1, 1]``)
      or ``"linear"``.
  """

  image_shape: Sequence[int]
  width: int = 64
  output: str = "sigmoid"

  @nn.compact
  def __call__(self, noise: jax.Array, train: bool) -> jax.Array:
    if self.output not in _OUTPUTS:
      raise ValueError(
          f"`output` must be one of {_OUTPUTS}, got {self.output!r}."
      )
    height, width, channels = self.image_shape
    batch = noise.shape[0]
    low_h, low_w = math.ceil(height / 2), math.ceil(width / 2)

    def bn(h):
      return nn.BatchNorm(use_running_average=not train, momentum=0.9)(h)

    h = nn.Dense(low_h * low_w * self.width)(noise.astype(jnp.float32))
    h = bn(h.reshape(batch, low_h, low_w, self.width))
    h = jax.image.resize(
        h, (batch, 2 * low_h, 2 * low_w, self.width), "nearest"
    )
    h = nn.leaky_relu(bn(nn.Conv(self.width, (3, 3))(h)), 0.2)
    h = nn.Conv(channels, (3, 3))(h)[:, :height, :width]
    if self.output == "sigmoid":
      return nn.sigmoid(h)
    if self.output == "tanh":
      return jnp.tanh(h)
    return h


# ---------------------------------------------------------------------------
# Recording the teacher's batch-normalisation layers.
# ---------------------------------------------------------------------------


class BatchNormRecord(NamedTuple):
  """One call of an ``nn.BatchNorm`` layer.

  Attributes:
    path: The module's path, e.g. ``"BatchNorm_0"`` or ``"stage1/bn"``.
    inputs: The array the layer normalised.
    mean: Its running mean (``batch_stats["mean"]``).
    var: Its running variance.
    axis: The feature axis of ``inputs``.
  """

  path: str
  inputs: jax.Array
  mean: jax.Array
  var: jax.Array
  axis: int


def record_batchnorm(
    fn: Callable[..., Any], *args, **kwargs
) -> tuple[Any, list[BatchNormRecord]]:
  """Calls ``fn(*args, **kwargs)``, recording every linen BatchNorm call.

  ``fn`` typically applies a linen module (``Model.apply`` of a model made
  by ``from_linen``). Calls of ``nn.BatchNorm`` are intercepted with
  ``flax.linen.intercept_methods``; their inputs are recorded as they were
  traced, so gradients flow through them.

  Args:
    fn: The function to run.
    *args: Its positional arguments.
    **kwargs: Its keyword arguments.

  Returns:
    ``(fn's result, records)``, one :class:`BatchNormRecord` per call, in
    call order.

  Raises:
    ValueError: For a BatchNorm normalising over several feature axes.
  """
  records = []

  def interceptor(next_fun, call_args, call_kwargs, context):
    out = next_fun(*call_args, **call_kwargs)
    module = context.module
    if isinstance(module, nn.BatchNorm) and context.method_name == "__call__":
      x = call_args[0] if call_args else call_kwargs["x"]
      axis = module.axis
      if isinstance(axis, (tuple, list)):
        if len(axis) != 1:
          raise ValueError(
              f"BatchNorm {'/'.join(module.path)!r} normalises over the"
              f" feature axes {axis}; only one feature axis is supported."
          )
        axis = axis[0]
      records.append(BatchNormRecord(
          path="/".join(str(p) for p in module.path),
          inputs=x,
          mean=module.get_variable("batch_stats", "mean"),
          var=module.get_variable("batch_stats", "var"),
          axis=int(axis),
      ))
    return out

  with nn.intercept_methods(interceptor):
    out = fn(*args, **kwargs)
  return out, records


def batchnorm_statistics_sum(records: Sequence[BatchNormRecord]) -> jax.Array:
  """DeepInversion's feature loss summed over recorded BatchNorm layers."""
  total = jnp.zeros((), jnp.float32)
  for record in records:
    total = total + losses.batchnorm_statistics_loss(
        record.inputs, record.mean, record.var, axis=record.axis
    ).astype(jnp.float32)
  return total


# ---------------------------------------------------------------------------
# State and specification.
# ---------------------------------------------------------------------------


class DataFreeState(struct.PyTreeNode):
  """Everything a data-free step reads and writes.

  Attributes:
    step: Number of steps taken (int32 scalar).
    generator_params: The generator's parameters.
    generator_state: Its other variable collections (BatchNorm statistics).
    generator_opt_state: The generator optimiser's state.
    student_params: The student's parameters.
    student_state: The student's mutable state.
    student_opt_state: The student optimiser's state.
    rng: PRNG key data; step ``s`` draws from ``fold_in(rng, s)``.
    teachers: The teacher group's ``TeacherVariables``; never optimised.
  """

  step: jax.Array
  generator_params: PyTree
  generator_state: PyTree
  generator_opt_state: PyTree
  student_params: PyTree
  student_state: PyTree
  student_opt_state: PyTree
  rng: jax.Array
  teachers: teachers_lib.TeacherVariables


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
    if isinstance(self.temperature, (int, float)) and self.temperature <= 0:
      raise ValueError(
          f"`temperature` must be > 0, got {self.temperature!r}."
      )
    for name in ("bn_weight", "one_hot_weight", "activation_weight",
                 "entropy_weight", "adversarial_weight"):
      value = getattr(self, name)
      if isinstance(value, (int, float)) and value < 0:
        raise ValueError(f"`{name}` must be >= 0, got {value!r}.")

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
    # pylint: disable-next=protected-access
    strategy = teachers_lib._resolve_strategy(self.teacher.strategy)
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

  def _teacher_target(self, teacher_logits, temperature):
    """``[B, C]`` logits whose softmax at ``temperature`` is the ensemble."""
    if teacher_logits.shape[0] == 1:
      return teacher_logits[0]
    return temperature * losses.ensemble_log_soft_targets(
        teacher_logits, temperature=temperature
    )

  def _generator_loss(self, generator_params, state, noise, student_key):
    images, new_generator_state = self.generator.apply(
        {"params": generator_params, **state.generator_state},
        noise, train=True, mutable=list(state.generator_state),
    )
    logits, feature, bn_loss, num_layers = self.teacher_forward(
        state.teachers, images
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

  def _student_loss(self, student_params, state, images, teacher_logits,
                    key):
    logits, _, new_student_state = self.student.apply(
        student_params, state.student_state, images, train=True, rng=key
    )
    logits = logits.astype(jnp.float32)
    temperature = objective.resolve(self.temperature, state.step)
    target = self._teacher_target(teacher_logits, temperature)
    loss = jnp.mean(losses.kd_loss(logits, target, temperature=temperature))
    # The plain KL to the teachers' ensemble at T = 1, for monitoring.
    kl = jnp.mean(losses.kl_divergence(
        logits, losses.ensemble_log_soft_targets(teacher_logits)
    ))
    return loss, (new_student_state, kl, logits)

  # -- The step --------------------------------------------------------------

  def _step(self, state: DataFreeState) -> tuple[DataFreeState, dict]:
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    noise_key, adversary_key, student_key = jax.random.split(key, 3)
    noise = jax.random.normal(
        noise_key, (self.batch_size, self.noise_dim), jnp.float32
    )
    (generator_loss, aux), generator_grads = jax.value_and_grad(
        self._generator_loss, has_aux=True
    )(state.generator_params, state, noise, adversary_key)
    images, generator_state, teacher_logits, parts, num_layers = aux
    # The student learns on the same images, as constants: no gradient of
    # its loss reaches the generator.
    images = jax.lax.stop_gradient(images)
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    (student_loss, (student_state, kl, student_logits)), student_grads = (
        jax.value_and_grad(self._student_loss, has_aux=True)(
            state.student_params, state, images, teacher_logits, student_key
        )
    )
    # Optax's adam family mixes dtypes in its bias correction.
    with jax.numpy_dtype_promotion("standard"):
      updates, generator_opt_state = self.generator_optimizer.update(
          generator_grads, state.generator_opt_state, state.generator_params
      )
      generator_params = optax.apply_updates(state.generator_params, updates)
      updates, student_opt_state = self.student_optimizer.update(
          student_grads, state.student_opt_state, state.student_params
      )
      student_params = optax.apply_updates(state.student_params, updates)
    ensemble = jnp.argmax(
        losses.ensemble_log_soft_targets(teacher_logits), axis=-1
    )
    metrics = {
        "generator_loss": generator_loss,
        "student_loss": student_loss,
        "student_kl": kl,
        "teacher_agreement": jnp.mean(
            (jnp.argmax(student_logits, axis=-1) == ensemble).astype(
                jnp.float32)
        ),
        "bn_layers": jnp.asarray(num_layers, jnp.int32),
        **{f"generator/{name}": value for name, value in parts.items()},
    }
    new_state = state.replace(
        step=state.step + 1,
        generator_params=generator_params,
        generator_state=generator_state,
        generator_opt_state=generator_opt_state,
        student_params=student_params,
        student_state=student_state,
        student_opt_state=student_opt_state,
    )
    return new_state, metrics

  # -- Initialisation and generation ----------------------------------------

  def init(
      self,
      key: jax.Array,
      teacher_variables: teachers_lib.TeacherVariables,
      sample_image_shape: Sequence[int],
  ) -> DataFreeState:
    """Builds the first state and checks the whole step on abstract values.

    Args:
      key: PRNG key of the generator's and the student's initialisation and
        of every step's noise.
      teacher_variables: The teacher group's stacked variables.
      sample_image_shape: The shape of one image, ``(H, W, C)`` for NHWC
        models (without the batch axis).

    Returns:
      The initial :class:`DataFreeState`.

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
    generator_key, student_key, rng_key = jax.random.split(key, 3)
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
    images = jnp.zeros(expected, jnp.float32)
    student_params, student_state = self.student.init(student_key, images)
    state = DataFreeState(
        step=jnp.zeros((), jnp.int32),
        generator_params=generator_params,
        generator_state=variables,
        generator_opt_state=self.generator_optimizer.init(generator_params),
        student_params=student_params,
        student_state=student_state,
        student_opt_state=self.student_optimizer.init(student_params),
        rng=jax.random.key_data(rng_key),
        teachers=state_lib.own_copy(teacher_variables),
    )
    student_logits = jax.eval_shape(
        lambda s: self.student.apply(
            s.student_params, s.student_state, images, train=False, rng=None
        )[0],
        state,
    )
    teacher_logits = jax.eval_shape(
        lambda v: teachers_lib.apply_teachers(self.teacher, v, images).logits,
        teacher_variables,
    )
    teachers_lib.check_same_classes(teacher_logits, student_logits)
    # Trace one step abstractly: errors surface now, not at step 1.
    jax.eval_shape(self._step, state)
    return state

  def generate(
      self, state: DataFreeState, noise: jax.Array, *, train: bool = False
  ) -> jax.Array:
    """Images of the current generator for ``noise`` ``[N, noise_dim]``.

    ``train=True`` normalises with the batch's statistics (as in training)
    without updating the state; ``False`` uses the running statistics.
    """
    variables = {"params": state.generator_params, **state.generator_state}
    if train and state.generator_state:
      images, _ = self.generator.apply(
          variables, noise, train=True, mutable=list(state.generator_state)
      )
      return images
    return self.generator.apply(variables, noise, train=train)


def make_data_free_step(
    distillation: DataFreeDistillation, *, donate: bool = True
) -> Callable[[DataFreeState], tuple[DataFreeState, dict]]:
  """The jitted step ``state -> (state, metrics)``; it takes no data.

  Metrics: ``generator_loss`` and its parts (``generator/bn_statistics``,
  ``generator/one_hot``, ``generator/information_entropy``,
  ``generator/activation``, ``generator/discrepancy``), ``bn_layers`` (the
  number of teacher BatchNorm layers in the DeepInversion sum),
  ``student_loss`` (the student's ``kd_loss``), ``student_kl`` (KL at
  ``T = 1`` from the teachers' ensemble to the student) and
  ``teacher_agreement``, all measured on the step's generated images before
  the updates. The state is donated unless ``donate=False``.
  """
  return jax.jit(
      distillation._step,  # pylint: disable=protected-access
      donate_argnums=(0,) if donate else (),
  )
