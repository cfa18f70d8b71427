"""What every experiment config shares: the argument parser and the defaults.

A config file defines ``get_config(arg=None)`` and returns an
``ml_collections.ConfigDict``. ``arg`` is the text after the colon in
``--config=experiments/configs/<name>.py:<arg>``: comma-separated flags and
``key=value`` pairs, e.g. ``runlocal`` or ``runlocal,seeds=2``
(:func:`parse_arg`, after big_vision's ``bvcc.parse_arg``). Every field of
the returned config can still be overridden on the command line
(``--config.num_epochs=10``); the config is locked, so a misspelt key is an
error, not a silently ignored setting.

:func:`base_config` holds every key a run reads, with defaults; a config
file changes the fields it needs. The hyper-parameters of each distillation
method live in a sub-config named after the method (``config.kd``,
``config.dkd``, ...; see ``experiments/methods.py``).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from jaxkd import data


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses ``"runlocal,seeds=2"`` into a ConfigDict over ``defaults``.

  A bare word sets a boolean default to ``True``; ``key=value`` converts the
  value to the type of the default. Unknown keys raise ``ValueError``
  listing the known ones.
  """
  result = ml_collections.ConfigDict(dict(defaults))
  if not arg:
    return result
  for part in arg.split(","):
    part = part.strip()
    if not part:
      continue
    key, sep, value = part.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(
          f"Unknown config argument {key!r} in {arg!r}; known:"
          f" {', '.join(sorted(defaults))}."
      )
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise ValueError(
            f"Config argument {key!r} needs a value ({key}=...), got"
            f" {arg!r}."
        )
      result[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"Config argument {key!r} must be true or false.")
      result[key] = value.lower() in ("true", "1")
    else:
      result[key] = type(default)(value)
  return result


def optimizer_config(**overrides: Any) -> ml_collections.ConfigDict:
  """An optimiser: ``sgd`` (momentum), ``adam`` or ``adamw``.

  Fields:
    name: ``"sgd"``, ``"adam"`` or ``"adamw"``.
    learning_rate: Peak learning rate.
    momentum, nesterov: SGD only.
    weight_decay: L2 weight decay on convolution and dense kernels only
      (biases, BatchNorm scales and offsets are not decayed): added to the
      gradient before the update for ``sgd``/``adam`` (PyTorch's coupled
      ``weight_decay``), decoupled for ``adamw``.
    schedule: ``"constant"``, ``"piecewise"`` (multiply by ``decay_factor``
      at each epoch of ``decay_epochs``) or ``"cosine"`` (to 0 at the end).
    decay_epochs, decay_factor: The piecewise schedule.
    warmup_epochs: Linear warm-up from 0 before the schedule.
    grad_clip_norm: Clip the global gradient norm (0: no clipping).
  """
  config = ml_collections.ConfigDict(dict(
      name="sgd",
      learning_rate=0.05,
      momentum=0.9,
      nesterov=False,
      weight_decay=5e-4,
      schedule="piecewise",
      decay_epochs=(150, 180, 210),
      decay_factor=0.1,
      warmup_epochs=0,
      grad_clip_norm=0.0,
  ))
  config.update(overrides)
  return config


def method_configs() -> dict[str, ml_collections.ConfigDict]:
  """Default hyper-parameters of every method, one sub-config each.

  Defaults follow each method's paper or the CRD / DKD benchmark code where
  they give one. ``ce_weight`` is the weight of the cross-entropy with the
  labels that every method but ``data_free`` keeps.
  """
  c = ml_collections.ConfigDict
  return {
      # Hinton et al. 2015: (1 - alpha) CE + alpha T^2 KL(p_T || q_T).
      "kd": c(dict(temperature=4.0, alpha=0.9)),
      # Zhao et al. 2022: CE + min(epoch / warmup, 1) DKD(alpha, beta, T).
      "dkd": c(dict(temperature=4.0, alpha=1.0, beta=8.0, ce_weight=1.0,
                    warmup_epochs=20)),
      # Romero et al. 2015, as one-stage training (CRD benchmark): CE +
      # weight * ||adaptor(s) - t||^2 on one feature pair.
      "fitnets": c(dict(student_feature="stage2", teacher_feature="stage2",
                        weight=100.0, ce_weight=1.0)),
      # Zagoruyko and Komodakis 2017: CE + weight/2 * sum over feature pairs.
      "at": c(dict(features=("stage1", "stage2", "stage3"), weight=1000.0,
                   p=2, ce_weight=1.0)),
      # Tung and Mori 2019.
      "sp": c(dict(student_feature="embedding",
                   teacher_feature="embedding", weight=3000.0,
                   ce_weight=1.0)),
      # Park et al. 2019: distance (25) and angle (50) terms.
      "rkd": c(dict(student_feature="embedding",
                    teacher_feature="embedding", distance_weight=25.0,
                    angle_weight=50.0, ce_weight=1.0)),
      # Passalis and Tefas 2018.
      "pkt": c(dict(student_feature="embedding",
                    teacher_feature="embedding", weight=30000.0,
                    ce_weight=1.0)),
      # Tian et al. 2020: CE + 0.8 CRD (+ kd_weight * KD).
      "crd": c(dict(student_feature="embedding",
                    teacher_feature="embedding", dim=128, queue_size=16384,
                    temperature=0.07, weight=0.8, ce_weight=1.0,
                    kd_weight=0.0, kd_temperature=4.0)),
      # Several teachers of one architecture, their ensemble as target.
      "multi_teacher": c(dict(num_teachers=3, reduction="ensemble",
                              temperature=4.0, alpha=0.9)),
      # KD with Gaussian noise on the teacher's input only.
      "perturbation": c(dict(noise_scale=0.1, temperature=4.0, alpha=0.9)),
      # A discriminator of soft targets (KDGAN-style) on top of KD.
      "adversarial": c(dict(weight=0.1, temperature=4.0, alpha=0.9,
                            discriminator_hidden=(64,),
                            discriminator_learning_rate=1e-3)),
      # DAFL / DeepInversion / DFAD (jaxkd.data_free): no real image.
      # steps_per_epoch 0: the real data's; optimizer None: the student's
      # `config.optimizer` (its schedule spans the data-free steps).
      "data_free": c(dict(noise_dim=128, batch_size=128, steps_per_epoch=0,
                          generator_learning_rate=1e-3,
                          generator_width=64, generator_output="normalized",
                          generator_upsamplings=1, optimizer=None,
                          temperature=4.0,
                          bn_weight=1.0, one_hot_weight=1.0,
                          activation_weight=0.1, entropy_weight=5.0,
                          adversarial_weight=0.0)),
      # "teacher_free" (Yuan et al. 2020, a virtual teacher from the labels)
      # or "born_again" (Furlanello et al. 2018: a teacher of the student's
      # own architecture, trained on labels first).
      "self_distillation": c(dict(mode="teacher_free",
                                  correct_probability=0.9, temperature=20.0,
                                  weight=1.0, alpha=0.9)),
  }


def base_config() -> ml_collections.ConfigDict:
  """Every key a run reads, with defaults (see the module docstring)."""
  config = ml_collections.ConfigDict()
  config.name = "experiment"
  # -- Data ------------------------------------------------------------------
  config.dataset = "mnist5k"
  config.data_dir = ""            # "" -> $JAXKD_DATA_DIR or ~/.cache/jaxkd
  config.runlocal = False         # set by :runlocal; never published
  config.mock_data = 0            # > 0: that many random TFDS mock examples
  config.train_split = ""         # "" -> the data set's training split
  config.test_split = ""          # "" -> its test split ("test[:64]" ...)
  config.image_size = 0           # 0 -> the data set's; else resize (square)
  config.augment = ""             # "" -> the data set's default augmentation
  config.in_memory = False        # decode the splits once, keep in RAM
  config.batch_size = 64
  config.eval_batch_size = 256
  config.steps_per_epoch = 0      # 0 -> examples // batch_size
  # -- Models ------------------------------------------------------------------
  config.student = ml_collections.ConfigDict(dict(
      model="resnet8x4",
      shift_pixels=0,             # in-step random translation (students)
  ))
  config.teacher = ml_collections.ConfigDict(dict(
      model="resnet32x4",
      load="",                    # a name saved under <load_dir>/teachers
      load_dir="",                # "" -> the workdir
      num_epochs=-1,              # -1: config.num_epochs
      optimizer=optimizer_config(),
      shift_pixels=0,
      num_teachers=1,
  ))
  config.offline_teacher = True   # cache teacher logits when exact
  # -- Training ----------------------------------------------------------------
  config.seed = 0
  config.num_epochs = 240
  config.optimizer = optimizer_config()
  config.method = "kd"
  for name, method_config in method_configs().items():
    config[name] = method_config
  # `<method>:<variant>` names: config.variants.<method>.<variant> holds the
  # fields that differ from config.<method> (experiments/methods.py).
  config.variants = ml_collections.ConfigDict()
  config.nonfinite = "stop"       # "stop": raise naming the step; "skip"
  config.data_parallel = True     # shard batches over every local device
  config.log_every_steps = 50
  config.progress_bar = True
  config.checkpoint_every_epochs = 1
  config.max_checkpoints = 2
  config.allow_config_change = False  # resume despite a changed config
  # -- Modes -------------------------------------------------------------------
  config.pipeline = ml_collections.ConfigDict(dict(
      seeds=5,
      methods=("kd",),
      latency_batch_size=256,
      latency_repeats=20,
      notes="",                   # provenance of the settings, for the results
  ))
  config.sweep = ml_collections.ConfigDict(dict(
      method="kd",
      temperatures=(1.0, 2.0, 4.0, 8.0, 16.0),
  ))
  config.compare = ml_collections.ConfigDict(dict(
      methods=("kd", "dkd", "fitnets", "at", "sp", "rkd", "pkt", "crd"),
      seeds=1,
  ))
  return config


def runlocal(
    config: ml_collections.ConfigDict, *, test_split: str = "test"
) -> ml_collections.ConfigDict:
  """Shrinks a config to about a minute on a CPU: tiny splits, few steps.

  A data set that does not ship with an installed package is replaced by
  64 random examples of its shapes (``tfds.testing.mock_data``), so every
  ``:runlocal`` form runs offline; its output says so and is never a result.
  """
  config.runlocal = True
  if not data.get_spec(config.dataset).embedded:
    config.mock_data = 64
  config.train_split = "train[:128]"
  config.test_split = f"{test_split}[:64]"
  config.num_epochs = 2
  config.teacher.num_epochs = 1
  config.steps_per_epoch = 2
  config.batch_size = 16
  config.eval_batch_size = 32
  config.log_every_steps = 1
  config.pipeline.seeds = 2
  config.pipeline.latency_batch_size = 16
  config.pipeline.latency_repeats = 3
  config.crd.queue_size = 64
  config.data_free.batch_size = 16
  config.data_free.steps_per_epoch = 2
  config.multi_teacher.num_teachers = 2
  return config
