r"""Byte-level LM distillation on the Python standard library's sources.

  python -m experiments.lm --config=experiments/configs/lm_stdlib.py \
      --workdir=runs/lm_stdlib [--publish]

A teacher (and a second one for the mixture) is trained on next-byte
prediction, then a baseline student and one distilled student per method,
each over ``seeds``; validation and test bits per byte are reported as mean
+- std. Expected runtime: about 15 minutes on 2 CPU cores (see
``experiments/results/lm_stdlib.md`` for the measured time and load).
``:runlocal`` shrinks everything to a smoke test of seconds (never
published).
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common

METHODS = ("baseline", "forward_kl", "reverse_kl", "jsd", "skew_kl",
           "sparse_topk", "mixture", "gkd")


def _model(layers: int, width: int, heads: int, mlp: int):
  return ml_collections.ConfigDict(dict(
      num_layers=layers, hidden_size=width, num_heads=heads, mlp_dim=mlp))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, runlocal=False)
  config = ml_collections.ConfigDict()
  config.runlocal = args.runlocal
  config.split_seed = 0
  config.split_fractions = (0.05, 0.05)  # validation, test (by file)
  config.max_train_bytes = 0  # 0: every train file
  config.seq_len = 128
  config.batch_size = 16
  config.seeds = (0, 1, 2)
  config.methods = METHODS
  config.teacher = _model(3, 96, 4, 256)
  config.student = _model(1, 48, 4, 128)
  config.teacher_steps = 500
  config.student_steps = 200
  config.learning_rate = 3e-3
  config.warmup_steps = 20
  config.grad_clip_norm = 1.0
  config.eval_every = 50
  config.eval_windows = 64  # validation and test windows of seq_len bytes
  # Distillation: ce_weight * CE + kd_weight * divergence.
  config.ce_weight = 0.5
  config.kd_weight = 0.5
  config.temperature = 1.0
  config.jsd_beta = 0.5
  config.skew_alpha = 0.1
  config.top_k = 8
  config.gkd_lambda = 0.5
  config.gkd_new_tokens = 16
  config.gkd_divergence = "jsd"
  if args.runlocal:
    config.max_train_bytes = 200_000
    config.seq_len = 24
    config.batch_size = 4
    config.seeds = (0, 1)
    # Three methods cover the three kinds of step (plain, cached sparse
    # teacher, on-policy samples); compilation dominates a smoke test.
    config.methods = ("baseline", "sparse_topk", "gkd")
    config.teacher = _model(1, 16, 2, 32)
    config.student = _model(1, 8, 2, 16)
    config.teacher_steps = 6
    config.student_steps = 4
    config.eval_every = 2
    config.eval_windows = 4
    config.gkd_new_tokens = 4
    config.top_k = 4
  return config
