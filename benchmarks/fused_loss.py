"""Memory and speed of the fused output-layer loss against materialised logits.

  python -m benchmarks.fused_loss               # -> runs/benchmarks/
  python -m benchmarks.fused_loss --publish     # -> benchmarks/results/

Three ways to compute a forward-KL distillation loss between a student's and
a teacher's output distributions, ``KL(softmax(h_T W_T / T) ||
softmax(h_S W_S / T))`` averaged over ``N`` tokens, each with its gradient
with respect to the student's hidden states and head (what a training step
needs from its output layer):

* **fused**: :func:`jaxkd.lm.fused_distillation_loss`, token chunks and
  vocabulary tiles, never an ``[N, V]`` array; its backward pass
  accumulates the hidden states' gradient in a float32 ``[N, H]`` buffer
  (``hidden_grad="accumulate"``, the default);
* **fused (recompute)**: the same with ``hidden_grad="recompute"``: a second
  backward sweep instead of that buffer;
* **unfused**: the logits materialised (``h @ W``, in the input dtype) and
  :func:`jaxkd.losses.kl_divergence` (float32 log-softmaxes);
* **obvious**: ``log_softmax`` of the full logits in the input dtype, then
  ``sum p_T (log p_T - log p_S)``.

Memory is XLA's own figure for the compiled program,
``jax.jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes``
(the scratch space on top of the arguments and outputs), for abstract
``jax.ShapeDtypeStruct`` inputs: nothing is allocated, so the table reaches
``N = 8192`` tokens and ``V = 256k`` on any machine. Speed is measured at a
small size that fits this machine's memory (tokens per second of loss and
gradient, median of interleaved rounds, see ``benchmarks/_common.py``).
Student and teacher share the hidden size ``H`` in both.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any, Callable, Sequence

from benchmarks import _common

import jax  # pylint: disable=g-bad-import-order
import jax.numpy as jnp  # pylint: disable=g-bad-import-order
import numpy as np  # pylint: disable=g-bad-import-order
from jaxkd import lm  # pylint: disable=g-bad-import-order
from jaxkd import losses  # pylint: disable=g-bad-import-order

NAME = "fused_loss"
WORKDIR = "runs/benchmarks"
TEMPERATURE = 2.0
MIB = 2**20
# The targets this benchmark reports against.
MEMORY_RATIO_TARGET = 1 / 100  # fused / unfused temporary memory.
SPEED_RATIO_TARGET = 0.8  # fused / unfused tokens per second.
# Fused program -> its row key of fused / unfused temporary memory.
FUSED_RATIOS = {
    "fused": "fused_over_unfused",
    "fused (recompute)": "recompute_over_unfused",
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = _common.new_parser(NAME, __doc__, pair=False)
  parser.add_argument("--vocab_sizes", type=_common.int_list,
                      default=[32768, 131072, 262144])
  parser.add_argument("--tokens", type=_common.int_list, default=[2048, 8192],
                      help="N = batch x length of the memory table.")
  parser.add_argument("--hidden_sizes", type=_common.int_list,
                      default=[1024, 4096])
  _common.add_dtype_flag(
      parser, default="bfloat16",
      help="Hidden states' and heads' dtype (memory table).")
  parser.add_argument("--ratio_vocab", type=int, default=131072,
                      help="V at which fused / unfused memory is reported.")
  parser.add_argument("--token_chunk", type=int, default=512)
  parser.add_argument("--vocab_chunk", type=int, default=512)
  parser.add_argument("--time_tokens", type=int, default=1024)
  parser.add_argument("--time_hidden", type=int, default=256)
  parser.add_argument("--time_vocab", type=int, default=32768)
  _common.add_dtype_flag(
      parser, "--time_dtype",
      help="dtype of the timed programs (XLA:CPU has no fast bfloat16"
      " matmul).")
  parser.add_argument("--steps", type=int, default=3,
                      help="Timed calls per program and round.")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--workdir", default=WORKDIR,
                      help="Where the results go without --publish.")
  parser.add_argument("--publish", action="store_true",
                      help="Write benchmarks/results/fused_loss.{json,md}.")
  parser.add_argument("--name", default=NAME)
  parser.add_argument("--note", default="")
  return parser.parse_args(argv)


# ---------------------------------------------------------------------------
# The three losses, as functions of (hs, ws, ht, wt).
# ---------------------------------------------------------------------------


def fused_loss(
    token_chunk: int, vocab_chunk: int, hidden_grad: str = "accumulate"
) -> Callable[..., Any]:
  def loss(hs, ws, ht, wt):
    return lm.fused_distillation_loss(
        hs, ws, ht, wt, temperature=TEMPERATURE, token_chunk=token_chunk,
        vocab_chunk=vocab_chunk, hidden_grad=hidden_grad,
    )

  return loss


def unfused_loss(hs, ws, ht, wt):
  return jnp.mean(
      losses.kl_divergence(hs @ ws, ht @ wt, temperature=TEMPERATURE)
  )


def obvious_loss(hs, ws, ht, wt):
  log_ps = jax.nn.log_softmax((hs @ ws) / TEMPERATURE)
  log_pt = jax.nn.log_softmax((ht @ wt) / TEMPERATURE)
  return jnp.mean(jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1))


def programs(args) -> dict[str, Callable[..., Any]]:
  """Name -> loss function; each is measured with its gradient."""
  return {
      "fused": fused_loss(args.token_chunk, args.vocab_chunk),
      "fused (recompute)": fused_loss(
          args.token_chunk, args.vocab_chunk, "recompute"),
      "unfused": unfused_loss,
      "obvious": obvious_loss,
  }


def with_grad(loss):
  return jax.value_and_grad(loss, argnums=(0, 1))


def shapes(n: int, h: int, v: int) -> list[tuple[int, ...]]:
  return [(n, h), (h, v), (n, h), (h, v)]


# ---------------------------------------------------------------------------
# Memory from compiled abstract programs.
# ---------------------------------------------------------------------------


def compiled_memory(fn, n: int, h: int, v: int, dtype) -> dict[str, float]:
  """MiB of XLA's memory analysis of ``jit(fn)`` on abstract inputs."""
  abstract = [jax.ShapeDtypeStruct(s, dtype) for s in shapes(n, h, v)]
  compiled, compile_s = _common.compile_step(jax.jit(fn), *abstract)
  analysis = compiled.memory_analysis()
  return {
      "temp_mib": analysis.temp_size_in_bytes / MIB,
      "argument_mib": analysis.argument_size_in_bytes / MIB,
      "output_mib": analysis.output_size_in_bytes / MIB,
      "compile_s": compile_s,
  }


def _ratio(a: float, b: float) -> float:
  return a / b if b else float("inf")


def memory_rows(args) -> list[dict[str, Any]]:
  dtype = _common.DTYPES[args.dtype]
  fused = fused_loss(args.token_chunk, args.vocab_chunk)
  rows = []
  for n in args.tokens:
    for h in args.hidden_sizes:
      for v in args.vocab_sizes:
        row: dict[str, Any] = {"tokens": n, "hidden": h, "vocab": v}
        row["fused loss only"] = compiled_memory(fused, n, h, v, dtype)
        for name, loss in programs(args).items():
          row[name] = compiled_memory(with_grad(loss), n, h, v, dtype)
        for fused_name, key in FUSED_RATIOS.items():
          row[key] = _ratio(
              row[fused_name]["temp_mib"], row["unfused"]["temp_mib"]
          )
        rows.append(row)
        print(
            f"  N={n:<5} H={h:<5} V={v:<7} temp MiB: fused"
            f" {row['fused']['temp_mib']:9.1f} (loss only"
            f" {row['fused loss only']['temp_mib']:.1f}; recompute"
            f" {row['fused (recompute)']['temp_mib']:.1f}), unfused"
            f" {row['unfused']['temp_mib']:9.1f}, obvious"
            f" {row['obvious']['temp_mib']:9.1f};"
            f" fused/unfused {row['fused_over_unfused']:.4f}"
            f" (recompute {row['recompute_over_unfused']:.4f})",
            flush=True,
        )
  return rows


def memory_summary(rows, args) -> dict[str, Any]:
  """The two memory ratios: fused / unfused at one V, and fused vs V."""
  at_ratio_vocab = [r for r in rows if r["vocab"] == args.ratio_vocab]
  by_shape: dict[tuple[int, int], list[dict]] = {}
  for r in rows:
    by_shape.setdefault((r["tokens"], r["hidden"]), []).append(r)
  growth = []
  for (n, h), group in by_shape.items():
    group = sorted(group, key=lambda r: r["vocab"])
    smallest, largest = group[0], group[-1]
    growth.append({
        "tokens": n, "hidden": h,
        "from_vocab": smallest["vocab"], "to_vocab": largest["vocab"],
        **{
            f"{key}_growth": _ratio(largest[name]["temp_mib"],
                                    smallest[name]["temp_mib"])
            for key, name in (("fused", "fused"),
                              ("fused_loss_only", "fused loss only"),
                              ("recompute", "fused (recompute)"),
                              ("unfused", "unfused"))
        },
    })
  summary: dict[str, Any] = {"ratio_vocab": args.ratio_vocab}
  for key in FUSED_RATIOS.values():
    ratios = [r[key] for r in at_ratio_vocab]
    summary[key] = {
        f"N={r['tokens']},H={r['hidden']}": r[key] for r in at_ratio_vocab
    }
    summary[f"worst_{key}"] = max(ratios) if ratios else None
  return {
      **summary,
      "target": MEMORY_RATIO_TARGET,
      "growth_with_vocab": growth,
  }


# ---------------------------------------------------------------------------
# Speed at a size that fits.
# ---------------------------------------------------------------------------


def timing(args) -> dict[str, Any]:
  n, h, v = args.time_tokens, args.time_hidden, args.time_vocab
  dtype = _common.DTYPES[args.time_dtype]
  rng = np.random.default_rng(0)
  hs, ht = (jnp.asarray(rng.standard_normal((n, h)), dtype) for _ in "st")
  ws, wt = (jnp.asarray(rng.standard_normal((h, v)) / np.sqrt(h), dtype)
            for _ in "st")
  runs, compile_s, values = {}, {}, {}
  for name, loss in programs(args).items():
    compiled, compile_s[name] = _common.compile_step(
        jax.jit(with_grad(loss)), hs, ws, ht, wt
    )
    values[name] = float(compiled(hs, ws, ht, wt)[0])
    runs[name] = (
        lambda c=compiled: jax.block_until_ready(c(hs, ws, ht, wt))
    )
    for _ in range(args.warmup):
      runs[name]()
  timings = _common.time_interleaved(runs, steps=args.steps,
                                     rounds=args.rounds)
  rows = []
  for name, t in timings.items():
    rows.append({
        "program": name,
        "compile_s": compile_s[name],
        "median_s": t.median_s,
        "min_s": t.min_s,
        "max_s": t.max_s,
        "calls": t.steps,
        "tokens_per_s": t.samples_per_s(n),
        "loss": values[name],
    })
    print(f"  {name:<17} {t.median_s * 1000:9.1f} ms/call"
          f" ({n / t.median_s:9.0f} tokens/s), loss {values[name]:.6f}",
          flush=True)
  speed = {r["program"]: r["tokens_per_s"]["median"] for r in rows}
  return {
      "tokens": n, "hidden": h, "vocab": v, "dtype": args.time_dtype,
      "rows": rows,
      "fused_over_unfused": speed["fused"] / speed["unfused"],
      "recompute_over_unfused": speed["fused (recompute)"] / speed["unfused"],
      "fused_over_obvious": speed["fused"] / speed["obvious"],
      "target": SPEED_RATIO_TARGET,
  }


# ---------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------


def _verdict(value: float | None, target: float, *, at_most: bool) -> str:
  if value is None:
    return "n/a"
  met = value <= target if at_most else value >= target
  return "met" if met else "NOT met"


def sections(rows, summary, speed, args) -> list[tuple[str, str]]:
  memory_table = _common.markdown_table(
      ["N", "H", "V", "fused", "fused (loss only)", "fused (recompute)",
       "unfused", "obvious", "fused / unfused", "recompute / unfused",
       "arguments", "gradients"],
      [
          [r["tokens"], r["hidden"], r["vocab"],
           f"{r['fused']['temp_mib']:.1f}",
           f"{r['fused loss only']['temp_mib']:.1f}",
           f"{r['fused (recompute)']['temp_mib']:.1f}",
           f"{r['unfused']['temp_mib']:.1f}",
           f"{r['obvious']['temp_mib']:.1f}",
           f"1/{1 / r['fused_over_unfused']:.0f}",
           f"1/{1 / r['recompute_over_unfused']:.0f}",
           f"{r['fused']['argument_mib']:.1f}",
           f"{r['fused']['output_mib']:.1f}"]
          for r in rows
      ],
  )
  growth_table = _common.markdown_table(
      ["N", "H", "V", "fused", "fused (loss only)", "fused (recompute)",
       "unfused"],
      [
          [g["tokens"], g["hidden"], f"{g['from_vocab']} -> {g['to_vocab']}",
           f"x{g['fused_growth']:.3f}", f"x{g['fused_loss_only_growth']:.3f}",
           f"x{g['recompute_growth']:.3f}", f"x{g['unfused_growth']:.2f}"]
          for g in summary["growth_with_vocab"]
      ],
  )
  speed_table = _common.markdown_table(
      ["program", "ms / call", "tokens / s (min-max)", "compile s", "loss"],
      [
          [r["program"], f"{1000 * r['median_s']:.1f}",
           _common.spread(r["tokens_per_s"]), f"{r['compile_s']:.1f}",
           f"{r['loss']:.6f}"]
          for r in speed["rows"]
      ],
  )
  ratio_lines = []
  for label, key in (("Fused", "fused_over_unfused"),
                     ("Fused (recompute)", "recompute_over_unfused")):
    missed = [k for k, r in summary[key].items() if r > summary["target"]]
    ratio_lines.append(
        f"- {label} / unfused temporary memory (loss and gradient) at V ="
        f" {summary['ratio_vocab']}: "
        + ", ".join(f"{k}: 1/{1 / r:.0f}" for k, r in summary[key].items())
        + f"; target <= 1/{1 / summary['target']:.0f}:"
        f" {_verdict(summary[f'worst_{key}'], summary['target'], at_most=True)}"
        + (f" at {', '.join(missed)}" if missed else "") + "."
    )
  ratio_lines += [
      "- Fused temporary memory vs V: growth factors "
      + ", ".join(f"N={g['tokens']},H={g['hidden']}: x{g['fused_growth']:.3f}"
                  f" (recompute x{g['recompute_growth']:.3f})"
                  for g in summary["growth_with_vocab"])
      + " (target: independent of V, x1).",
      f"- Tokens/s fused / unfused: {speed['fused_over_unfused']:.2f}"
      f" (target >= {speed['target']}:"
      f" {_verdict(speed['fused_over_unfused'], speed['target'], at_most=False)});"
      f" fused (recompute) / unfused: {speed['recompute_over_unfused']:.2f}"
      f" ({_verdict(speed['recompute_over_unfused'], speed['target'], at_most=False)});"
      f" fused / obvious: {speed['fused_over_obvious']:.2f}.",
  ]
  config = (
      f"Forward KL at T = {TEMPERATURE}, student and teacher of hidden size"
      f" H, mean over N tokens; each program computes the loss and its"
      f" gradient w.r.t. the student's hidden states and head (\"fused (loss"
      f" only)\": the loss without gradient). Fused chunks: token_chunk ="
      f" {args.token_chunk}, vocab_chunk = {args.vocab_chunk}. Memory: XLA's"
      f" compiled `memory_analysis()` for abstract {args.dtype} inputs"
      f" (`temp_size_in_bytes`, MiB: scratch space beyond arguments and"
      f" outputs; nothing is allocated). Speed: N = {speed['tokens']},"
      f" H = {speed['hidden']}, V = {speed['vocab']}, {speed['dtype']},"
      f" median of {args.rounds} interleaved rounds of {args.steps} calls."
  )
  return [
      ("", config),
      ("Ratios", "\n".join(ratio_lines)),
      ("Temporary memory (MiB)", memory_table),
      ("Growth of the temporary memory with V", growth_table),
      ("Speed", speed_table),
  ]


def main(argv: Sequence[str] | None = None) -> dict:
  args = parse_args(argv)
  env = _common.environment("benchmarks.fused_loss", argv)
  print("memory (compiled, abstract inputs):", flush=True)
  rows = memory_rows(args)
  summary = memory_summary(rows, args)
  print("speed:", flush=True)
  speed = timing(args)
  results = {"config": vars(args), "memory": rows, "memory_summary": summary,
             "speed": speed}
  out_dir = _common.RESULTS_DIR if args.publish else pathlib.Path(
      args.workdir
  )
  for _, body in sections(rows, summary, speed, args)[1:2]:
    print(body)
  return _common.finish(
      args, name=NAME, out_dir=out_dir,
      title="Fused output-layer loss: memory and speed",
      env=env, results=results, sections=sections(rows, summary, speed, args),
  )


if __name__ == "__main__":
  main(sys.argv[1:])
