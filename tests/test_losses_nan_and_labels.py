"""nan is never swallowed, and bad labels are never silent.

* A ``nan`` in any input makes the value of the affected example ``nan``
  (batch-level losses: the scalar), while the other examples keep exactly
  the value they have without it; an example masked out by ``where`` gives 0
  and no gradient whatever it holds.
* Integer labels outside ``[0, C)`` raise ``ValueError`` when concrete and
  make (only) their examples ``nan`` when traced; labels of the wrong shape
  raise ``ValueError`` naming ``labels``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import losses

B, C = 4, 5
LABELS = np.array([0, 3, 1, 4], np.int32)


def _teachers(t):
  return jnp.stack([t, t + 0.5, 2 * t])


# Per-example losses of a (student, teacher) pair, class axis last. Each
# takes (student, teacher, where) so the mask is traced too.
PER_EXAMPLE = {
    "kl_divergence": lambda s, t, w: losses.kl_divergence(s, t, where=w),
    "kd_loss": lambda s, t, w: losses.kd_loss(
        s, t, temperature=4.0, where=w),
    "soft_cross_entropy": lambda s, t, w: losses.soft_cross_entropy(
        s, t, where=w),
    "distillation_loss": lambda s, t, w: losses.distillation_loss(
        s, t, LABELS, temperature=4.0, alpha=0.9, where=w),
    "reverse_kl_divergence": lambda s, t, w: losses.reverse_kl_divergence(
        s, t, where=w),
    "jensen_shannon_divergence": (
        lambda s, t, w: losses.jensen_shannon_divergence(s, t, where=w)),
    "total_variation_distance": (
        lambda s, t, w: losses.total_variation_distance(s, t, where=w)),
    "dkd_loss": lambda s, t, w: losses.dkd_loss(s, t, LABELS, where=w),
    "multi_teacher_ensemble": lambda s, t, w: losses.multi_teacher_kd_loss(
        s, _teachers(t), temperature=2.0, where=w),
    "multi_teacher_logit": lambda s, t, w: losses.multi_teacher_kd_loss(
        s, _teachers(t), mode="logit", where=w),
    "multi_teacher_mean": lambda s, t, w: losses.multi_teacher_kd_loss(
        s, _teachers(t), reduction="mean", where=w),
    "perturbed_kd_loss": lambda s, t, w: losses.perturbed_kd_loss(
        s, t, jax.random.key(0), temperature=2.0, num_samples=2, where=w),
    "logit_regression_loss": lambda s, t, w: losses.logit_regression_loss(
        s, t, where=w),
    "teacher_free_kd_loss": lambda s, t, w: losses.teacher_free_kd_loss(
        s + t, LABELS, where=w),
}

# Batch-level losses of a feature pair: one scalar.
BATCH_LEVEL = {
    "rkd_distance_loss": losses.rkd_distance_loss,
    "rkd_angle_loss": losses.rkd_angle_loss,
    "pkt_loss": losses.pkt_loss,
    "similarity_preserving_loss": losses.similarity_preserving_loss,
}

# Feature-map losses, [B, H, W, C] inputs.
FEATURE_MAPS = {
    "hint_loss": losses.hint_loss,
    "hint_loss_cosine": functools.partial(losses.hint_loss, kind="cosine"),
    "attention_transfer_loss": losses.attention_transfer_loss,
    "nst_loss": losses.nst_loss,
}


def _pair(seed=0, shape=(B, C)):
  rng = np.random.default_rng(seed)
  return (
      rng.standard_normal(shape).astype(np.float32),
      rng.standard_normal(shape).astype(np.float32),
  )


@pytest.mark.parametrize("name", sorted(PER_EXAMPLE))
def test_nan_reaches_only_its_example(name):
  fn = jax.jit(PER_EXAMPLE[name])
  student, teacher = _pair()
  clean = np.asarray(fn(student, teacher, None))
  assert np.all(np.isfinite(clean))
  for side in ("student", "teacher"):
    poisoned = [student.copy(), teacher.copy()]
    poisoned[side == "teacher"][1, 2] = np.nan
    value = np.asarray(fn(*poisoned, None))
    assert np.isnan(value[1]), (side, value)
    keep = np.arange(B) != 1
    np.testing.assert_array_equal(value[keep], clean[keep])


@pytest.mark.parametrize("name", sorted(PER_EXAMPLE))
def test_masked_nan_example_gives_zero_and_no_gradient(name):
  fn = PER_EXAMPLE[name]
  student, teacher = _pair(1)
  student[1] = np.nan
  teacher[1, 0] = np.nan
  where = np.array([True, False, True, True])

  @jax.jit
  def value_and_grads(s, t, w):
    return jax.value_and_grad(
        lambda s, t: jnp.sum(fn(s, t, w)), argnums=(0, 1)
    )(s, t)

  value, grads = value_and_grads(student, teacher, where)
  assert np.isfinite(value)
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_array_equal(np.asarray(g)[1], 0.0)
  np.testing.assert_array_equal(
      np.asarray(jax.jit(fn)(student, teacher, where))[1], 0.0
  )


def test_one_nan_teacher_of_three_is_not_dropped():
  student, teacher = _pair(2)
  teachers = np.stack([teacher, teacher + 1, teacher - 1])
  teachers[2, 0, 1] = np.nan
  for kwargs in (
      {}, {"mode": "logit"}, {"reduction": "mean"},
      {"weights": np.array([1.0, 1.0, 0.0], np.float32)},
  ):
    value = np.asarray(losses.multi_teacher_kd_loss(student, teachers, **kwargs))
    assert np.isnan(value[0]), kwargs
    assert np.all(np.isfinite(value[1:])), kwargs


def test_nan_zero_versus_old_behaviour():
  # The cases that used to return 0 with a zero gradient.
  zeros, nans = jnp.zeros((2, 3)), jnp.full((2, 3), jnp.nan)
  assert np.all(np.isnan(losses.kd_loss(zeros, nans)))
  assert np.all(np.isnan(losses.dkd_loss(zeros, nans, jnp.array([0, 1]))))
  assert np.all(np.isnan(losses.distillation_loss(
      zeros, nans, jnp.array([0, 1]), temperature=2.0, alpha=1.0)))
  grad = jax.grad(lambda s: jnp.sum(losses.kd_loss(s, nans)))(zeros)
  assert not np.all(np.asarray(grad) == 0.0)


@pytest.mark.parametrize("side", [0, 1])
@pytest.mark.parametrize("name", sorted(BATCH_LEVEL))
def test_batch_losses_propagate_nan(name, side):
  fn = BATCH_LEVEL[name]
  student, teacher = _pair(3, shape=(5, 4))
  pair = [student, teacher]
  pair[side] = pair[side].copy()
  pair[side][2, 1] = np.nan
  assert np.isnan(fn(*pair))
  # Masking the example out recovers the loss of the others.
  where = np.arange(5) != 2
  masked = fn(*pair, where=where)
  np.testing.assert_allclose(
      masked, fn(student[where], teacher[where]), rtol=1e-6
  )


@pytest.mark.parametrize("side", [0, 1])
@pytest.mark.parametrize("name", sorted(FEATURE_MAPS))
def test_feature_map_losses_propagate_nan(name, side):
  fn = FEATURE_MAPS[name]
  rng = np.random.default_rng(4)
  pair = [rng.standard_normal((3, 4, 4, 2)).astype(np.float32)
          for _ in range(2)]
  pair[side][1, 0, 0, 0] = np.nan
  value = np.asarray(fn(*pair))
  assert np.any(np.isnan(value)), value


def test_other_losses_propagate_nan():
  x = np.ones((3, 4), np.float32)
  x[1, 2] = np.nan
  assert np.isnan(losses.batchnorm_statistics_loss(
      x, np.zeros(4, np.float32), np.ones(4, np.float32)))
  assert np.isnan(losses.dafl_activation_loss(x))
  assert np.isnan(losses.dafl_information_entropy_loss(x))
  assert np.isnan(losses.dafl_one_hot_loss(x)[1])
  assert np.isnan(losses.generator_loss(x)[1, 2])
  assert np.isnan(losses.discriminator_loss(x, x)[1, 2])


# ---------------------------------------------------------------------------
# Labels.

LABEL_LOSSES = {
    "distillation_loss": lambda s, t, y: losses.distillation_loss(
        s, t, y, temperature=2.0, alpha=0.5),
    "dkd_loss": lambda s, t, y: losses.dkd_loss(s, t, y),
    "teacher_free_kd_loss": lambda s, t, y: losses.teacher_free_kd_loss(s, y),
}


@pytest.mark.parametrize("name", sorted(LABEL_LOSSES))
@pytest.mark.parametrize("bad", [5, 10, -1, 1000])
def test_concrete_out_of_range_labels_raise(name, bad):
  fn = LABEL_LOSSES[name]
  student, teacher = _pair(5)
  labels = LABELS.copy()
  labels[2] = bad
  with pytest.raises(ValueError, match="labels"):
    fn(student, teacher, labels)
  with pytest.raises(ValueError, match="labels"):
    jax.jit(lambda s, t: fn(s, t, labels))(student, teacher)


@pytest.mark.parametrize("name", sorted(LABEL_LOSSES))
def test_traced_out_of_range_labels_make_only_their_examples_nan(name):
  fn = LABEL_LOSSES[name]
  student, teacher = _pair(6)
  labels = np.array([10, 3, -1, 1000], np.int32)
  value, grad = jax.jit(
      lambda s, t, y: jax.value_and_grad(lambda s: fn(s, t, y)[1])(s)
  )(student, teacher, labels)
  full = np.asarray(jax.jit(fn)(student, teacher, labels))
  assert np.all(np.isnan(full[[0, 2, 3]])), full
  clean = np.asarray(fn(student, teacher, LABELS))
  np.testing.assert_allclose(full[1], clean[1], rtol=1e-6)
  # The good example's gradient is untouched by its neighbours' labels.
  assert np.isfinite(value)
  assert np.all(np.isfinite(np.asarray(grad)))


@pytest.mark.parametrize("name", sorted(LABEL_LOSSES))
def test_traced_labels_of_masked_rows_are_ignored(name):
  student, teacher = _pair(7)
  labels = np.array([0, -1, 2, 99], np.int32)
  where = np.array([True, False, True, False])
  fns = {
      "distillation_loss": lambda s, t, y, w: losses.distillation_loss(
          s, t, y, temperature=2.0, alpha=0.5, where=w),
      "dkd_loss": lambda s, t, y, w: losses.dkd_loss(s, t, y, where=w),
      "teacher_free_kd_loss": lambda s, t, y, w: losses.teacher_free_kd_loss(
          s, y, where=w),
  }
  fn = fns[name]
  value, grad = jax.jit(jax.value_and_grad(
      lambda s, t, y, w: jnp.sum(fn(s, t, y, w))
  ))(student, teacher, labels, where)
  assert np.isfinite(value)
  assert np.all(np.isfinite(np.asarray(grad)))
  # Concrete labels of masked rows are not range-checked either.
  assert np.all(np.isfinite(np.asarray(fn(student, teacher, labels, where))))


@pytest.mark.parametrize("name", sorted(LABEL_LOSSES))
def test_labels_of_the_wrong_shape_raise(name):
  fn = LABEL_LOSSES[name]
  student, teacher = _pair(8)
  bad_shapes = [LABELS[:, None], LABELS[:3]]
  if name != "teacher_free_kd_loss":  # integer labels only (else TypeError)
    bad_shapes.append(np.zeros((B, C + 1), np.float32))
  for labels in bad_shapes:
    with pytest.raises(ValueError, match="labels"):
      fn(student, teacher, labels)
