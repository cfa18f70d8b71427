"""The compiled distillation step: routes to the same numbers, and training."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import evaluation
from jaxkd import losses
from jaxkd import objective
from jaxkd import sweep
from jaxkd import teachers
from jaxkd import train_step
from jaxkd.models import from_linen
from tests import helpers
from tests import tiny

STUDENT = from_linen(tiny.TinyCNN(width=4), name="student")
TEACHER = from_linen(tiny.TinyCNN(width=8), name="teacher")
KD = [objective.LabelTerm(weight=0.1),
      objective.LogitTerm(weight=0.9, temperature=4.0)]


def trained_teachers(k: int = 3):
  """K small teachers trained briefly on real digits (labels only)."""
  return tiny.trained_teachers(k, first_seed=100)


def teacher_group(k=3, strategy="auto"):
  params, states = trained_teachers(3)
  return teachers.TeacherGroup.create(
      TEACHER, params[:k], states[:k], strategy=strategy
  )


run = tiny.run_steps


def kd_setup(k: int, student=STUDENT):
  """K teachers, the KD spec over them (Adam 1e-2) and its first state."""
  group, variables = teacher_group(k)
  spec = train_step.Distillation(
      student=student, teachers=[group], objective=KD,
      optimizer=optax.adam(1e-2),
  )
  return spec, variables, spec.init(jax.random.key(0), BATCHES[0], [variables])


def assert_trains(history, key="loss"):
  first = np.mean([m[key] for m in history[:3]])
  last = np.mean([m[key] for m in history[-3:]])
  assert last < first, (first, last)
  assert all(m["nonfinite"] == 0 for m in history)


BATCHES = tiny.digit_batches(32, 12, seed=1)


@pytest.mark.parametrize("strategy", ["vmap", "scan", "unroll"])
def test_k3_strategies_equal_a_python_loop_of_teachers(strategy):
  group, variables = teacher_group(3, strategy)
  spec = train_step.Distillation(
      student=STUDENT, teachers=[group], objective=KD,
      optimizer=optax.sgd(0.1),
  )
  state, _ = run(spec, BATCHES[:3], [variables])
  # Second route: the teachers run one by one in Python, outside the step,
  # and their logits reach the same step as an offline cache.
  cached_spec = train_step.Distillation(
      student=STUDENT, objective=KD, optimizer=optax.sgd(0.1)
  )
  params, states = trained_teachers(3)
  cached = []
  for batch in BATCHES[:3]:
    logits = jnp.stack([
        TEACHER.apply(p, s, batch["image"], train=False, rng=None)[0]
        for p, s in zip(params, states)
    ])
    cached.append({**batch, "teacher_logits": logits})
  reference, _ = run(cached_spec, cached)
  helpers.assert_close(state.params, reference.params, rtol=1e-4, atol=1e-6)


def test_only_student_and_adaptors_change():
  group, variables = teacher_group(2)
  terms = KD + [objective.FeatureTerm(
      loss_fn=losses.hint_loss, student_feature="stage2",
      teacher_feature="stage2", adaptor="auto", name="hint")]
  spec = train_step.Distillation(
      student=STUDENT, teachers=[group], objective=terms,
      optimizer=optax.adam(1e-2),
  )
  start = spec.init(jax.random.key(0), BATCHES[0], [variables])
  before = jax.tree.map(np.array, start)
  state, _ = run(spec, BATCHES[:2], [variables])
  jax.tree.map(np.testing.assert_array_equal, state.teachers, before.teachers)
  changed = jax.tree.map(
      lambda a, b: not np.array_equal(a, b), state.params, before.params
  )
  assert all(jax.tree.leaves(changed["student"]))
  assert all(jax.tree.leaves(changed["terms"]["hint"]))
  # The optimiser state holds the student and the adaptor only.
  opt_params = jax.tree.structure(state.params)
  assert "teachers" not in str(opt_params)


@pytest.mark.parametrize(
    "name, terms, views",
    [
        ("hard labels on", KD, None),
        ("hard labels off", [objective.LogitTerm(temperature=4.0)], None),
        ("ensemble of logits",
         [objective.LogitTerm(teacher_reduction="ensemble_logits")], None),
        ("mean of per-teacher losses",
         [objective.LogitTerm(teacher_reduction="mean")], None),
        ("confidence weights",
         [objective.LogitTerm(teacher_reduction="confidence")], None),
        ("decoupled KD", [objective.LogitTerm(
            loss_fn=losses.dkd_loss, with_labels=True, name="dkd",
            kwargs={"alpha": 1.0, "beta": 8.0})], None),
        ("function matching with mixup", KD,
         train_step.Views(
             shared=lambda x, k: x + 0.05 * jax.random.normal(k, x.shape),
             mixup_alpha=0.4)),
        ("separate views", KD,
         train_step.Views(
             student=lambda x, k: x + 0.2 * jax.random.normal(k, x.shape))),
        ("perturbation-robust", KD,
         train_step.Views(teacher=functools.partial(
             losses.perturb_inputs, noise_scale=0.1))),
        ("attention transfer", [objective.LabelTerm(), objective.FeatureTerm(
            loss_fn=losses.attention_transfer_loss, student_feature="stage1",
            teacher_feature="stage1", weight=100.0, name="at")], None),
        ("similarity preserving", [objective.LabelTerm(),
                                   objective.FeatureTerm(
            loss_fn=losses.similarity_preserving_loss,
            student_feature="stage2", teacher_feature="stage2",
            weight=10.0, name="sp")], None),
        ("rkd + pkt on embeddings", [
            objective.LabelTerm(),
            objective.FeatureTerm(loss_fn=losses.rkd_distance_loss,
                                  name="rkd"),
            objective.FeatureTerm(loss_fn=losses.pkt_loss, name="pkt")],
         None),
        ("crd", [objective.LabelTerm(),
                 objective.CRDTerm(dim=16, queue_size=128)], None),
    ],
)
def test_option_trains_on_real_digits(name, terms, views):
  del name
  group, variables = teacher_group(2)
  spec = train_step.Distillation(
      student=STUDENT, teachers=[group], objective=terms,
      optimizer=optax.adam(1e-2), views=views or train_step.Views(),
  )
  _, history = run(spec, BATCHES, [variables])
  assert_trains(history)


def test_teacher_free_needs_no_teacher():
  spec = train_step.Distillation(
      student=STUDENT, objective=[objective.TeacherFreeTerm()],
      optimizer=optax.adam(1e-2),
  )
  assert not spec.needs_teachers
  _, history = run(spec, BATCHES)
  assert_trains(history)


def test_offline_cache_equals_online_and_top_k_trains():
  group, variables = teacher_group(2, "unroll")
  spec = train_step.Distillation(
      student=STUDENT, teachers=[group], objective=KD,
      optimizer=optax.sgd(0.1),
  )
  online, _ = run(spec, BATCHES[:3], [variables])
  logits_fn = jax.jit(lambda x: teachers.apply_teachers(group, variables,
                                                        x).logits)
  cached = [{**b, **train_step.cache_teacher_outputs(logits_fn(b["image"]))}
            for b in BATCHES]
  offline_spec = train_step.Distillation(
      student=STUDENT, objective=KD, optimizer=optax.sgd(0.1)
  )
  offline, _ = run(offline_spec, cached[:3])
  helpers.assert_close(offline.params, online.params, rtol=1e-5, atol=1e-7)
  top_k = [{**b, **train_step.cache_teacher_outputs(logits_fn(b["image"]),
                                                    top_k=3)}
           for b in BATCHES]
  _, history = run(offline_spec, top_k)
  assert_trains(history)


def test_expand_top_k_matches_scatter():
  logits = np.array([[3.0, -1.0, 2.0, 0.5]], np.float32)
  cached = train_step.cache_teacher_outputs(logits, top_k=2)
  full = train_step.expand_top_k(
      cached["teacher_topk_logits"], cached["teacher_topk_indices"], 4
  )
  np.testing.assert_array_equal(
      np.asarray(full), [[3.0, -np.inf, 2.0, -np.inf]]
  )


def test_born_again_student_becomes_the_next_teacher():
  spec = train_step.Distillation(
      student=STUDENT, objective=[objective.LabelTerm()],
      optimizer=optax.adam(1e-2),
  )
  first, _ = run(spec, BATCHES)
  group, variables = teachers.TeacherGroup.create(
      STUDENT, [first.params["student"]], [first.model_state["student"]],
      name="generation_1",
  )
  second_spec = train_step.Distillation(
      student=STUDENT, teachers=[group], objective=KD,
      optimizer=optax.adam(1e-2),
  )
  _, history = run(second_spec, BATCHES, [variables], key=1)
  assert_trains(history)


def test_gradient_accumulation_equals_the_full_batch():
  mlp = from_linen(tiny.TinyMLP(), name="mlp")
  teacher_mlp = from_linen(tiny.TinyMLP(width=32), name="teacher_mlp")
  tp, ts = teacher_mlp.init(jax.random.key(5), BATCHES[0]["image"])
  group, variables = teachers.TeacherGroup.create(teacher_mlp, [tp], [ts])
  states = []
  for steps in (1, 4):
    spec = train_step.Distillation(
        student=mlp, teachers=[group], objective=KD,
        optimizer=optax.sgd(0.5), accumulation_steps=steps,
    )
    states.append(run(spec, BATCHES[:3], [variables])[0])
  helpers.assert_close(states[0].params, states[1].params, rtol=1e-5,
                       atol=1e-7)


def test_mixed_precision_bfloat16_compute_float32_params():
  bf16_student = from_linen(tiny.TinyCNN(width=4, dtype=jnp.bfloat16))
  group, variables = teacher_group(1)
  spec = train_step.Distillation(
      student=bf16_student, teachers=[group], objective=KD,
      optimizer=optax.adam(1e-2),
  )
  state, history = run(spec, BATCHES, [variables])
  assert all(leaf.dtype == jnp.float32
             for leaf in jax.tree.leaves(state.params))
  assert history[0]["loss"].dtype == np.float32
  assert_trains(history)


def test_the_step_compiles_once():
  traces = []

  def counting_apply(*args, **kwargs):
    traces.append(1)
    return STUDENT.apply(*args, **kwargs)

  counted = from_linen(tiny.TinyCNN(width=4))
  counted = type(counted)(init=counted.init, apply=counting_apply,
                          name="counted")
  spec, _, state = kd_setup(2, student=counted)
  step = train_step.make_train_step(spec)
  traces.clear()
  for batch in BATCHES:
    state, _ = step(state, batch)
  assert len(traces) == 1


def test_donating_the_state_leaves_the_callers_teachers_intact():
  spec, variables, state = kd_setup(2)
  before = jax.tree.map(np.array, variables)
  step = train_step.make_train_step(spec)  # donates the state
  for batch in BATCHES[:2]:
    state, _ = step(state, batch)
  # The state's copy was donated and passed on; the caller's arrays live.
  assert not any(x.is_deleted() for x in jax.tree.leaves(variables))
  jax.tree.map(np.testing.assert_array_equal, variables, before)
  jax.tree.map(np.testing.assert_array_equal, state.teachers[0], before)
  # A second state from the same arrays works (the first one's step ran).
  other = spec.init(jax.random.key(1), BATCHES[0], [variables])
  step(other, BATCHES[0])


def test_nonfinite_loss_is_reported_and_skipped():
  spec, _, state = kd_setup(1)
  # A NaN weight (not bad data) makes the loss NaN.
  leaves, treedef = jax.tree.flatten(state.params)
  leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(jnp.nan)
  state = state.replace(params=jax.tree.unflatten(treedef, leaves))
  step = train_step.make_train_step(spec, donate=False)
  new_state, metrics = step(state, BATCHES[0])
  assert int(metrics["nonfinite"]) == 1 and int(metrics["bad_batch"]) == 0
  assert int(new_state.step) == 1
  jax.tree.map(np.testing.assert_array_equal, new_state.params, state.params)
  jax.tree.map(np.testing.assert_array_equal, new_state.opt_state,
               state.opt_state)
  # "apply" lets the update through (and poisons the parameters).
  applying = train_step.Distillation(
      student=STUDENT, teachers=spec.teachers, objective=KD,
      optimizer=optax.adam(1e-2), nonfinite="apply",
  )
  poisoned, metrics = train_step.make_train_step(applying, donate=False)(
      state, BATCHES[0])
  assert int(metrics["nonfinite"]) == 1
  assert not all(np.all(np.isfinite(x))
                 for x in jax.tree.leaves(poisoned.params))


@pytest.mark.parametrize("nonfinite", ["skip", "apply"])
def test_bad_batches_never_update_the_state_and_name_the_field(nonfinite):
  batch = BATCHES[0]
  cached = {**batch, "teacher_logits": jnp.zeros((1, 32, 10))}
  spec = train_step.Distillation(
      student=STUDENT, objective=KD, optimizer=optax.adam(1e-2),
      nonfinite=nonfinite)
  state = spec.init(jax.random.key(0), cached)
  step = train_step.make_train_step(spec, donate=False)
  labels = cached["label"]
  cases = {
      "label": [{**cached, "label": labels.at[3].set(v)}
                for v in (10, -1, 1000)],
      "image": [{**cached, "image": cached["image"].at[1, 2, 3, 0].set(v)}
                for v in (jnp.nan, jnp.inf)],
      "teacher_logits": [{**cached, "teacher_logits": cached[
          "teacher_logits"].at[0, 5, 2].set(v)} for v in (jnp.nan, jnp.inf)],
  }
  for field, bad_batches in cases.items():
    for bad in bad_batches:
      new, metrics = step(state, bad)
      assert int(metrics["bad_batch"]) == 1, field
      assert {k for k, v in metrics.items()
              if k.startswith("bad/") and int(v)} == {f"bad/{field}"}
      assert int(new.step) == 1
      jax.tree.map(np.testing.assert_array_equal, new.params, state.params)
      jax.tree.map(np.testing.assert_array_equal, new.opt_state,
                   state.opt_state)
  # -inf in cached teacher logits is a class of probability zero: fine.
  fine = {**cached, "teacher_logits": cached["teacher_logits"].at[
      0, :, 9].set(-jnp.inf)}
  new, metrics = step(state, fine)
  assert int(metrics["bad_batch"]) == 0 and int(metrics["nonfinite"]) == 0
  assert any(bool(np.any(a != b)) for a, b in zip(
      jax.tree.leaves(new.params), jax.tree.leaves(state.params)))


def test_sweep_equals_separate_runs():
  group, variables = teacher_group(1)
  terms = [objective.LabelTerm(weight=0.1),
           objective.LogitTerm(weight=objective.Hyper("alpha"),
                               temperature=objective.Hyper("temperature"))]
  spec = train_step.Distillation(
      student=STUDENT, teachers=[group], objective=terms,
      optimizer=optax.sgd(0.1),
  )
  settings = {"temperature": [1.0, 4.0, 8.0], "alpha": [0.9, 0.5, 0.9]}
  states = sweep.init_sweep(spec, jax.random.key(3), BATCHES[0], [variables],
                            hparams=settings)
  step = sweep.make_sweep_step(spec, donate=False)
  for batch in BATCHES[:3]:
    states, metrics = step(states, batch)
  assert metrics["loss"].shape == (3,)
  for i in range(3):
    one = {name: values[i] for name, values in settings.items()}
    state = spec.init(jax.random.fold_in(jax.random.key(3), i), BATCHES[0],
                      [variables], hparams=one)
    single = train_step.make_train_step(spec, donate=False)
    for batch in BATCHES[:3]:
      state, _ = single(state, batch)
    helpers.assert_close(sweep.select(states, i).params, state.params,
                         rtol=1e-4, atol=1e-6)


def test_eval_step_matches_numpy():
  spec, _, state = kd_setup(2)
  batch = {**BATCHES[0], "mask": jnp.arange(32) < 30}
  summary = evaluation.summarize([evaluation.make_eval_step(spec)(state,
                                                                  batch)])
  logits = np.asarray(STUDENT.apply(state.params["student"],
                                    state.model_state["student"],
                                    batch["image"], train=False, rng=None)[0],
                      np.float64)[:30]
  labels = np.asarray(batch["label"])[:30]
  assert summary["accuracy"] == pytest.approx(
      np.mean(np.argmax(logits, -1) == labels))
  log_p = logits - np.log(np.sum(np.exp(logits - logits.max(-1,
                                                               keepdims=True)),
                                 -1, keepdims=True)) - logits.max(-1,
                                                                  keepdims=True)
  assert summary["loss"] == pytest.approx(
      -np.mean(log_p[np.arange(30), labels]), rel=1e-5)
  assert len(summary["teacher_accuracy"]) == 2


def test_evaluate_weighs_batches_by_what_they_count():
  # Two batches, one of them padded: the mean is over the 32 + 5 counted
  # examples, not the mean of the two batch means.
  spec, _, state = kd_setup(2)
  batches = [BATCHES[0], {**BATCHES[1], "mask": jnp.arange(32) < 5}]
  summary = evaluation.evaluate(spec, state, batches)
  correct = []
  for batch, count in zip(batches, (32, 5)):
    logits = STUDENT.apply(state.params["student"],
                           state.model_state["student"], batch["image"],
                           train=False, rng=None)[0]
    correct.append(np.argmax(np.asarray(logits), -1)[:count]
                   == np.asarray(batch["label"])[:count])
  assert summary["accuracy"] == pytest.approx(np.mean(np.concatenate(correct)))
  assert summary == evaluation.summarize(
      [evaluation.make_eval_step(spec)(state, b) for b in batches])
  assert jaxkd.evaluate is evaluation.evaluate
  assert evaluation.evaluate(spec, state, []) == {}


def test_errors_before_any_step():
  group, variables = teacher_group(1)
  wide = from_linen(tiny.TinyCNN(width=4, num_classes=7))
  with pytest.raises(ValueError, match="teachers produce 10 classes"):
    train_step.Distillation(student=wide, teachers=[group], objective=KD,
                            optimizer=optax.sgd(0.1)).init(
                                jax.random.key(0), BATCHES[0], [variables])
  missing = [objective.FeatureTerm(student_feature="stage9", name="hint")]
  with pytest.raises(ValueError, match=r"stage9.*\['embedding', 'stage1'"):
    train_step.Distillation(student=STUDENT, teachers=[group],
                            objective=missing, optimizer=optax.sgd(0.1)).init(
                                jax.random.key(0), BATCHES[0], [variables])
  no_adaptor = [objective.FeatureTerm(student_feature="stage2",
                                      teacher_feature="stage2", name="hint")]
  with pytest.raises(ValueError, match="adaptor"):
    train_step.Distillation(student=STUDENT, teachers=[group],
                            objective=no_adaptor,
                            optimizer=optax.sgd(0.1)).init(
                                jax.random.key(0), BATCHES[0], [variables])
  hyper = [objective.LogitTerm(temperature=objective.Hyper("temperature"))]
  with pytest.raises(ValueError, match="hparams"):
    train_step.Distillation(student=STUDENT, teachers=[group], objective=hyper,
                            optimizer=optax.sgd(0.1)).init(
                                jax.random.key(0), BATCHES[0], [variables])
  with pytest.raises(ValueError, match="teacher variable sets"):
    train_step.Distillation(student=STUDENT, teachers=[group], objective=KD,
                            optimizer=optax.sgd(0.1)).init(
                                jax.random.key(0), BATCHES[0], [])
  with pytest.raises(ValueError, match="unique"):
    train_step.Distillation(student=STUDENT, objective=KD + KD,
                            optimizer=optax.sgd(0.1))


def test_the_same_step_trains_an_nnx_student():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jaxkd.models import from_nnx  # pylint: disable=g-import-not-at-top

  class NnxMLP(nnx.Module):

    def __init__(self, rngs):
      self.hidden = nnx.Linear(64, 16, rngs=rngs)
      self.norm = nnx.BatchNorm(16, momentum=0.9, rngs=rngs)
      self.out = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
      h = nnx.relu(self.norm(self.hidden(x.reshape(x.shape[0], -1))))
      return self.out(h), {"embedding": h}

  group, variables = teacher_group(1)
  spec = train_step.Distillation(
      student=from_nnx(NnxMLP, name="nnx_mlp"), teachers=[group],
      objective=KD, optimizer=optax.adam(1e-2),
  )
  state, history = run(spec, BATCHES, [variables])
  assert_trains(history)


def test_invalid_temperatures_and_weights_are_refused_when_built():
  with pytest.raises(ValueError, match="`temperature` of term 'kd'"):
    objective.LogitTerm(losses.kd_loss, temperature=-1.0)
  with pytest.raises(ValueError, match="`temperature`"):
    objective.LogitTerm(losses.kd_loss, temperature=0)
  with pytest.raises(ValueError, match="`weight` of term 'labels'"):
    objective.LabelTerm(weight=float("nan"))
  with pytest.raises(ValueError, match="at step 1000"):
    objective.LogitTerm(temperature=lambda step: 4.0 - step / 250)
  with pytest.raises(TypeError, match="`temperature`"):
    objective.LogitTerm(temperature="4")


def test_a_traced_invalid_temperature_is_nan_and_named_in_the_metrics():
  batch = tiny.digit_batches(16, 1, seed=3)[0]
  batch = {**batch, "teacher_logits": jnp.zeros((1, 16, 10))}
  spec = train_step.Distillation(
      student=STUDENT,
      objective=[objective.LabelTerm(),
                 objective.LogitTerm(temperature=objective.Hyper("t"))],
      optimizer=optax.sgd(0.1))
  step = train_step.make_train_step(spec, donate=False)
  for value, bad in ((4.0, 0), (-1.0, 1), (0.0, 1), (float("nan"), 1)):
    state = spec.init(jax.random.key(0), batch, hparams={"t": value})
    new, metrics = step(state, batch)
    assert int(metrics["invalid/kd.temperature"]) == bad
    assert int(metrics["invalid/labels.weight"]) == 0
    assert bool(np.isnan(metrics["loss"])) == bool(bad)
    assert int(metrics["nonfinite"]) == bad
    if bad:  # The default policy leaves the state alone.
      jax.tree.map(np.testing.assert_array_equal, new.params, state.params)


def test_label_term_refuses_labels_of_the_wrong_shape():
  # [B, 1] labels once broadcast into [B, B, C] and trained to chance.
  batch = tiny.digit_batches(16, 1, seed=4)[0]
  spec = train_step.Distillation(
      student=STUDENT, objective=[objective.LabelTerm()],
      optimizer=optax.sgd(0.1))
  bad = {**batch, "label": batch["label"][:, None]}
  with pytest.raises(ValueError, match="`labels` must have the per-example shape"):
    spec.init(jax.random.key(0), bad)
