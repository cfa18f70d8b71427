"""Language models through the one engine: token batches, global token
normalisation, accumulation, multi-teacher targets, sparse cached teachers,
sequence-level and on-policy data."""

import contextlib
import io
import pathlib
import re
import sysconfig

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import ad_checkpoint
from jax.test_util import check_grads

import jaxkd
from jaxkd import lm
from jaxkd import losses
from jaxkd import models
from jaxkd import objective
from jaxkd import teachers as teachers_lib
from jaxkd.methods import lm as lm_methods

V = 32
B, L = 4, 9
STUDENT = models.from_linen(models.TransformerLM(
    vocab_size=V, num_layers=1, hidden_size=16, num_heads=2, mlp_dim=32),
    name="tiny_student")
# Widths 24 and 40 appear nowhere in the student: a residual of such a
# shape could only be a teacher activation.
TEACHER = models.from_linen(models.TransformerLM(
    vocab_size=V, num_layers=2, hidden_size=24, num_heads=2, mlp_dim=40),
    name="tiny_teacher")


def _tokens(seed=0, lengths=(9, 3, 9, 2)):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, V, size=(B, L)).astype(np.int32)
  mask = np.arange(L)[None, :] < np.asarray(lengths)[:, None]
  return {"tokens": jnp.asarray(np.where(mask, tokens, 0)),
          "mask": jnp.asarray(mask)}


def _teachers(k=1, seed=1):
  x = jnp.zeros((1, L), jnp.int32)
  params = [TEACHER.init(jax.random.key(seed + i), x)[0] for i in range(k)]
  return teachers_lib.TeacherGroup.create(TEACHER, params, strategy="scan")


def _distillation(terms, k=1, steps=1, optimizer=None, **kw):
  group, variables = _teachers(k)
  distillation = jaxkd.Distillation(
      student=kw.pop("student", STUDENT), objective=terms,
      optimizer=optimizer or optax.sgd(0.1),
      teachers=[kw.pop("group", group)], inputs="tokens", input_mask="mask",
      accumulation_steps=steps, **kw)
  return distillation, variables


def _log_softmax64(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


@jax.jit
def _logits(student_params, teacher_params, tokens, mask):
  x = {"tokens": tokens, "mask": mask}
  return (STUDENT.apply(student_params, {}, x, train=False, rng=None)[0],
          TEACHER.apply(teacher_params, {}, x, train=False, rng=None)[0])


def _direct_loss(state, variables, batch):
  """float64 NumPy: CE + forward KL, each summed over valid next tokens and
  divided by their count in the whole batch."""
  s, t = _logits(state.params["student"],
                 jax.tree.map(lambda a: a[0], variables.params),
                 batch["tokens"], batch["mask"])
  log_q, log_p = _log_softmax64(s)[:, :-1], _log_softmax64(t)[:, :-1]
  tokens, mask = np.asarray(batch["tokens"]), np.asarray(batch["mask"])
  valid = mask[:, :-1] & mask[:, 1:]
  nll = -np.take_along_axis(log_q, tokens[:, 1:, None], -1)[..., 0]
  kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
  n = valid.sum()
  return (nll * valid).sum() / n, (kl * valid).sum() / n, valid


TERMS = (lm_methods.NextTokenTerm(), lm_methods.TokenDivergenceTerm())


def test_token_batch_through_make_train_step_matches_direct_computation():
  distillation, variables = _distillation(TERMS)
  batch = _tokens()
  state = distillation.init(jax.random.key(0), batch, [variables])
  nll, kl, valid = _direct_loss(state, variables, batch)
  step = jaxkd.make_train_step(distillation, donate=False)
  new_state, metrics = step(state, batch)
  np.testing.assert_allclose(metrics["loss/next_token"], nll, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss/token_kd"], kl, rtol=1e-4)
  np.testing.assert_allclose(metrics["loss"], nll + kl, rtol=1e-5)
  assert int(new_state.step) == 1
  # The evaluation reports the same next-token loss (nats per token).
  eval_step = jaxkd.make_eval_step(distillation)
  summary = jaxkd.summarize([eval_step(state, batch)])
  np.testing.assert_allclose(summary["loss"], nll, rtol=1e-5)
  np.testing.assert_allclose(summary["kl_to_teachers"], kl, rtol=1e-4)
  assert summary["teacher_loss"][0] > 0 and 0 <= summary["accuracy"] <= 1


def test_global_token_normalisation_is_not_a_mean_of_sequence_means():
  rng = np.random.default_rng(3)
  per_token = rng.uniform(size=(B, L - 1))
  batch = _tokens()
  term = lm_methods.NextTokenTerm()
  mask = np.asarray(term.targets(batch).mask)
  global_mean = (per_token * mask).sum() / mask.sum()
  sequence_means = ((per_token * mask).sum(1) / mask.sum(1)).mean()
  np.testing.assert_allclose(
      lm.token_mean(jnp.asarray(per_token), jnp.asarray(mask)), global_mean,
      rtol=1e-6)
  assert abs(global_mean - sequence_means) > 1e-2
  assert float(term.token_count(batch)) == mask.sum() == 8 + 2 + 8 + 1


def test_accumulation_equals_unaccumulated_with_uneven_micro_batches():
  # Micro-batch i takes rows i, i + 2: rows (0, 2) hold 16 scored tokens,
  # rows (1, 3) hold 3.
  batch = _tokens(lengths=(9, 3, 9, 2))
  one, variables = _distillation(TERMS, steps=1)
  two, _ = _distillation(TERMS, steps=2, group=one.teachers[0])
  state = one.initial_state(jax.random.key(0), batch, [variables], None)
  key = jax.random.key(5)
  loss1, grads1, *_ = jax.jit(one._grads)(state, batch, key)
  loss2, grads2, *_ = jax.jit(two._grads)(state, batch, key)
  np.testing.assert_allclose(loss2, loss1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=2e-4, atol=1e-7), grads2, grads1)
  # Against the direct float64 loss too.
  nll, kl, _ = _direct_loss(state, variables, batch)
  np.testing.assert_allclose(loss2, nll + kl, rtol=1e-5)
  # A mean of micro-batch means would differ: the test can fail.
  means = [
      sum(_direct_loss(state, variables,
                       jax.tree.map(lambda a: a[i::2], batch))[:2])
      for i in range(2)
  ]
  assert abs(np.mean(means) - (nll + kl)) > 1e-3


def _outputs(student, teachers, batch):
  return objective.StepOutputs(
      student_logits=student, student_features={}, teacher_logits=teachers,
      teacher_features={}, labels=None, step=jnp.zeros((), jnp.int32),
      hparams={}, train=True, batch=batch)


@pytest.mark.parametrize("divergence,equal", [
    ("forward_kl", True), ("reverse_kl", False), ("jsd", False),
])
def test_mixture_and_mean_of_teachers_share_gradients_for_forward_kl_only(
    divergence, equal):
  keys = jax.random.split(jax.random.key(7), 2)
  student = 2 * jax.random.normal(keys[0], (B, L, V))
  teachers = 2 * jax.random.normal(keys[1], (3, B, L, V))
  batch = _tokens()
  weights = (0.5, 0.3, 0.2)

  def loss(reduction, z):
    term = lm_methods.TokenDivergenceTerm(
        divergence=divergence, teacher_reduction=reduction,
        teacher_weights=weights)
    return term.loss({}, {}, _outputs(z, teachers, batch))[0]

  mixture = jax.value_and_grad(lambda z: loss("mixture", z))(student)
  mean = jax.value_and_grad(lambda z: loss("mean", z))(student)
  # Values always differ (the Jensen gap for forward KL).
  assert abs(float(mixture[0]) - float(mean[0])) > 1e-3
  if equal:
    np.testing.assert_allclose(mixture[1], mean[1], atol=1e-6)
  else:
    assert float(jnp.max(jnp.abs(mixture[1] - mean[1]))) > 1e-4
  if divergence == "forward_kl":
    # float64 reference of the mixture target's value.
    log_p = _log_softmax64(teachers)[:, :, :-1]
    mix = np.log(np.einsum("k,kblv->blv", np.asarray(weights),
                           np.exp(log_p)))
    log_q = _log_softmax64(student)[:, :-1]
    valid = np.asarray(lm_methods.NextTokenTerm().targets(batch).mask)
    kl = (np.exp(mix) * (mix - log_q)).sum(-1)
    np.testing.assert_allclose(mixture[0], (kl * valid).sum() / valid.sum(),
                               rtol=1e-5)


def _sparse_reference(z, log_p, idx):
  log_q = _log_softmax64(z)
  p = np.exp(np.asarray(log_p, np.float64))
  top = np.take_along_axis(log_q, idx, -1)
  head = (p * (np.log(p) - top)).sum(-1)
  r = 1 - p.sum(-1)
  q_top = np.exp(top).sum(-1)
  return head + r * (np.log(r) - np.log1p(-q_top))


def test_sparse_tail_bucket_against_float64_and_dense_at_k_equal_v():
  keys = jax.random.split(jax.random.key(2), 2)
  z = jax.random.normal(keys[0], (3, 5, V))
  teacher = 2 * jax.random.normal(keys[1], (3, 5, V))
  for k in (1, 4, V - 1):
    log_p, idx = lm.top_k_log_probs(teacher, k)
    got = lm_methods.sparse_kl_with_tail(z, log_p, idx)
    np.testing.assert_allclose(
        got, _sparse_reference(z, log_p, np.asarray(idx)), rtol=2e-4,
        atol=1e-6)
  log_p, idx = lm.top_k_log_probs(teacher, V)
  dense = losses.kl_divergence(z, teacher)
  np.testing.assert_allclose(lm_methods.sparse_kl_with_tail(z, log_p, idx),
                             dense, rtol=1e-5, atol=1e-6)
  grad_sparse = jax.grad(lambda z: jnp.sum(
      lm_methods.sparse_kl_with_tail(z, log_p, idx)))(z)
  grad_dense = jax.grad(lambda z: jnp.sum(losses.kl_divergence(z, teacher)))(z)
  assert np.all(np.isfinite(grad_sparse))
  np.testing.assert_allclose(grad_sparse, grad_dense, atol=1e-5)
  log_p4, idx4 = lm.top_k_log_probs(teacher, 4)
  check_grads(
      lambda z: lm_methods.sparse_kl_with_tail(z, log_p4, idx4),
      (z,), order=1, modes=("rev",), atol=5e-2, rtol=5e-2)
  # A nan in the cache reaches the output.
  bad = log_p4.at[0, 0, 0].set(jnp.nan)
  assert np.isnan(lm_methods.sparse_kl_with_tail(z, bad, idx4)[0, 0])
  # The temperature tempers the cached teacher too, as the dense term does.
  np.testing.assert_allclose(
      lm_methods.sparse_kl_with_tail(z, log_p, idx, temperature=2.5),
      losses.kl_divergence(z, teacher, temperature=2.5), rtol=1e-5,
      atol=1e-6)
  # A masked token gives 0 whatever its cache entries hold.
  where = jnp.ones(z.shape[:-1], bool).at[0, 0].set(False)
  masked = lm_methods.sparse_kl_with_tail(z, bad, idx4, where=where)
  assert masked[0, 0] == 0
  np.testing.assert_allclose(
      masked[1:], lm_methods.sparse_kl_with_tail(z, log_p4, idx4)[1:])


def test_sparse_term_with_k_equal_v_equals_the_dense_term_in_the_engine():
  batch = _tokens()
  group, variables = _teachers()
  dense, _ = _distillation([lm_methods.TokenDivergenceTerm()], group=group)
  state = dense.init(jax.random.key(0), batch, [variables])
  x = {"tokens": batch["tokens"], "mask": batch["mask"]}
  teacher_logits = TEACHER.apply(
      jax.tree.map(lambda a: a[0], variables.params), {}, x, train=False,
      rng=None)[0]
  log_p, idx = lm.top_k_log_probs(teacher_logits, V)
  cached = {**batch, "teacher_topk_log_probs": log_p,
            "teacher_topk_indices": idx}
  sparse = jaxkd.Distillation(
      student=STUDENT, objective=[lm_methods.SparseTeacherTerm()],
      optimizer=optax.sgd(0.1), inputs="tokens", input_mask="mask",
      accumulation_steps=2)
  sparse_state = sparse.init(jax.random.key(0), cached)
  key = jax.random.key(1)
  loss_dense, g_dense, *_ = jax.jit(dense._grads)(state, batch, key)
  loss_sparse, g_sparse, *_ = jax.jit(sparse._grads)(sparse_state, cached,
                                                     key)
  np.testing.assert_allclose(loss_sparse, loss_dense, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-3, atol=1e-6), g_sparse["student"], g_dense["student"])


def test_fused_term_matches_the_dense_term_and_runs_skew_kl():
  student = lm_methods.with_output_kernel(STUDENT)
  teacher = lm_methods.with_output_kernel(TEACHER)
  x = jnp.zeros((1, L), jnp.int32)
  params = [TEACHER.init(jax.random.key(1 + i), x)[0] for i in range(2)]
  group, variables = teachers_lib.TeacherGroup.create(
      teacher, params, strategy="vmap")
  batch = _tokens()
  values = {}
  for name, term in {
      "dense": lm_methods.TokenDivergenceTerm(name="kd"),
      "fused": lm_methods.FusedDivergenceTerm(name="kd", token_chunk=8,
                                              vocab_chunk=12),
      "skew": lm_methods.FusedDivergenceTerm(name="kd", divergence="skew_kl",
                                             alpha=0.1),
  }.items():
    distillation, _ = _distillation([term], student=student, group=group)
    state = distillation.init(jax.random.key(0), batch, [variables])
    values[name] = jax.jit(distillation._grads)(state, batch,
                                                jax.random.key(1))[:2]
  np.testing.assert_allclose(values["fused"][0], values["dense"][0],
                             rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-3, atol=1e-6), values["fused"][1], values["dense"][1])
  # Skew KL is bounded by -log(alpha) and smaller than forward KL.
  assert 0 < float(values["skew"][0]) < float(values["dense"][0])


def _residual_shapes(fn, *args):
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    ad_checkpoint.print_saved_residuals(fn, *args)
  shapes = [tuple(int(d) for d in m.split(",") if d)
            for m in re.findall(r"\[([0-9,]*)\]", out.getvalue())]
  return shapes, out.getvalue()


@pytest.mark.parametrize("remat", [None, False])
def test_no_teacher_activation_is_saved_for_the_backward_pass(remat):
  distillation, variables = _distillation(TERMS, k=2, teacher_remat=remat)
  batch = _tokens()
  state = distillation.init(jax.random.key(0), batch, [variables])
  fn = lambda p: distillation.objective_value(
      p, state, batch, key=jax.random.key(0))[0]
  shapes, text = _residual_shapes(fn, state.params)
  assert shapes, text
  # Teacher widths (hidden 24, MLP 40, 2 stacked teachers of hidden width)
  # never appear; the teachers' logits [2, B, L, V] may (the loss's own
  # input), but no [.., 24] or [.., 40] activation.
  teacher_only = [s for s in shapes if 24 in s or 40 in s]
  assert not teacher_only, text
  # Nor are the stacked teachers' outputs [2, B, ...]: what remains of the
  # teachers is the divergence's own [B, L - 1, V] teacher probabilities.
  assert not [s for s in shapes if s[:2] == (2, B)], text


def test_a_few_steps_lower_the_loss_on_standard_library_text():
  path = pathlib.Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"
  data = np.frombuffer(path.read_bytes()[:4096], np.uint8).astype(np.int32)
  length = 33
  rows = data[: (data.size // length) * length].reshape(-1, length)
  student = models.from_linen(models.TransformerLM(
      vocab_size=256, num_layers=1, hidden_size=32, num_heads=2,
      mlp_dim=64), name="byte_student")
  distillation = jaxkd.Distillation(
      student=student, objective=[lm_methods.NextTokenTerm()],
      optimizer=optax.adam(3e-3), inputs="tokens")
  batch_of = lambda i: {"tokens": jnp.asarray(rows[(8 * i) % 96:][:8])}
  state = distillation.init(jax.random.key(0), batch_of(0))
  step = jaxkd.make_train_step(distillation)
  eval_step = jaxkd.make_eval_step(distillation)
  held_out = {"tokens": jnp.asarray(rows[96:112])}
  before = jaxkd.summarize([eval_step(state, held_out)])["loss"]
  for i in range(30):
    state, metrics = step(state, batch_of(i))
  after = jaxkd.summarize([eval_step(state, held_out)])["loss"]
  assert before > 5.0  # about log(256) = 5.55 at initialisation
  assert after < before - 1.0, (before, after)


def test_on_policy_mix_and_teacher_generations():
  batch = _tokens(lengths=(9, 9, 9, 9))
  params, state = STUDENT.init(jax.random.key(0), batch["tokens"])
  mix = jax.jit(lambda p, b, k, lam: lm_methods.on_policy_mix(
      STUDENT, p, {}, b, key=k, lam=lam, prompt_length=3))
  kept, used = mix(params, batch, jax.random.key(1), 0.0)
  assert float(used) == 0.0
  np.testing.assert_array_equal(kept["tokens"], batch["tokens"])
  np.testing.assert_array_equal(kept["prompt_mask"][0],
                                np.arange(L) < 3)
  fresh, used = mix(params, batch, jax.random.key(1), 1.0)
  assert float(used) == 1.0
  np.testing.assert_array_equal(fresh["tokens"][:, :3], batch["tokens"][:, :3])
  # The continuation is the student's own sample with the same key.
  _, sample_key = jax.random.split(jax.random.key(1))
  expected, _ = lm.sample(
      STUDENT, params, {}, batch["tokens"][:, :3], jnp.full((B,), 3),
      key=sample_key, max_new_tokens=L - 3)
  np.testing.assert_array_equal(fresh["tokens"], expected)
  # Only the continuation is scored.
  term = lm_methods.NextTokenTerm()
  assert float(term.token_count(fresh)) == B * (L - 3)
  # Sequence-level KD data: greedy teacher continuations of the prompts.
  group, variables = _teachers()
  teacher_params = jax.tree.map(lambda a: a[0], variables.params)
  generated = lm_methods.teacher_generations(
      TEACHER, teacher_params, {}, batch["tokens"][:, :4],
      key=jax.random.key(0), max_new_tokens=5, temperature=0.0)
  assert generated["tokens"].shape == (B, 9)
  logits = TEACHER.apply(teacher_params, {}, generated["tokens"],
                         train=False, rng=None)[0]
  np.testing.assert_array_equal(
      generated["tokens"][:, 4:], jnp.argmax(logits[:, 3:-1], -1))
  assert float(term.token_count(generated)) == B * 5
