"""What the benchmarks share: setups, timing, memory, environment, results.

Timing method, for every figure: the program is compiled first (timed on its
own), ``warmup`` further calls are run and discarded, then each call is timed
alone, ending with ``jax.block_until_ready`` on its whole output. The
programs of one configuration are timed in ``rounds`` alternating rounds of
``steps`` calls each (:func:`time_interleaved`), so that a change of the
machine's load spreads over all of them. A figure is the median of its
``rounds * steps`` calls, reported with their minimum and maximum; samples
per second are ``batch_size / median``.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import resource
import statistics
import time
from typing import Any, Callable, Sequence

from jaxkd import cpu  # pylint: disable=g-bad-import-order
from jaxkd import measure  # pylint: disable=g-bad-import-order

# First, before anything starts a JAX backend: the measured XLA:CPU default.
cpu.use_fast_cpu_defaults()

import jax  # pylint: disable=g-import-not-at-top,g-bad-import-order
import jax.numpy as jnp
import numpy as np
import optax

# The results helpers, which every benchmark reads from here.
from benchmarks._results import environment as environment
from benchmarks._results import finish as finish
from benchmarks._results import markdown_table as markdown_table
from benchmarks._results import spread as spread
from benchmarks._results import write_results as write_results
from jaxkd import folding
from jaxkd import models
from jaxkd import objective
from jaxkd import teachers
from jaxkd import train_step

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
# Where results go without --publish (relative to the working directory).
WORK_DIR = pathlib.Path("runs") / "benchmarks"
STRATEGIES = ("vmap", "scan", "unroll", "auto")
# The bundled image classifiers (the language models take tokens).
IMAGE_MODELS = tuple(n for n in models.available() if not n.startswith("lm_"))
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# The RepDistiller recipe the PyTorch reference uses too.
LEARNING_RATE = 0.05
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
LABEL_WEIGHT = 0.1
KD_WEIGHT = 0.9
TEMPERATURE = 4.0


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
  """``"1,2,4"`` -> ``[1, 2, 4]``."""
  values = [int(v) for v in text.split(",") if v.strip()]
  if not values or any(v < 1 for v in values):
    raise ValueError(f"Expected positive integers like 1,2,4; got {text!r}.")
  return values


def str_list(text: str, choices: Sequence[str]) -> list[str]:
  values = [v.strip() for v in text.split(",") if v.strip()]
  bad = [v for v in values if v not in choices]
  if not values or bad:
    raise ValueError(f"Expected a comma list of {choices}; got {text!r}.")
  return values


def new_parser(
    name: str, doc: str, *, pair: bool = True
) -> argparse.ArgumentParser:
  """The parser of ``python -m benchmarks.<name>``, described by ``doc``.

  With ``pair`` it has ``--student`` and ``--teacher`` (image model names,
  default ``resnet8x4`` and ``resnet32x4``).
  """
  parser = argparse.ArgumentParser(
      prog=f"python -m benchmarks.{name}", description=doc.split("\n")[0]
  )
  if pair:
    parser.add_argument("--student", default="resnet8x4",
                        choices=IMAGE_MODELS)
    parser.add_argument("--teacher", default="resnet32x4",
                        choices=IMAGE_MODELS)
  return parser


def add_dtype_flag(
    parser, flag: str = "--dtype", *, default: str | None = "float32",
    help: str | None = None,  # pylint: disable=redefined-builtin
) -> None:
  """A flag choosing one of :data:`DTYPES` by name."""
  parser.add_argument(flag, choices=sorted(DTYPES), default=default, help=help)


def add_common_flags(parser, *, steps: int = 5, rounds: int = 2) -> None:
  """Flags every benchmark takes."""
  parser.add_argument("--steps", type=int, default=steps,
                      help="Timed calls per figure and round (the median of"
                      " all rounds' calls is reported).")
  parser.add_argument("--rounds", type=int, default=rounds,
                      help="Alternating rounds over the programs measured"
                      " together (spreads load changes over all of them).")
  parser.add_argument("--warmup", type=int, default=2,
                      help="Calls after compilation that are not timed.")
  parser.add_argument("--image_size", type=int, default=32,
                      help="Square image side (32: CIFAR).")
  parser.add_argument("--num_classes", type=int, default=100)
  parser.add_argument("--out_dir", default=str(WORK_DIR),
                      help="Where the JSON and Markdown results go.")
  parser.add_argument("--publish", dest="out_dir", action="store_const",
                      const=str(RESULTS_DIR),
                      help="Write them to benchmarks/results/ (the committed"
                      " results the README shows) instead.")
  parser.add_argument("--name", default=None,
                      help="Results file stem (default: the benchmark's).")
  parser.add_argument("--note", default="",
                      help="A line printed under the table, e.g. 'noisy'.")


# ---------------------------------------------------------------------------
# Timing and memory.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Timing:
  """Seconds per call: median, minimum and maximum over ``steps`` calls."""

  median_s: float
  min_s: float
  max_s: float
  steps: int

  @classmethod
  def of(cls, durations: Sequence[float]) -> "Timing":
    """The median, minimum and maximum of ``durations`` (seconds)."""
    return cls(
        median_s=statistics.median(durations),
        min_s=min(durations),
        max_s=max(durations),
        steps=len(durations),
    )

  def samples_per_s(self, batch_size: int) -> dict[str, float]:
    return {
        "median": batch_size / self.median_s,
        "min": batch_size / self.max_s,
        "max": batch_size / self.min_s,
    }


def time_calls(run: Callable[[], Any], *, steps: int, warmup: int) -> Timing:
  """Times ``run`` (which must block until its work is done)."""
  return Timing.of(measure.time_calls(run, steps=steps, warmup=warmup))


def time_interleaved(
    runs: dict[str, Callable[[], Any]], *, steps: int, rounds: int
) -> dict[str, Timing]:
  """Times several programs in alternating rounds of ``steps`` calls each.

  On a machine whose load changes (other jobs, shared cores), alternating
  spreads the change over every program instead of penalising whichever ran
  at the wrong moment. Warm-up is the caller's (``time_calls`` with
  ``steps=0`` or a few direct calls).
  """
  durations: dict[str, list[float]] = {name: [] for name in runs}
  for _ in range(max(rounds, 1)):
    for name, run in runs.items():
      durations[name] += measure.time_calls(run, steps=steps, warmup=0)
  return {name: Timing.of(values) for name, values in durations.items()}


def memory_snapshot() -> dict[str, float | None]:
  """Device memory where the backend reports it, else the process's RSS.

  XLA:CPU reports no memory statistics, so on CPU this is the process's
  resident set (``rss_mib``) and its high-water mark since the process
  started (``peak_rss_mib``; a peak, so it never decreases).
  """
  snapshot: dict[str, float | None] = {
      "device_peak_mib": None, "rss_mib": None, "peak_rss_mib": None,
  }
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except  # Backend-dependent.
    stats = None
  if stats and "peak_bytes_in_use" in stats:
    snapshot["device_peak_mib"] = stats["peak_bytes_in_use"] / 2**20
  # ru_maxrss is in KiB on Linux.
  snapshot["peak_rss_mib"] = (
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  )
  try:
    import psutil  # pylint: disable=g-import-not-at-top

    snapshot["rss_mib"] = psutil.Process().memory_info().rss / 2**20
  except ImportError:
    pass
  return snapshot


def memory_delta(before: dict, after: dict) -> dict[str, float | None]:
  """What a measured configuration added to the memory figures."""
  out = dict(after)
  if before.get("rss_mib") is not None and after.get("rss_mib") is not None:
    out["rss_delta_mib"] = after["rss_mib"] - before["rss_mib"]
  out["peak_rss_delta_mib"] = after["peak_rss_mib"] - before["peak_rss_mib"]
  return out


# ---------------------------------------------------------------------------
# Setups.
# ---------------------------------------------------------------------------


def make_batch(
    batch_size: int, image_size: int, num_classes: int, seed: int = 0
) -> dict[str, jax.Array]:
  """Random images and labels (speed does not depend on the data)."""
  rng = np.random.default_rng(seed)
  images = rng.standard_normal(
      (batch_size, image_size, image_size, 3), dtype=np.float32
  )
  labels = rng.integers(0, num_classes, size=batch_size, dtype=np.int32)
  return {"image": jnp.asarray(images), "label": jnp.asarray(labels)}


def optimizer() -> optax.GradientTransformation:
  """SGD, momentum 0.9, weight decay 5e-4 added to the gradient (PyTorch's)."""
  return optax.chain(
      optax.add_decayed_weights(WEIGHT_DECAY),
      optax.sgd(LEARNING_RATE, momentum=MOMENTUM),
  )


def kd_objective() -> list[objective.Term]:
  """0.1 cross-entropy + 0.9 KD at T = 4 (RepDistiller's KD recipe)."""
  return [
      objective.LabelTerm(weight=LABEL_WEIGHT),
      objective.LogitTerm(weight=KD_WEIGHT, temperature=TEMPERATURE),
  ]


@dataclasses.dataclass
class Teachers:
  """K teachers of one architecture: the (maybe folded) model and arrays."""

  model: models.Model
  params: list[Any]
  states: list[Any]
  folded: bool

  def group(self, strategy: str, k: int | None = None):
    k = len(self.params) if k is None else k
    return teachers.TeacherGroup.create(
        self.model, self.params[:k], self.states[:k], strategy=strategy
    )


def make_teachers(
    name: str,
    k: int,
    *,
    num_classes: int,
    image_size: int,
    dtype: Any = jnp.float32,
    fold: bool = False,
    seed: int = 1,
) -> Teachers:
  """K randomly initialised teachers, BatchNorm folded if ``fold``."""
  model = models.create(name, num_classes=num_classes, dtype=dtype)
  sample = jnp.zeros((2, image_size, image_size, 3), jnp.float32)
  init = jax.jit(model.init)
  params, states = [], []
  for i in range(k):
    p, s = init(jax.random.key(seed + i), sample)
    params.append(p)
    states.append(s)
  if not fold:
    return Teachers(model, params, states, folded=False)
  folded_model = None
  folded_params = []
  for i, (p, s) in enumerate(zip(params, states)):
    # The pairing is the same for every teacher: check the first only.
    m, fp = folding.fold_batchnorm(
        model, p, s, sample_input=sample, check=i == 0
    )
    folded_model = folded_model or m
    folded_params.append(fp)
  return Teachers(folded_model, folded_params, [{} for _ in params],
                  folded=True)


@dataclasses.dataclass
class Compiled:
  """A compiled step with its inputs and how long compiling took."""

  run: Callable[[], Any]
  compile_s: float
  compiled: Any
  description: str = ""


def compile_step(jitted, *args) -> tuple[Any, float]:
  """``jitted.lower(*args).compile()`` and its wall time (trace included)."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def train_step_setup(
    student: models.Model,
    batch: dict[str, jax.Array],
    *,
    teacher_groups: Sequence[tuple[Any, Any]] = (),
    offline_k: int = 0,
    distill: bool = True,
    num_classes: int,
    seed: int = 0,
    place: Callable[[Any, Any], tuple[Any, Any]] | None = None,
) -> Compiled:
  """A compiled jaxkd train step, ready to be timed.

  Args:
    student: The student model.
    batch: The batch (image, label).
    teacher_groups: ``(group, variables)`` pairs for online distillation.
    offline_k: With no teachers, cache ``offline_k`` teachers' logits in the
      batch (offline distillation; random logits, speed does not depend on
      them).
    distill: ``False`` gives the student-only step (cross-entropy alone).
    num_classes: Number of classes.
    seed: Initialisation seed.
    place: ``(state, batch) -> (state, batch)`` placing both on devices (a
      mesh), or ``None`` for the default device.
  """
  if distill:
    terms = kd_objective()
  else:
    terms = [objective.LabelTerm()]
  batch = dict(batch)
  if offline_k:
    logits = jax.random.normal(
        jax.random.key(seed + 7),
        (offline_k, batch["image"].shape[0], num_classes),
    )
    batch.update(train_step.cache_teacher_outputs(logits))
  spec = train_step.Distillation(
      student=student,
      objective=terms,
      optimizer=optimizer(),
      teachers=[g for g, _ in teacher_groups],
  )
  state = spec.initial_state(
      jax.random.key(seed), batch, [v for _, v in teacher_groups], None
  )
  if place is not None:
    state, batch = place(state, batch)
  jitted = train_step.make_train_step(spec)
  compiled, compile_s = compile_step(jitted, state, batch)
  holder = [state]

  def run():
    holder[0], metrics = compiled(holder[0], batch)
    jax.block_until_ready((holder[0], metrics))
    return metrics

  return Compiled(run=run, compile_s=compile_s, compiled=compiled)


def teacher_forward_setup(group, variables, images) -> Compiled:
  """The compiled forward pass of a teacher group (eval mode)."""
  jitted = jax.jit(
      lambda v, x: teachers.apply_teachers(group, v, x).logits
  )
  compiled, compile_s = compile_step(jitted, variables, images)

  def run():
    return jax.block_until_ready(compiled(variables, images))

  return Compiled(run=run, compile_s=compile_s, compiled=compiled)


def flops_of(compiled) -> float | None:
  """FLOPs of one call from XLA's cost analysis, if the backend gives them."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # Backend-dependent.
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis:
    return None
  return float(analysis["flops"])
