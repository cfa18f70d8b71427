"""Teacher, baseline and distilled byte-level students, and the results.

Every model is trained by the library's one engine (``jaxkd.Distillation``
with ``inputs="tokens"`` and the token terms of ``jaxkd.methods.lm``); this
module only builds each method's objective and data, loops, evaluates bits
per byte and writes the table, the JSON and the plot.

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

__all__ = ["RESULTS_DIR", "run", "student_plan"]

RESULTS_DIR = pathlib.Path(__file__).resolve().parent.parent / "results"
NAME = "lm_stdlib"
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


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
  values = np.asarray(values, np.float64)
  std = float(values.std(ddof=1)) if values.size > 1 else float("nan")
  return float(values.mean()), std


def summarize_runs(runs: Mapping[str, list[dict]]) -> list[dict]:
  """One row per method: mean +- std over seeds and the 2-std verdict."""
  rows = []
  base = _mean_std([r["validation_bpb"] for r in runs["baseline"]]) if (
      "baseline" in runs) else None
  for method, records in runs.items():
    val = _mean_std([r["validation_bpb"] for r in records])
    test = _mean_std([r["test_bpb"] for r in records])
    row = {"method": method, "seeds": len(records),
           "validation_bpb": val, "test_bpb": test,
           "params": records[0]["params"],
           "tokens_per_s": float(np.mean([r["tokens_per_s"]
                                          for r in records]))}
    if base is not None and method != "baseline":
      gain = base[0] - val[0]
      spread = max(base[1], val[1])
      row["gain_vs_baseline"] = gain
      row["beats_baseline_2std"] = bool(
          np.isfinite(spread) and gain > 2 * spread)
    rows.append(row)
  return rows


def _fmt(mean_std) -> str:
  return f"{mean_std[0]:.4f} ± {mean_std[1]:.4f}"


def render_markdown(result: Mapping[str, Any]) -> str:
  config, info = result["config"], result["data"]
  lines = [
      f"# Byte-level LM distillation on the Python {info['python']}"
      " standard library",
      "",
      f"Command: `{result['command']}` ({result['wall_s'] / 60:.1f} min on"
      f" {result['environment']['cpus']} CPU cores; load average"
      f" {result['environment']['load_before']} before and"
      f" {result['environment']['load_after']} after: the machine was"
      " shared, so tokens/s are indicative).",
      "",
      f"Data: {info['files']} `*.py` files ({info['bytes']:,} bytes) under"
      f" `{info['stdlib']}`, sha256 of the sorted `path<TAB>size` lines"
      f" `{info['sha256_sorted_paths_and_sizes']}`; split by file with seed"
      f" {info['split_seed']}: {info['train_files']} train"
      f" ({info['train_bytes']:,} bytes read), {info['validation_files']}"
      f" validation ({info['validation_bytes']:,} bytes),"
      f" {info['test_files']} test ({info['test_bytes']:,} bytes).",
      f"Evaluation: {config['eval_windows']} evenly spaced windows of"
      f" {config['seq_len']} bytes per split; bits per byte of the last"
      f" {config['seq_len'] - 1} bytes of each window.",
      "",
      f"Teacher: {config['teacher']['num_layers']} layers, width"
      f" {config['teacher']['hidden_size']}, {result['teacher']['params']:,}"
      f" params, {config['teacher_steps']} steps: validation"
      f" {result['teacher']['validation_bpb']:.4f}, test"
      f" {result['teacher']['test_bpb']:.4f} bits per byte" + (
          f" (second teacher, for the mixture:"
          f" {result['teacher_2']['validation_bpb']:.4f} validation)."
          if result.get("teacher_2") else "."),
      f"Students: {config['student']['num_layers']} layer(s), width"
      f" {config['student']['hidden_size']}, {config['student_steps']}"
      f" steps of batch {config['batch_size']} x {config['seq_len']} bytes,"
      f" seeds {list(config['seeds'])}.",
      "",
      # The markers let tools/results_readme.py copy table and reading.
      "<!-- table:start -->",
      "| method | objective | validation bpb | test bpb | gain vs baseline"
      " (val) | > 2 std? | params | tokens/s |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for row in result["rows"]:
    gain = row.get("gain_vs_baseline")
    lines.append(
        f"| {row['method']} | {result['details'][row['method']]} |"
        f" {_fmt(row['validation_bpb'])} | {_fmt(row['test_bpb'])} |"
        f" {'' if gain is None else f'{gain:+.4f}'} |"
        f" {'' if gain is None else ('yes' if row['beats_baseline_2std'] else 'no')} |"
        f" {row['params']:,} | {row['tokens_per_s']:,.0f} |")
  winners = [r["method"] for r in result["rows"]
             if r.get("beats_baseline_2std")]
  lines += [
      "<!-- table:end -->",
      "",
      "<!-- reading:start -->",
      "Mean ± sample std over seeds. \"> 2 std\": the validation gain over"
      " the baseline exceeds twice the larger of the two standard"
      " deviations.",
      "",
      "Reading: " + (
          f"{', '.join(winners)} beat the baseline by more than 2 std."
          if winners else
          "no method beats the baseline by more than 2 std.")
      + " The others do not (a negative gain is worse than the baseline);"
      " at this scale (a few hundred steps, tiny models) a verdict says"
      " nothing about larger runs. tokens/s counts training tokens per second of the train"
      " steps (GKD includes its sampling, sparse top-k the teacher pass that"
      " fills its cache); the plot shows validation bits per byte against"
      " steps (mean over seeds).",
      "",
      f"![Validation bits per byte against steps]({NAME}.png)",
      "<!-- reading:end -->",
      "",
      f"- Command: `{result['command']}`",
      f"- Date: {result['environment'].get('date', '')}; wall time"
      f" {result['wall_s']:.0f} s",
      "",
  ]
  return "\n".join(lines)


def plot(path: pathlib.Path, runs: Mapping[str, list[dict]],
         teacher: Mapping[str, Any]) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for method, records in runs.items():
    steps = [s for s, _ in records[0]["curve"]]
    values = np.mean([[v for _, v in r["curve"]] for r in records], axis=0)
    ax.plot(steps, values, marker="o", markersize=3, label=method)
  ax.axhline(teacher["validation_bpb"], color="k", linestyle="--",
             linewidth=1, label="teacher")
  ax.set_xlabel("student step")
  ax.set_ylabel("validation bits per byte")
  ax.set_title("Byte-level students on the Python standard library")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


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
      "rows": summarize_runs(runs),
      "details": details,
  }
  result["wall_s"] = time.perf_counter() - started
  targets = [workdir] + ([RESULTS_DIR] if publish else [])
  for target in targets:
    target.mkdir(parents=True, exist_ok=True)
    writers.dump_json(target / f"{NAME}.json", result)
    (target / f"{NAME}.md").write_text(render_markdown(result))
    plot(target / f"{NAME}.png", runs, teacher_records[0])
  return result
