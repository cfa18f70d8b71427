"""The registry of distillation methods an experiment config can name.

Each method turns its sub-config (``config.<method>``, defaults in
``experiments/configs/common.py``) into the pieces of a
``jaxkd.Distillation``: objective terms and input views, plus what it needs
of the teachers. ``data_free`` is the exception: it runs its own step
(``jaxkd.data_free``), which ``experiments/train.py`` drives.

==================  =========================================================
name                objective
==================  =========================================================
baseline            cross-entropy with the labels only (no teacher)
kd                  Hinton et al. 2015: (1 - alpha) CE + alpha T^2 KL
dkd                 Zhao et al. 2022: CE + warm-up * DKD(alpha, beta, T)
fitnets             Romero et al. 2015: CE + weight * hint MSE (adaptor)
at                  Zagoruyko & Komodakis 2017: CE + attention transfer
sp                  Tung & Mori 2019: CE + similarity preserving
rkd                 Park et al. 2019: CE + RKD distance + angle
pkt                 Passalis & Tefas 2018: CE + probabilistic transfer
crd                 Tian et al. 2020: CE + contrastive (queue of negatives)
multi_teacher       KD towards the ensemble of K teachers
perturbation        KD with Gaussian noise on the teacher's input
adversarial         KD + a discriminator of soft targets (KDGAN-style)
data_free           DAFL / DeepInversion: a generator replaces the data
self_distillation   teacher-free (virtual teacher) or born-again KD
==================  =========================================================

A *variant* ``<method>:<variant>`` is the method with some of its settings
changed: ``config.variants.<method>.<variant>`` holds the fields that differ
from ``config.<method>`` (e.g. ``data_free:deep_inversion`` with the
DeepInversion weight on), so one run can compare settings of one method.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import ml_collections
import optax

from jaxkd.methods import adversarial
from jaxkd import losses
from jaxkd import objective
from jaxkd.train_step import Views


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a method contributes to a run.

  Attributes:
    objective: The terms of the loss (empty for ``data_free``).
    views: Input views inside the step (the teacher's noise for
      ``perturbation``); the student's random translation is added by the
      trainer.
    num_teachers: How many teachers of the group the method uses (0: none).
    logits_only: The teachers' logits suffice (no features, no teacher
      view): cached teacher logits give the same step.
    teacher_is_student: The teacher has the student's architecture
      (born-again).
    data_free: Driven by ``jaxkd.data_free`` instead of the train step.
    settings: The method's resolved sub-config (variant applied).
  """

  objective: tuple[objective.Term, ...]
  views: Views = Views()
  num_teachers: int = 1
  logits_only: bool = True
  teacher_is_student: bool = False
  data_free: bool = False
  settings: Any = None


@dataclasses.dataclass(frozen=True)
class BuildContext:
  """What a method's builder may read besides its own sub-config."""

  steps_per_epoch: int
  temperature: Any = None  # overrides the sub-config's (a sweep's Hyper)


Builder = Callable[[ml_collections.ConfigDict, BuildContext], Plan]


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  summary: str
  build: Builder
  needs_teacher: bool = True


def _temperature(cfg, ctx: BuildContext):
  return cfg.temperature if ctx.temperature is None else ctx.temperature


def _kd_terms(alpha: float, temperature) -> tuple[objective.Term, ...]:
  return (
      objective.LabelTerm(weight=1.0 - alpha),
      objective.LogitTerm(loss_fn=losses.kd_loss, temperature=temperature,
                          weight=alpha),
  )


def _baseline(cfg, ctx):
  del cfg, ctx
  return Plan(objective=(objective.LabelTerm(),), num_teachers=0)


def _kd(cfg, ctx):
  return Plan(objective=_kd_terms(cfg.alpha, _temperature(cfg, ctx)))


def _dkd(cfg, ctx):
  warmup_steps = int(cfg.warmup_epochs * ctx.steps_per_epoch)
  weight = (
      optax.linear_schedule(0.0, 1.0, warmup_steps) if warmup_steps > 0
      else 1.0
  )
  return Plan(objective=(
      objective.LabelTerm(weight=cfg.ce_weight),
      objective.LogitTerm(
          loss_fn=losses.dkd_loss, with_labels=True,
          temperature=_temperature(cfg, ctx), weight=weight,
          kwargs={"alpha": cfg.alpha, "beta": cfg.beta}, name="dkd"),
  ))


def _feature_plan(cfg, terms) -> Plan:
  return Plan(
      objective=(objective.LabelTerm(weight=cfg.ce_weight),) + tuple(terms),
      logits_only=False,
  )


def _fitnets(cfg, ctx):
  del ctx
  return _feature_plan(cfg, [objective.FeatureTerm(
      loss_fn=losses.hint_loss, student_feature=cfg.student_feature,
      teacher_feature=cfg.teacher_feature, adaptor="auto",
      weight=cfg.weight, name="hint")])


def _at(cfg, ctx):
  del ctx
  # RepDistiller: beta / 2 * sum over the feature pairs.
  return _feature_plan(cfg, [
      objective.FeatureTerm(
          loss_fn=losses.attention_transfer_loss, student_feature=name,
          teacher_feature=name, weight=cfg.weight / 2, kwargs={"p": cfg.p},
          name=f"at_{name}")
      for name in cfg.features
  ])


def _relational(loss_fn, name):
  def build(cfg, ctx):
    del ctx
    return _feature_plan(cfg, [objective.FeatureTerm(
        loss_fn=loss_fn, student_feature=cfg.student_feature,
        teacher_feature=cfg.teacher_feature, weight=cfg.weight, name=name)])
  return build


def _rkd(cfg, ctx):
  del ctx
  common = dict(student_feature=cfg.student_feature,
                teacher_feature=cfg.teacher_feature)
  return _feature_plan(cfg, [
      objective.FeatureTerm(loss_fn=losses.rkd_distance_loss,
                            weight=cfg.distance_weight, name="rkd_distance",
                            **common),
      objective.FeatureTerm(loss_fn=losses.rkd_angle_loss,
                            weight=cfg.angle_weight, name="rkd_angle",
                            **common),
  ])


def _crd(cfg, ctx):
  terms = [objective.CRDTerm(
      student_feature=cfg.student_feature,
      teacher_feature=cfg.teacher_feature, dim=cfg.dim,
      queue_size=cfg.queue_size, temperature=cfg.temperature,
      weight=cfg.weight)]
  if cfg.kd_weight > 0:
    temperature = (
        cfg.kd_temperature if ctx.temperature is None else ctx.temperature
    )
    terms.append(objective.LogitTerm(temperature=temperature,
                                     weight=cfg.kd_weight))
  return _feature_plan(cfg, terms)


def _multi_teacher(cfg, ctx):
  if cfg.num_teachers < 2:
    raise ValueError(
        "Method 'multi_teacher' needs `multi_teacher.num_teachers` >= 2, got"
        f" {cfg.num_teachers}."
    )
  alpha = cfg.alpha
  return Plan(
      objective=(
          objective.LabelTerm(weight=1.0 - alpha),
          objective.LogitTerm(temperature=_temperature(cfg, ctx),
                              weight=alpha, teacher_reduction=cfg.reduction),
      ),
      num_teachers=cfg.num_teachers,
  )


def _perturbation(cfg, ctx):
  noise = functools.partial(losses.perturb_inputs,
                            noise_scale=cfg.noise_scale)
  return Plan(
      objective=_kd_terms(cfg.alpha, _temperature(cfg, ctx)),
      views=Views(teacher=noise),
      logits_only=False,
  )


def _adversarial(cfg, ctx):
  term = adversarial.AdversarialTerm(
      discriminator=adversarial.Discriminator(
          hidden=tuple(cfg.discriminator_hidden)),
      optimizer=optax.adam(cfg.discriminator_learning_rate),
      temperature=_temperature(cfg, ctx), weight=cfg.weight)
  return Plan(objective=_kd_terms(cfg.alpha, _temperature(cfg, ctx))
              + (term,))


def _data_free(cfg, ctx):
  del ctx
  return Plan(objective=(), data_free=True, logits_only=False, settings=cfg)


_SELF_DISTILLATION_MODES = ("teacher_free", "born_again")


def _self_distillation(cfg, ctx):
  if cfg.mode not in _SELF_DISTILLATION_MODES:
    raise ValueError(
        "`self_distillation.mode` must be one of"
        f" {_SELF_DISTILLATION_MODES}, got {cfg.mode!r}."
    )
  if cfg.mode == "teacher_free":
    return Plan(
        objective=(
            objective.LabelTerm(weight=1.0 - cfg.alpha),
            objective.TeacherFreeTerm(
                loss_fn=losses.teacher_free_kd_loss, weight=cfg.alpha,
                kwargs={"correct_probability": cfg.correct_probability,
                        "temperature": _temperature(cfg, ctx)}),
        ),
        num_teachers=0,
    )
  return Plan(objective=_kd_terms(cfg.alpha, _temperature(cfg, ctx)),
              teacher_is_student=True)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("baseline", "cross-entropy with the labels only", _baseline,
           needs_teacher=False),
    Method("kd", "Hinton et al. 2015 soft targets", _kd),
    Method("dkd", "decoupled KD (Zhao et al. 2022)", _dkd),
    Method("fitnets", "FitNets hints (Romero et al. 2015)", _fitnets),
    Method("at", "attention transfer (Zagoruyko & Komodakis 2017)", _at),
    Method("sp", "similarity preserving (Tung & Mori 2019)",
           _relational(losses.similarity_preserving_loss, "sp")),
    Method("rkd", "relational KD (Park et al. 2019)", _rkd),
    Method("pkt", "probabilistic knowledge transfer (Passalis & Tefas 2018)",
           _relational(losses.pkt_loss, "pkt")),
    Method("crd", "contrastive representation distillation (Tian et al."
           " 2020)", _crd),
    Method("multi_teacher", "KD from an ensemble of teachers",
           _multi_teacher),
    Method("perturbation", "KD with a noisy teacher input", _perturbation),
    Method("adversarial", "KD + a discriminator of soft targets",
           _adversarial),
    Method("data_free", "generator-based data-free KD (DAFL/DeepInversion)",
           _data_free),
    Method("self_distillation", "teacher-free or born-again KD",
           _self_distillation),
)}

# Methods whose sub-config has a temperature a sweep can vary.
TEMPERATURE_METHODS = ("kd", "dkd", "multi_teacher", "perturbation",
                       "adversarial", "self_distillation", "crd")


def check_method(name: str,
                 config: ml_collections.ConfigDict | None = None) -> Method:
  """The registered method of ``name`` (``<method>`` or
  ``<method>:<variant>``), or a ValueError listing what is known."""
  base, _, variant = str(name).partition(":")
  if base not in METHODS:
    raise ValueError(
        f"Unknown method {base!r}. Known methods: {', '.join(METHODS)}."
    )
  if variant and config is not None:
    known = _variants(config, base)
    if variant not in known:
      raise ValueError(
          f"Unknown variant {variant!r} of method {base!r}: define"
          f" config.variants.{base}.{variant} (known variants:"
          f" {', '.join(known) or 'none'})."
      )
  return METHODS[base]


def _variants(config: ml_collections.ConfigDict, base: str) -> list[str]:
  variants = config.get("variants")
  if variants is None or base not in variants:
    return []
  return sorted(variants[base])


def method_config(config: ml_collections.ConfigDict,
                  name: str) -> ml_collections.ConfigDict | None:
  """``config.<method>`` with the fields of variant ``name`` applied."""
  check_method(name, config)
  base, _, variant = str(name).partition(":")
  if base not in config:
    return None
  if not variant:
    return config[base]
  merged = ml_collections.ConfigDict(config[base].to_dict())
  overrides = config.variants[base][variant]
  for key, value in overrides.items():
    if key not in merged:
      raise ValueError(
          f"config.variants.{base}.{variant}.{key}: {base!r} has no field"
          f" {key!r} (fields: {', '.join(sorted(merged))})."
      )
    merged[key] = value
  return merged


def needs_teacher(name: str, config: ml_collections.ConfigDict) -> bool:
  """Whether method ``name`` needs trained teachers under ``config``."""
  method = check_method(name, config)
  if method.name == "self_distillation":
    return method_config(config, name).mode == "born_again"
  return method.needs_teacher


def build(
    name: str,
    config: ml_collections.ConfigDict,
    *,
    steps_per_epoch: int,
    temperature: Any = None,
) -> Plan:
  """The :class:`Plan` of method ``name`` from its (variant's) sub-config."""
  method = check_method(name, config)
  return method.build(
      method_config(config, name),
      BuildContext(steps_per_epoch=steps_per_epoch, temperature=temperature))
