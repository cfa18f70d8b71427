"""Tests of the offline teacher cache on tiny synthetic caches in tmp_path."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import lm

VOCAB, K = 50, 6


def _teacher_outputs(rng, batch=5, length=7):
  logits = 3 * rng.standard_normal((batch, length, VOCAB)).astype(np.float32)
  log_probs, ids = lm.top_k_log_probs(logits, K, temperature=2.0)
  return np.asarray(log_probs), np.asarray(ids)


def _write(directory, log_probs, ids, lengths=None, **kwargs):
  with lm.TeacherCacheWriter(directory, vocab_size=VOCAB, k=K,
                             **kwargs) as writer:
    writer.write_batch(log_probs, ids, lengths)
  return lm.TeacherCache(directory)


@pytest.mark.parametrize(
    "log_prob_dtype, relative", [("float16", 2.0**-11), ("bfloat16", 2.0**-8)]
)
def test_round_trip_equals_top_k_to_dtype_precision(
    tmp_path, rng, log_prob_dtype, relative
):
  log_probs, ids = _teacher_outputs(rng)
  lengths = np.array([7, 3, 1, 7, 5])
  cache = _write(tmp_path, log_probs, ids, lengths,
                 log_prob_dtype=log_prob_dtype, temperature=2.0)
  assert len(cache) == 5
  assert cache.metadata["num_tokens"] == lengths.sum()
  assert cache.metadata["temperature"] == 2.0
  for b, record in enumerate(cache.dataset()):
    n = lengths[b]
    assert record["indices"].dtype == np.int32
    assert record["log_probs"].dtype == np.float32
    np.testing.assert_array_equal(record["indices"], ids[b, :n])
    # Round to nearest in the 16-bit dtype: within half an ulp, and exactly
    # the value NumPy's (ml_dtypes') rounding gives.
    np.testing.assert_allclose(
        record["log_probs"], log_probs[b, :n], rtol=relative, atol=0
    )
    rounded = log_probs[b, :n].astype(jnp.dtype(log_prob_dtype))
    np.testing.assert_array_equal(
        record["log_probs"], rounded.astype(np.float32)
    )
  np.testing.assert_array_equal(cache[3]["indices"], ids[3])


def test_sizes_and_id_dtypes(tmp_path, rng):
  log_probs, ids = _teacher_outputs(rng)
  small = _write(tmp_path / "small", log_probs, ids)
  assert small.metadata["index_dtype"] == "uint16"
  assert small.bytes_per_token == K * (2 + 2)
  # The file adds an 8-byte header per record, ArrayRecord's framing (under
  # 100 bytes a record at group_size 1) and pads itself to 64 KiB blocks
  # (two blocks at least).
  tokens = small.metadata["num_tokens"]
  assert small.bytes_per_token < small.file_bytes_per_token
  assert small.file_bytes_per_token * tokens <= (
      small.bytes_per_token * tokens + 5 * 108 + 2 * 2**16
  )

  large_vocab = 70_000  # > 65536: ids need int32.
  big_ids = rng.integers(0, large_vocab, size=(4, K))
  big_ids[0, 0] = large_vocab - 1
  with lm.TeacherCacheWriter(tmp_path / "big", vocab_size=large_vocab,
                             k=K) as writer:
    writer.write(np.zeros((4, K), np.float32), big_ids)
  big = lm.TeacherCache(tmp_path / "big")
  assert big.metadata["index_dtype"] == "int32"
  assert big.bytes_per_token == K * (4 + 2)
  np.testing.assert_array_equal(big[0]["indices"], big_ids)


def test_minus_inf_and_bfloat16_inputs_survive(tmp_path):
  ids = np.array([[0, 1, 2, 3, 4, 5]])
  log_probs = jnp.array([[-0.5, -1.0, -2.0, -40.0, -jnp.inf, -jnp.inf]],
                        jnp.bfloat16)
  with lm.TeacherCacheWriter(tmp_path, vocab_size=VOCAB, k=K,
                             log_prob_dtype="bfloat16") as writer:
    writer.write(log_probs, ids)
  record = lm.TeacherCache(tmp_path)[0]
  np.testing.assert_array_equal(
      record["log_probs"], np.asarray(log_probs, np.float32)
  )


@pytest.mark.parametrize("shuffle", [False, True])
def test_reader_resumes_exactly(tmp_path, rng, shuffle):
  log_probs, ids = _teacher_outputs(rng, batch=9, length=3)
  cache = _write(tmp_path, log_probs, ids)

  def dataset():
    ds = cache.dataset()
    return ds.shuffle(seed=3) if shuffle else ds

  uninterrupted = [r["indices"] for r in dataset()]
  iterator = iter(dataset())
  for _ in range(4):
    next(iterator)
  state = json.loads(json.dumps(iterator.get_state()))  # Serialisable.
  resumed = iter(dataset())
  resumed.set_state(state)
  remaining = [r["indices"] for r in resumed]
  assert len(remaining) == 5
  for got, expected in zip(remaining, uninterrupted[4:]):
    np.testing.assert_array_equal(got, expected)
  if shuffle:
    order = [int(np.flatnonzero((ids[:, :, 0] == r[:, 0]).all(1))[0])
             for r in uninterrupted]
    assert sorted(order) == list(range(9)) and order != list(range(9))


def test_writer_errors(tmp_path):
  writer = lm.TeacherCacheWriter(tmp_path / "a", vocab_size=VOCAB, k=K)
  lp = np.zeros((3, K), np.float32)
  with pytest.raises(ValueError, match=r"`indices` must lie in \[0, 50\)"):
    writer.write(lp, np.full((3, K), VOCAB))
  with pytest.raises(ValueError, match=r"`indices` must have shape \[L, 6\]"):
    writer.write(lp[:, :2], np.zeros((3, 2), np.int32))
  with pytest.raises(ValueError, match="`log_probs` must have the shape"):
    writer.write(lp[:2], np.zeros((3, K), np.int32))
  with pytest.raises(TypeError, match="`indices` must be integer"):
    writer.write(lp, lp)
  with pytest.raises(ValueError, match="`lengths` must have shape"):
    writer.write_batch(lp[None], np.zeros((1, 3, K), np.int32), [3, 3])
  writer.close()
  with pytest.raises(ValueError, match="closed"):
    writer.write(lp, np.zeros((3, K), np.int32))
  with pytest.raises(FileExistsError, match="already holds a teacher cache"):
    lm.TeacherCacheWriter(tmp_path / "a", vocab_size=VOCAB, k=K)
  with pytest.raises(ValueError, match="`k`=51 exceeds `vocab_size`=50"):
    lm.TeacherCacheWriter(tmp_path / "b", vocab_size=VOCAB, k=51)
  with pytest.raises(ValueError, match="`log_prob_dtype` must be one of"):
    lm.TeacherCacheWriter(tmp_path / "b", vocab_size=VOCAB, k=K,
                          log_prob_dtype="float32")
  with pytest.raises(FileNotFoundError, match="metadata.json is missing"):
    lm.TeacherCache(tmp_path / "b")
