"""Tests of the contrastive (CRD, queue form) loss against float64 NumPy."""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxkd import losses
from tests import helpers

BATCH, DIM, SIZE = 4, 5, 6


# Independent float64 reference, written from the formulas with explicit
# loops over anchors and negatives.
def np_normalize(x):
  x = np.asarray(x, np.float64)
  norm = np.sqrt(np.sum(x * x, axis=-1, keepdims=True))
  return np.where(norm > 0, x / np.where(norm > 0, norm, 1.0), 0.0)


def np_logsumexp(z):
  top = np.max(z)
  return top + np.log(np.sum(np.exp(z - top)))


def np_info_nce(anchor, positives, i, queue, valid, in_batch, temperature):
  logits = [anchor @ positives[i]]
  logits += [anchor @ q for q in queue if np.any(q != 0)]
  if in_batch:
    logits += [anchor @ positives[j] for j in range(len(positives))
               if j != i and valid[j]]
  logits = np.array(logits) / temperature
  return np_logsumexp(logits) - logits[0]


def np_crd(student, teacher, queue, temperature, in_batch=False, where=None):
  batch = student.shape[0]
  valid = np.ones(batch, bool) if where is None else np.asarray(where)
  s = np_normalize(np.where(valid[:, None], student, 0.0))
  t = np_normalize(np.where(valid[:, None], teacher, 0.0))
  q_s = np.asarray(queue.student, np.float64)
  q_t = np.asarray(queue.teacher, np.float64)
  per_anchor = []
  for i in range(batch):
    if not valid[i]:
      continue
    loss_s = np_info_nce(s[i], t, i, q_t, valid, in_batch, temperature)
    loss_t = np_info_nce(t[i], s, i, q_s, valid, in_batch, temperature)
    per_anchor.append((loss_s + loss_t) / 2)
  loss = np.mean(per_anchor) if per_anchor else 0.0
  new_student = np.concatenate([s, q_s])[: q_s.shape[0]]
  new_teacher = np.concatenate([t, q_t])[: q_t.shape[0]]
  return loss, losses.CRDQueue(new_student, new_teacher)


def make_inputs(rng, batch=BATCH, dim=DIM, size=SIZE, dtype=np.float64,
                empty_slots=2):
  student = rng.standard_normal((batch, dim)).astype(dtype)
  teacher = (student + 0.7 * rng.standard_normal((batch, dim))).astype(dtype)
  queue = np_normalize(rng.standard_normal((2, size, dim)))
  queue[:, size - empty_slots:] = 0.0  # empty slots at the old end
  queue = losses.CRDQueue(queue[0].astype(dtype), queue[1].astype(dtype))
  return student, teacher, queue


@pytest.mark.parametrize("in_batch", [False, True])
@pytest.mark.parametrize("temperature", [0.07, 0.5, 2.0])
def test_matches_float64_reference(x64, rng, in_batch, temperature):
  student, teacher, queue = make_inputs(rng)
  loss, new_queue = losses.crd_loss(
      student, teacher, queue, temperature=temperature,
      in_batch_negatives=in_batch,
  )
  expected, expected_queue = np_crd(
      student, teacher, queue, temperature, in_batch
  )
  assert loss.shape == () and loss.dtype == jnp.float64
  helpers.assert_close(loss, expected, rtol=1e-12)
  helpers.assert_close(tuple(new_queue), tuple(expected_queue), rtol=1e-12)


@pytest.mark.parametrize(
    "dtype, rtol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-5)]
)
def test_low_precision(rng, dtype, rtol):
  student, teacher, queue = make_inputs(rng, dtype=np.float32)
  student, teacher = jnp.asarray(student, dtype), jnp.asarray(teacher, dtype)
  loss, new_queue = losses.crd_loss(
      student, teacher, queue, in_batch_negatives=True
  )
  # 16-bit embeddings are computed in float32: float32-accurate for the
  # rounded inputs (temperature 0.07 amplifies rounding ~14x; still < 1e-5).
  assert loss.dtype == jnp.float32
  assert new_queue.student.dtype == jnp.float32
  expected, _ = np_crd(
      np.asarray(student, np.float64), np.asarray(teacher, np.float64),
      queue, 0.07, True,
  )
  helpers.assert_close(loss, expected, rtol=rtol)


def test_golden_values():
  # Orthogonal pairs at temperature 1: positive logit 1, negatives 0.
  student = jnp.array([[1.0, 0.0], [0.0, 2.0]])
  teacher = jnp.array([[3.0, 0.0], [0.0, 1.0]])
  empty = losses.init_crd_queue(3, 2)
  loss, _ = losses.crd_loss(student, teacher, empty, temperature=1.0)
  # Empty queue, no in-batch negatives: only the positive, -log 1 = 0.
  assert float(loss) == 0.0
  loss, _ = losses.crd_loss(
      student, teacher, empty, temperature=1.0, in_batch_negatives=True
  )
  np.testing.assert_allclose(float(loss), np.log1p(np.exp(-1.0)), rtol=1e-6)
  # Two queued negatives at logit 0 each, plus the in-batch one.
  queue = losses.CRDQueue(
      jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]),
      jnp.array([[0.0, 0.0], [0.0, -1.0], [-1.0, 0.0]]),
  )
  # Student anchor 0 against teacher queue: logits 1 | 0, -1; teacher anchor
  # 0 against student queue: 1 | 1, 0.
  loss, _ = losses.crd_loss(student, teacher, queue, temperature=1.0)
  e = np.e
  expected = (np.log1p((1 + 1 / e) / e) + np.log1p((e + 1) / e)) / 2
  np.testing.assert_allclose(float(loss), expected, rtol=1e-6)


def test_queue_is_fifo_newest_first(rng):
  student, teacher, queue = make_inputs(rng, batch=2, size=5, dtype=np.float32)
  _, first = losses.crd_loss(student, teacher, queue)
  s_norm, t_norm = np_normalize(student), np_normalize(teacher)
  helpers.assert_close(first.student[:2], s_norm, rtol=1e-6)
  helpers.assert_close(first.teacher[:2], t_norm, rtol=1e-6)
  # The old entries move back by the batch size; the oldest two drop out.
  np.testing.assert_array_equal(first.student[2:], queue.student[:3])
  np.testing.assert_array_equal(first.teacher[2:], queue.teacher[:3])
  _, second = losses.crd_loss(student[::-1] * 3, teacher[::-1], first)
  helpers.assert_close(second.student[:2], s_norm[::-1], rtol=1e-6)
  np.testing.assert_array_equal(second.student[2:], first.student[:3])


@pytest.mark.parametrize("batch", [6, 9])
def test_batch_at_least_queue_size(rng, batch):
  student, teacher, queue = make_inputs(rng, batch=batch, dtype=np.float32)
  _, new_queue = losses.crd_loss(student, teacher, queue)
  assert new_queue.student.shape == (SIZE, DIM)
  helpers.assert_close(new_queue.student, np_normalize(student)[:SIZE],
                       rtol=1e-6)
  helpers.assert_close(new_queue.teacher, np_normalize(teacher)[:SIZE],
                       rtol=1e-6)


def test_queue_keeps_dtype_and_gets_no_gradient(rng):
  student, teacher, queue = make_inputs(rng, dtype=np.float32)
  queue16 = losses.CRDQueue(*(jnp.asarray(q, jnp.bfloat16) for q in queue))
  loss, new_queue = losses.crd_loss(student, teacher, queue16)
  assert loss.dtype == jnp.float32
  assert new_queue.student.dtype == jnp.bfloat16
  assert new_queue.teacher.dtype == jnp.bfloat16
  # Gradients of a function of the new queue vanish: it is stop_gradient'ed.
  grads = jax.grad(
      lambda s, t: jnp.sum(losses.crd_loss(s, t, queue)[1].student),
      argnums=(0, 1),
  )(student, teacher)
  for g in grads:
    np.testing.assert_array_equal(g, 0.0)


def test_both_embeddings_get_gradient(rng):
  student, teacher, queue = make_inputs(rng, dtype=np.float32)
  grads = jax.grad(
      lambda s, t: losses.crd_loss(s, t, queue)[0], argnums=(0, 1)
  )(student, teacher)
  for g in grads:
    assert np.all(np.isfinite(g)) and np.any(g != 0)


def test_grads(x64, rng):
  student, teacher, queue = make_inputs(rng, batch=3, dim=4, size=4)
  check_grads(
      jax.jit(lambda s, t: losses.crd_loss(
          s, t, queue, temperature=0.5, in_batch_negatives=True
      )[0]),
      (student, teacher),
      order=2,
      modes=["rev"],
  )


def test_zero_rows_have_finite_gradients(rng):
  student, teacher, queue = make_inputs(rng, dtype=np.float32)
  student[1] = 0.0
  teacher[2] = 0.0
  fn = lambda s, t: losses.crd_loss(s, t, queue, in_batch_negatives=True)[0]
  helpers.assert_finite_value_and_grad(fn, student, teacher)
  _, new_queue = losses.crd_loss(student, teacher, queue)
  np.testing.assert_array_equal(new_queue.student[1], 0.0)


def test_jit_and_vmap(rng):
  student, teacher, queue = make_inputs(rng, dtype=np.float32)
  fn = functools.partial(
      losses.crd_loss, temperature=0.2, in_batch_negatives=True
  )
  helpers.assert_jit_matches_eager(fn, student, teacher, queue)
  # vmap over independent (embeddings, queue) groups equals a Python loop.
  groups = [make_inputs(rng, dtype=np.float32) for _ in range(3)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *groups)
  vmapped = jax.vmap(fn)(*stacked)
  looped = jax.tree.map(lambda *xs: jnp.stack(xs), *[fn(*g) for g in groups])
  helpers.assert_close(vmapped, looped, rtol=1e-6)


@pytest.mark.parametrize("in_batch", [False, True])
def test_where_matches_slicing(rng, in_batch):
  student, teacher, queue = make_inputs(rng, batch=5, dtype=np.float32)
  where = np.array([True, False, True, True, False])
  fn = functools.partial(losses.crd_loss, in_batch_negatives=in_batch)
  masked, masked_queue = fn(student, teacher, queue, where=jnp.asarray(where))
  sliced, _ = fn(student[where], teacher[where], queue)
  helpers.assert_close(masked, sliced, rtol=1e-6)
  # Every row is enqueued; masked rows as zeros (empty slots).
  np.testing.assert_array_equal(masked_queue.student[1], 0.0)
  np.testing.assert_array_equal(masked_queue.teacher[4], 0.0)
  expected, _ = np_crd(student, teacher, queue, 0.07, in_batch, where)
  helpers.assert_close(masked, expected, rtol=1e-5)


def test_where_blocks_nan_rows_and_all_masked_is_zero(rng):
  student, teacher, queue = make_inputs(rng, dtype=np.float32)
  student[1] = np.nan
  teacher[1] = np.inf
  where = jnp.array([True, False, True, True])
  value, grads = jax.value_and_grad(
      lambda s, t: losses.crd_loss(
          s, t, queue, in_batch_negatives=True, where=where
      )[0],
      argnums=(0, 1),
  )(student, teacher)
  assert np.isfinite(value)
  for g in grads:
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(g[1], 0.0)
  loss, _ = losses.crd_loss(
      student, teacher, queue, where=jnp.zeros(BATCH, bool)
  )
  assert float(loss) == 0.0


extreme_crd = jax.jit(
    lambda s, t, queue, temperature: losses.crd_loss(
        s, t, queue, temperature=temperature, in_batch_negatives=True
    )[0]
)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("temperature", [1e-3, 1.0, 1e3])
def test_extremes_are_finite(rng, dtype, temperature):
  student = jnp.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 5.0]], dtype)
  teacher = jnp.array([[-1e4, 1e4, 0.0], [-1e4, 1e4, -5.0]], dtype)
  queue = losses.init_crd_queue(4, 3, dtype=dtype, key=jax.random.key(0))
  # The temperature is an argument so that one compilation serves all three.
  helpers.assert_finite_value_and_grad(
      extreme_crd, student, teacher, queue, jnp.float32(temperature)
  )


def test_init_crd_queue():
  zeros = losses.init_crd_queue(5, 3)
  assert isinstance(zeros, losses.CRDQueue)
  assert zeros.student.shape == (5, 3) and zeros.student.dtype == jnp.float32
  np.testing.assert_array_equal(zeros.teacher, 0.0)
  rand = losses.init_crd_queue(5, 3, dtype=jnp.bfloat16, key=jax.random.key(1))
  assert rand.teacher.dtype == jnp.bfloat16
  norms = np.linalg.norm(np.asarray(rand.student, np.float64), axis=-1)
  np.testing.assert_allclose(norms, 1.0, rtol=1e-2)
  assert not np.allclose(rand.student, rand.teacher)


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(st.integers(0, 2**31 - 1), st.floats(0.05, 5.0))
def test_properties(seed, temperature):
  # Non-negative (the positive is one of the softmax terms) and invariant to
  # positive rescaling of the embeddings (they are normalised).
  with jax.enable_x64(True):
    rng = np.random.default_rng(seed)
    student, teacher, queue = make_inputs(rng)
    loss, _ = losses.crd_loss(
        student, teacher, queue, temperature=temperature,
        in_batch_negatives=True,
    )
    assert float(loss) >= 0.0
    scales = rng.uniform(0.1, 10.0, (BATCH, 1))
    scaled, _ = losses.crd_loss(
        student * scales, teacher * scales[::-1], queue,
        temperature=temperature, in_batch_negatives=True,
    )
    np.testing.assert_allclose(float(scaled), float(loss), rtol=1e-10)


QUEUE = losses.CRDQueue(jnp.zeros((3, 4)), jnp.zeros((3, 4)))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda s, t: losses.crd_loss(s, t[:, :3], QUEUE), ValueError,
         "same shape"),
        (lambda s, t: losses.crd_loss(s[0], t[0], QUEUE), ValueError,
         "student_embed"),
        (lambda s, t: losses.crd_loss(
            s, t, losses.CRDQueue(jnp.zeros((3, 5)), jnp.zeros((3, 5)))),
         ValueError, "queue"),
        (lambda s, t: losses.crd_loss(
            s, t, losses.CRDQueue(jnp.zeros((3, 4)), jnp.zeros((2, 4)))),
         ValueError, "queue.teacher"),
        (lambda s, t: losses.crd_loss(
            s, t, losses.CRDQueue(jnp.zeros(4), jnp.zeros(4))),
         ValueError, "queue.student"),
        (lambda s, t: losses.crd_loss(s, t, jnp.zeros((3, 4))), TypeError,
         "queue"),
        (lambda s, t: losses.crd_loss(s.astype(jnp.int32), t, QUEUE),
         TypeError, "student_embed"),
        (lambda s, t: losses.crd_loss(s, t, QUEUE, temperature=0.0),
         ValueError, "temperature"),
        (lambda s, t: losses.crd_loss(s, t, QUEUE, in_batch_negatives=1),
         TypeError, "in_batch_negatives"),
        (lambda s, t: losses.crd_loss(s, t, QUEUE, where=jnp.ones(3, bool)),
         ValueError, "where"),
        (lambda s, t: losses.init_crd_queue(0, 4), ValueError, "size"),
        (lambda s, t: losses.init_crd_queue(3, 2.0), TypeError, "dim"),
        (lambda s, t: losses.init_crd_queue(3, 2, dtype=jnp.int32),
         TypeError, "dtype"),
    ],
)
def test_bad_input_raises_at_trace_time(call, error, match):
  embeds = jnp.zeros((2, 4))
  with pytest.raises(error, match=match):
    jax.jit(call)(embeds, embeds)
