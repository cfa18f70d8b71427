"""One compiled distillation step: teachers, student, losses and update.

:func:`make_train_step` returns a jitted pure function
``(state, batch) -> (state, metrics)`` in which every teacher's forward pass,
the student's forward and backward pass, every objective term and the Optax
update form one XLA program. Same-architecture teachers are stacked and run by
the strategy of their :class:`jaxkd.teachers.TeacherGroup`.

A batch is a dict with ``"image"`` ``[B, ...]`` and ``"label"`` ``[B]``
(integer) or ``[B, C]`` (soft), and optionally:

* ``"teacher_logits"`` ``[K, B, C]`` (or ``[B, C]``): cached teacher outputs
  for offline distillation; the teachers are then not run;
* ``"teacher_topk_logits"`` and ``"teacher_topk_indices"`` ``[K, B, k]``:
  cached top-k teacher logits; the other classes are ``-inf`` (the losses
  treat them exactly, as classes of probability zero);
* ``"mask"`` ``[B]`` (evaluation only): which examples count.

Language models use the same step. With ``Distillation(inputs="tokens",
input_mask="mask")`` a batch is ``{"tokens": [B, L], "mask": [B, L]}``; the
student and the teachers get ``{"tokens": ..., "mask": ...}`` (the model
contract's ``x``) and produce logits ``[B, L, V]`` (``[K, B, L, V]`` for
the teachers). Token terms (``jaxkd.methods.lm``) score next-token
predictions and are normalised by the number of valid tokens of the whole
batch: with ``accumulation_steps > 1`` the count is taken over the full
batch before it is split, so micro-batches of different token counts add up
to exactly the unaccumulated loss and gradient. Cached teacher entries for
token batches are ``"teacher_logits"`` ``[K, B, L, V]`` or
``"teacher_topk_log_probs"`` and ``"teacher_topk_indices"`` ``[B, L, k]``
(read by ``jaxkd.methods.lm.SparseTeacherTerm``). The teachers' forward pass
runs under ``jax.checkpoint`` with ``nothing_saveable`` (``teacher_remat``):
besides their outputs, nothing of it is kept for the backward pass.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from jaxkd import _step
from jaxkd import objective as objective_lib
from jaxkd import teachers as teachers_lib
from jaxkd.models import Model
from jaxkd import state as state_lib
from jaxkd._offline import cache_teacher_outputs
from jaxkd._offline import cached_teacher_logits
from jaxkd._offline import expand_top_k
from jaxkd._offline import has_cached_teacher
from jaxkd._views import Views
from jaxkd._views import make_views
from jaxkd.state import DistillState

__all__ = [
    "Distillation",
    "NONFINITE_POLICIES",
    "Views",
    "cache_teacher_outputs",
    "expand_top_k",
    "make_train_step",
    "make_views",
]

PyTree = Any
Batch = Mapping[str, jax.Array]

NONFINITE_POLICIES = ("skip", "apply")


@dataclasses.dataclass(frozen=True, eq=False)
class Distillation:
  """What is distilled into what, and how: the static half of a run.

  Attributes:
    student: The student :class:`jaxkd.models.Model`.
    objective: The terms of the loss (``jaxkd.objective``).
    optimizer: An Optax transformation for the student and the terms'
      adaptors.
    teachers: Teacher groups (``jaxkd.teachers.TeacherGroup``); their arrays
      live in ``DistillState.teachers``.
    views: How inputs are made inside the step.
    accumulation_steps: Gradients of this many micro-batches are averaged
      before one update (the batch is split along its first axis).
    nonfinite: ``"skip"`` leaves the state unchanged (but for the step
      counter) when the loss or a gradient is not finite, ``"apply"``
      applies the update anyway. Either way ``metrics["nonfinite"]`` is 1.
      A bad batch (``jaxkd.batch_checks``: labels out of range, NaN inputs
      or cached teacher outputs) never updates the state; it sets
      ``metrics["bad_batch"]`` and ``metrics["bad/<field>"]``.
    inputs: The batch key of the models' input: ``"image"`` (the default)
      or, for language models, ``"tokens"`` (``[B, L]`` integers).
    input_mask: Optional batch key of a boolean ``[B, L]`` mask given to
      the models with the tokens, as ``{"tokens": ..., "mask": ...}``; it is
      also the mask of the token evaluation.
    teacher_remat: Whether the teachers' forward pass runs under
      ``jax.checkpoint(policy=nothing_saveable)``; ``None`` means yes for
      inputs other than ``"image"``.
  """

  student: Model
  objective: Sequence[objective_lib.Term]
  optimizer: optax.GradientTransformation
  teachers: Sequence[teachers_lib.TeacherGroup] = ()
  views: Views = Views()
  accumulation_steps: int = 1
  nonfinite: str = "skip"
  inputs: str = "image"
  input_mask: str | None = None
  teacher_remat: bool | None = None

  def __post_init__(self):
    object.__setattr__(self, "objective", tuple(self.objective))
    object.__setattr__(self, "teachers", tuple(self.teachers))
    objective_lib.check_unique_names(self.objective)
    if not self.objective:
      raise ValueError("`objective` needs at least one term.")
    if self.nonfinite not in NONFINITE_POLICIES:
      raise ValueError(
          f"`nonfinite` must be one of {NONFINITE_POLICIES}, got"
          f" {self.nonfinite!r}."
      )
    if int(self.accumulation_steps) < 1:
      raise ValueError(
          "`accumulation_steps` must be >= 1, got"
          f" {self.accumulation_steps}."
      )

  @property
  def needs_teachers(self) -> bool:
    return any(term.needs_teacher for term in self.objective)

  @property
  def token_inputs(self) -> bool:
    """Whether the models read tokens (``inputs`` is not ``"image"``)."""
    return self.inputs != "image"

  def model_input(self, batch: Batch) -> Any:
    """What the student and the teachers are applied to."""
    x = jnp.asarray(batch[self.inputs])
    if self.input_mask is None:
      return x
    return {
        "tokens": x,
        "mask": jnp.asarray(batch[self.input_mask]).astype(jnp.bool_),
    }

  def token_normalizers(self, batch: Batch, steps: int) -> dict | None:
    """``max(1, count) / steps`` per token term, over the whole batch."""
    out = {}
    for term in self.objective:
      count = term.token_count(batch)
      if count is not None:
        count = jnp.asarray(count, jnp.float32)
        out[term.name] = jnp.maximum(count, 1.0) / steps
    return out or None

  # -- Forward passes ------------------------------------------------------

  def teacher_outputs(
      self,
      state: DistillState,
      images: jax.Array,
      batch: Batch,
      num_classes: int,
  ) -> tuple[jax.Array | None, Mapping[str, jax.Array]]:
    """Teacher logits ``[K, B, C]`` and features, cached or computed."""
    cached = cached_teacher_logits(batch, num_classes)
    if cached is not None:
      return cached, {}
    if not self.teachers:
      return None, {}
    run = lambda variables, x: teachers_lib.apply_teacher_groups(
        self.teachers, variables, x
    )
    remat = self.token_inputs if self.teacher_remat is None else (
        self.teacher_remat)
    if remat:
      # The teachers get no gradient, so none of their activations is a
      # residual of the backward pass anyway; the checkpoint makes it a
      # guarantee (tests/test_lm_engine.py inspects the saved residuals).
      run = jax.checkpoint(
          run, policy=jax.checkpoint_policies.nothing_saveable
      )
    out = run(state.teachers, images)
    features = out.features
    if len(self.teachers) == 1:
      # One group: features go by their plain names ("stage2"); with several
      # groups they are "{group name}/{feature}".
      prefix = f"{self.teachers[0].name}/"
      features = {k.removeprefix(prefix): v for k, v in features.items()}
    return out.logits, features

  def _outputs(self, params, state, batch, *, key, train):
    """Student and teacher outputs of a (micro-)batch."""
    view_key, dropout_key = jax.random.split(key)
    images = self.model_input(batch)
    labels = batch.get("label")
    if train:
      student_images, teacher_images, labels_for = make_views(
          self.views, images, labels, view_key
      )
    else:
      student_images = teacher_images = images
      labels_for = lambda num_classes: labels
    logits, features, new_student_state = self.student.apply(
        params["student"],
        state.model_state["student"],
        student_images,
        train=train,
        rng=dropout_key if train else None,
    )
    num_classes = logits.shape[-1]
    labels = labels_for(num_classes)
    teacher_logits, teacher_features = (
        self.teacher_outputs(state, teacher_images, batch, num_classes)
        if self.needs_teachers or not train
        else (None, {})
    )
    outputs = objective_lib.StepOutputs(
        student_logits=logits,
        student_features=features,
        teacher_logits=teacher_logits,
        teacher_features=teacher_features,
        labels=labels,
        step=state.step,
        hparams=state.hparams,
        train=train,
        batch=dict(batch) if self.token_inputs else {},
    )
    return outputs, new_student_state

  def objective_value(
      self, params, state, batch, *, key, train=True, normalizers=None
  ):
    """The weighted loss, the new model state and per-term metrics.

    ``normalizers`` (``{term name: divisor}``, see
    :meth:`token_normalizers`) replaces a token term's own
    ``max(1, count)``: a micro-batch is then scored against the token count
    of the whole batch.
    """
    outputs, new_student_state = self._outputs(
        params, state, batch, key=key, train=train
    )
    total = jnp.zeros((), jnp.float32)
    term_states = {}
    metrics = {}
    valid = jnp.ones((), jnp.bool_)
    for term in self.objective:
      term_args = (
          params["terms"][term.name],
          state.model_state["terms"][term.name],
          outputs,
      )
      if normalizers is not None and term.name in normalizers:
        (term_sum, _), term_states[term.name] = term.loss_sum(*term_args)
        value = term_sum / normalizers[term.name]
      else:
        value, term_states[term.name] = term.loss(*term_args)
      weight = outputs.resolve(term.weight)
      total = total + weight * value
      metrics[f"loss/{term.name}"] = value
      # An invalid traced weight or temperature is named in the metrics and
      # makes the loss NaN.
      for name, invalid in term.invalid_hyperparameters(outputs).items():
        metrics[f"invalid/{term.name}.{name}"] = invalid.astype(jnp.int32)
        valid = valid & jnp.logical_not(invalid)
    total = jnp.where(valid, total, jnp.nan)
    new_model_state = {
        **state.model_state,
        "student": new_student_state,
        "terms": term_states,
    }
    return total, (new_model_state, metrics, outputs)

  # -- Initialisation ------------------------------------------------------

  def init(
      self,
      key: jax.Array,
      sample_batch: Batch,
      teacher_variables: Sequence[Any] = (),
      *,
      hparams: Mapping[str, float] | None = None,
  ) -> DistillState:
    """Builds the first state, checking the whole objective on the way.

    Everything that can be wrong with the models, the feature names and the
    shapes is found here, before any step runs: the step is traced once on
    abstract values of ``sample_batch``.

    Args:
      key: PRNG key of the student's and the terms' initialisation and of
        every step's randomness.
      sample_batch: A batch of the shapes training will use.
      teacher_variables: One ``TeacherVariables`` per teacher group.
      hparams: Values of the objective's ``Hyper`` placeholders.

    Returns:
      The initial :class:`DistillState`.
    """
    teacher_variables = tuple(teacher_variables)
    if len(teacher_variables) != len(self.teachers):
      raise ValueError(
          f"Got {len(teacher_variables)} teacher variable sets for"
          f" {len(self.teachers)} teacher groups."
      )
    if self.needs_teachers and not self.teachers and not has_cached_teacher(
        sample_batch
    ):
      raise ValueError(
          "The objective has teacher terms but no teachers were given and"
          " the batch has no cached `teacher_logits`."
      )
    state = self.initial_state(key, sample_batch, teacher_variables, hparams)
    # Trace one step abstractly: shape errors surface now, not at step 1.
    jax.eval_shape(self._train_step, state, dict(sample_batch))
    return state

  def initial_state(
      self,
      key: jax.Array,
      sample_batch: Batch,
      teacher_variables: Sequence[Any],
      hparams: Mapping[str, float] | None,
  ) -> DistillState:
    """:meth:`init` without the validating trace of a whole step."""
    student_key, terms_key, rng_key = jax.random.split(key, 3)
    images = self.model_input(sample_batch)
    student_params, student_state = self.student.init(student_key, images)
    state = DistillState(
        step=jnp.zeros((), jnp.int32),
        params={"student": student_params, "terms": {}},
        model_state={"student": student_state, "terms": {}},
        opt_state=None,
        rng=jax.random.key_data(rng_key),
        teachers=state_lib.own_copy(tuple(teacher_variables)),
        hparams={
            name: jnp.asarray(value, jnp.float32)
            for name, value in (hparams or {}).items()
        },
    )
    # Term parameters depend on output shapes only: build them from zeros
    # of the abstract outputs (nothing is computed).
    abstract = jax.eval_shape(
        lambda s, b: self._outputs(
            s.params, s, b, key=jax.random.key(0), train=False
        )[0],
        state,
        dict(sample_batch),
    )
    self._check_classes(abstract)
    outputs = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract)
    term_params, term_states = {}, {}
    for term, term_key in zip(
        self.objective, jax.random.split(terms_key, len(self.objective))
    ):
      term_params[term.name], term_states[term.name] = term.init(
          term_key, outputs
      )
    params = {"student": student_params, "terms": term_params}
    return state.replace(
        params=params,
        model_state={"student": student_state, "terms": term_states},
        opt_state=self.optimizer.init(params),
    )

  def _check_classes(self, outputs: objective_lib.StepOutputs) -> None:
    if outputs.teacher_logits is None:
      return
    student_classes = outputs.student_logits.shape[-1]
    teacher_classes = outputs.teacher_logits.shape[-1]
    if student_classes != teacher_classes:
      raise ValueError(
          f"The teachers produce {teacher_classes} classes but the student"
          f" {self.student.name!r} produces {student_classes}."
      )

  # -- The step (jaxkd._step) ---------------------------------------------

  def _grads(self, state, batch, key):
    return _step.loss_and_grads(self, state, batch, key)

  def _train_step(self, state: DistillState, batch: Batch):
    return _step.train_step(self, state, batch)

  def token_mask(self, batch: Batch) -> jax.Array | None:
    """The batch's token mask as booleans (``None`` if it has none)."""
    key = self.input_mask or "mask"
    return None if key not in batch else jnp.asarray(batch[key]).astype(
        jnp.bool_)


def make_train_step(
    distillation: Distillation,
    *,
    donate: bool = True,
    state_shardings: DistillState | None = None,
) -> Callable[[DistillState, Batch], tuple[DistillState, dict]]:
  """The jitted pure step ``(state, batch) -> (state, metrics)``.

  The state is donated (its buffers are reused for the new state) unless
  ``donate=False``. Randomness of step ``s`` comes from
  ``fold_in(state.rng, s)``.

  On a placed state and batch (``jaxkd.sharding``) the compiler follows
  their shardings. ``state_shardings`` (from
  ``jaxkd.sharding.state_shardings``) also pins the new state's layout, so
  that it cannot drift from step to step and a checkpoint restored with the
  same shardings continues unchanged; the metrics are left to the compiler.
  """
  return jax.jit(
      distillation._train_step,  # pylint: disable=protected-access
      donate_argnums=(0,) if donate else (),
      out_shardings=None if state_shardings is None else (
          state_shardings, None),
  )
