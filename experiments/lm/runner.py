"""Teacher, baseline and distilled byte-level students, and the results.

Every model is trained by the library's one engine (``jaxkd.Distillation``
with ``inputs="tokens"`` and the token terms of ``jaxkd.methods.lm``); this
module only builds each method's objective and data, loops, evaluates bits
per byte and writes the JSON, the table and the plot (the last two drawn
by :mod:`experiments.lm.report`).

Bits per byte: the mean next-byte negative log-likelihood over the
evaluation windows' predicted positions (each window of ``seq_len`` bytes
scores its last ``seq_len - 1`` bytes), divided by ``ln 2``.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import pathlib
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import jaxkd
from jaxkd import lm
from jaxkd import models
from jaxkd import teachers as teachers_lib
from jaxkd.methods import lm as lm_methods

from experiments import writers
from experiments.lm import data as data_lib
from experiments.lm import report
from experiments.lm.report import NAME

__all__ = ["RESULTS_DIR", "run", "student_plan"]

RESULTS_DIR = pathlib.Path(__file__).resolve().parent.parent / "results"
VOCAB = 256
LN2 = math.log(2.0)

Batch = Mapping[str, Any]


def _model(cfg: ml_collections.ConfigDict, name: str) -> models.Model:
  return models.from_linen(models.TransformerLM(
      vocab_size=VOCAB, num_layers=cfg.num_layers,
      hidden_size=cfg.hidden_size, num_heads=cfg.num_heads,
      mlp_dim=cfg.mlp_dim), name=name)


def _optimizer(config, steps: int) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, min(config.warmup_steps, steps // 2),
      max(steps, 1), end_value=0.1 * config.learning_rate)
  return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm),
                     optax.adamw(schedule, weight_decay=0.01))


def _count(params) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(params)))


@dataclasses.dataclass
class Plan:
  """One method: its engine configuration and how a batch is prepared.

  ``prepare(batch, state, key)`` turns the sampled train windows into the
  step's batch (adds cached teacher entries, or student samples for GKD).
  """

  distillation: jaxkd.Distillation
  teacher_variables: tuple = ()
  prepare: Callable[[dict, Any, jax.Array], dict] | None = None
  detail: str = ""


class Evaluator:
  """Bits per byte of a model's params on fixed windows (one compile)."""

  def __init__(self, model: models.Model, config):
    self.config = config
    self.distillation = jaxkd.Distillation(
        student=model, objective=[lm_methods.NextTokenTerm()],
        optimizer=optax.sgd(0.0), inputs="tokens")
    self.step = jaxkd.make_eval_step(self.distillation)

  def bits_per_byte(self, state, windows: np.ndarray) -> float:
    # Only the student's arrays: one compilation whatever the method's state.
    state = state.replace(
        params={"student": state.params["student"], "terms": {}},
        model_state={"student": state.model_state["student"], "terms": {}},
        opt_state=None, teachers=())
    size = self.config.batch_size
    sums = []
    for start in range(0, windows.shape[0], size):
      chunk = windows[start:start + size]
      mask = np.ones(chunk.shape, bool)
      if chunk.shape[0] < size:  # Pad to one compiled shape, masked out.
        pad = size - chunk.shape[0]
        chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:],
                                                chunk.dtype)])
        mask = np.concatenate([mask, np.zeros((pad,) + mask.shape[1:],
                                              bool)])
      sums.append(self.step(state, {"tokens": jnp.asarray(chunk),
                                    "mask": jnp.asarray(mask)}))
    return jaxkd.summarize(sums)["loss"] / LN2


def train(plan: Plan, *, steps: int, seed: int, splits: data_lib.Splits,
          config, evaluator: Evaluator, windows: Mapping[str, np.ndarray],
          log: writers.JsonlWriter | None = None,
          on_train_batch: Callable[[dict], None] | None = None,
          step_fn=None) -> tuple[Any, dict]:
  """Trains one model; returns the state and its record."""
  distillation = plan.distillation
  batches = splits.train_batches(
      seed=10_000 + seed, steps=max(steps, 1), batch_size=config.batch_size,
      length=config.seq_len)
  sample = batches[0]
  key = jax.random.key(seed)
  init_key, data_key = jax.random.split(key)
  probe = dict(sample) if plan.prepare is None else plan.prepare(
      dict(sample), None, data_key)
  state = distillation.initial_state(
      init_key, {k: jnp.asarray(v) for k, v in probe.items()},
      plan.teacher_variables, None)
  step_fn = step_fn or jaxkd.make_train_step(distillation)
  curve, train_time, tokens = [], 0.0, 0
  for i in range(steps):
    batch = batches[i]
    if on_train_batch is not None:
      on_train_batch(batch)
    started = time.perf_counter()
    step_batch = dict(batch) if plan.prepare is None else plan.prepare(
        dict(batch), state, jax.random.fold_in(data_key, i))
    state, metrics = step_fn(
        state, {k: jnp.asarray(v) for k, v in step_batch.items()})
    loss = float(metrics["loss"])
    if i > 0:  # The first step compiles.
      train_time += time.perf_counter() - started
      tokens += config.batch_size * config.seq_len
    if not math.isfinite(loss):
      raise FloatingPointError(f"Non-finite loss {loss} at step {i}.")
    if (i + 1) % config.eval_every == 0 or i + 1 == steps:
      bpb = evaluator.bits_per_byte(state, windows["validation"])
      curve.append((i + 1, bpb))
      if log is not None:
        log.write({"step": i + 1, "loss": loss, "validation_bpb": bpb})
  record = {
      "validation_bpb": curve[-1][1],
      "test_bpb": evaluator.bits_per_byte(state, windows["test"]),
      "curve": curve,
      "tokens_per_s": tokens / train_time if train_time > 0 else float("nan"),
      "params": _count(state.params["student"]),
  }
  return state, record


def _teacher_plan(config) -> Plan:
  return Plan(jaxkd.Distillation(
      student=_model(config.teacher, "teacher"),
      objective=[lm_methods.NextTokenTerm()],
      optimizer=_optimizer(config, config.teacher_steps), inputs="tokens"))


def student_plan(method: str, config, teacher_params: Sequence[Any]) -> Plan:
  """The engine configuration of one student method."""
  student = _model(config.student, "student")
  teacher = _model(config.teacher, "teacher")
  optimizer = _optimizer(config, config.student_steps)
  ce = lm_methods.NextTokenTerm(weight=config.ce_weight)
  kd_weight = config.kd_weight
  temperature = config.temperature

  def group(model, params):
    return teachers_lib.TeacherGroup.create(model, list(params),
                                            strategy="scan")

  def distill(terms, model=student, groups=()):
    return jaxkd.Distillation(
        student=model, objective=terms, optimizer=optimizer,
        teachers=[g for g, _ in groups], inputs="tokens")

  if method == "baseline":
    return Plan(distill([lm_methods.NextTokenTerm()]), detail="CE only")
  if method in ("forward_kl", "reverse_kl", "jsd"):
    g = group(teacher, teacher_params[:1])
    term = lm_methods.TokenDivergenceTerm(
        divergence=method, weight=kd_weight, temperature=temperature,
        beta=config.jsd_beta)
    detail = f"{config.ce_weight} CE + {kd_weight} {method}" + (
        f" (beta={config.jsd_beta})" if method == "jsd" else "")
    return Plan(distill([ce, term], groups=[g]), (g[1],), detail=detail)
  if method == "skew_kl":
    g = group(lm_methods.with_output_kernel(teacher), teacher_params[:1])
    term = lm_methods.FusedDivergenceTerm(
        divergence="skew_kl", alpha=config.skew_alpha, weight=kd_weight,
        temperature=temperature)
    return Plan(
        distill([ce, term], model=lm_methods.with_output_kernel(student),
                groups=[g]), (g[1],),
        detail=(f"{config.ce_weight} CE + {kd_weight} skew KL"
                f" (alpha={config.skew_alpha}, fused loss)"))
  if method == "mixture":
    g = group(teacher, teacher_params[:2])
    term = lm_methods.TokenDivergenceTerm(
        divergence="forward_kl", teacher_reduction="mixture",
        weight=kd_weight, temperature=temperature)
    return Plan(distill([ce, term], groups=[g]), (g[1],),
                detail=f"{config.ce_weight} CE + {kd_weight} forward KL to"
                " the mixture of 2 teachers")
  if method == "sparse_topk":
    first = teacher_params[0]
    k = config.top_k

    @jax.jit
    def cache(tokens):
      logits = teacher.apply(first, {}, tokens, train=False, rng=None)[0]
      log_probs, ids = lm.top_k_log_probs(logits, k)
      # Stored as a 16-bit cache stores them (TeacherCacheWriter).
      return log_probs.astype(jnp.float16).astype(jnp.float32), ids

    def prepare(batch, state, key):
      del state, key
      log_probs, ids = cache(jnp.asarray(batch["tokens"]))
      return {**batch, "teacher_topk_log_probs": log_probs,
              "teacher_topk_indices": ids}

    term = lm_methods.SparseTeacherTerm(weight=kd_weight,
                                        temperature=temperature)
    return Plan(distill([ce, term]), prepare=prepare,
                detail=f"{config.ce_weight} CE + {kd_weight} top-{k} KL"
                " with a tail bucket (float16 cache)")
  if method == "gkd":
    g = group(teacher, teacher_params[:1])
    prompt = config.seq_len - config.gkd_new_tokens
    mix = jax.jit(lambda params, batch, key: lm_methods.on_policy_mix(
        student, params, {}, batch, key=key, lam=config.gkd_lambda,
        prompt_length=prompt, temperature=1.0))

    def prepare(batch, state, key):
      if state is None:  # Shapes only, for the first state.
        return {**batch, "prompt_mask": np.zeros_like(batch["tokens"], bool),
                "mask": np.ones_like(batch["tokens"], bool)}
      out, _ = mix(state.params["student"],
                   {"tokens": jnp.asarray(batch["tokens"])}, key)
      return out

    # Every position is scored: the prompt is data, the continuation the
    # student's own samples (on-policy) with probability lambda.
    term = lm_methods.TokenDivergenceTerm(
        divergence=config.gkd_divergence, weight=kd_weight,
        temperature=temperature, beta=config.jsd_beta, prompt_mask=None)
    return Plan(
        jaxkd.Distillation(student=student, objective=[ce, term],
                           optimizer=optimizer, teachers=[g[0]],
                           inputs="tokens", input_mask="mask"),
        (g[1],), prepare=prepare,
        detail=(f"{config.ce_weight} CE + {kd_weight} {config.gkd_divergence}"
                f"; lambda={config.gkd_lambda}: the last"
                f" {config.gkd_new_tokens} bytes sampled from the student"))
  raise ValueError(f"Unknown method {method!r}.")


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
        command: str = "", publish: bool = False,
        splits: data_lib.Splits | None = None,
        on_train_batch: Callable[[dict], None] | None = None) -> dict:
  """Runs the whole experiment; writes ``lm_stdlib.{md,json,png}``.

  The outputs go to ``workdir`` and, with ``publish``, also to
  ``experiments/results/`` (refused for a ``:runlocal`` config).
  ``on_train_batch`` sees every training batch (tests check that no test
  byte reaches training).
  """
  if publish and config.runlocal:
    raise ValueError("A :runlocal config is a smoke test; never published.")
  started = time.perf_counter()
  load_before = [round(x, 2) for x in os.getloadavg()]
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  splits = splits or data_lib.load(
      seed=config.split_seed, fractions=tuple(config.split_fractions),
      max_train_bytes=config.max_train_bytes or None)
  windows = {s: splits.eval_windows(s, config.eval_windows, config.seq_len)
             for s in ("validation", "test")}
  teacher_eval = Evaluator(_model(config.teacher, "teacher"), config)
  student_eval = Evaluator(_model(config.student, "student"), config)

  def log(name):
    path = workdir / "runs" / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").unlink(missing_ok=True)
    return writers.JsonlWriter(path / "metrics.jsonl")

  methods = list(config.methods)
  needs_two = "mixture" in methods
  teacher_plan = _teacher_plan(config)
  teacher_step = jaxkd.make_train_step(teacher_plan.distillation)
  teacher_params, teacher_records = [], []
  for index in range(2 if needs_two else 1):
    state, record = train(
        teacher_plan, steps=config.teacher_steps, seed=100 + index,
        splits=splits, config=config, evaluator=teacher_eval,
        windows=windows, log=log(f"teacher_{index}"),
        on_train_batch=on_train_batch, step_fn=teacher_step)
    teacher_params.append(state.params["student"])
    teacher_records.append(record)
    print(f"teacher {index}: validation {record['validation_bpb']:.4f}"
          f" bits per byte, {record['tokens_per_s']:,.0f} tokens/s",
          flush=True)

  runs, details = {}, {}
  for method in methods:
    plan = student_plan(method, config, teacher_params)
    details[method] = plan.detail
    step_fn = jaxkd.make_train_step(plan.distillation)
    runs[method] = []
    for seed in config.seeds:
      _, record = train(
          plan, steps=config.student_steps, seed=int(seed), splits=splits,
          config=config, evaluator=student_eval, windows=windows,
          log=log(f"{method}_seed{seed}"), on_train_batch=on_train_batch,
          step_fn=step_fn)
      runs[method].append(record)
      print(f"{method} seed {seed}: validation {record['validation_bpb']:.4f}"
            f" test {record['test_bpb']:.4f} bits per byte,"
            f" {record['tokens_per_s']:,.0f} tokens/s", flush=True)

  result = {
      "command": command,
      "config": config.to_dict(),
      "data": splits.info,
      "environment": {
          "cpus": os.cpu_count(), "jax": jax.__version__,
          "backend": jax.default_backend(), "load_before": load_before,
          "load_after": [round(x, 2) for x in os.getloadavg()],
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
              timespec="seconds"),
      },
      "teacher": teacher_records[0],
      "teacher_2": teacher_records[1] if needs_two else None,
      "runs": runs,
      "rows": report.summarize_runs(runs),
      "details": details,
  }
  result["wall_s"] = time.perf_counter() - started
  targets = [workdir] + ([RESULTS_DIR] if publish else [])
  for target in targets:
    target.mkdir(parents=True, exist_ok=True)
    writers.dump_json(target / f"{NAME}.json", result)
    (target / f"{NAME}.md").write_text(report.render_markdown(result))
    report.plot(target / f"{NAME}.png", runs, teacher_records[0])
  return result
