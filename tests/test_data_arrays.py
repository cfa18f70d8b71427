"""Tests for jaxkd.data.make_array_loader: grain batches of in-memory arrays.

The second route to every batch is the permutation of its epoch written out
in NumPy; every row says which example it is (``image[i] == i``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxkd import data


def _arrays(n=10, classes=3, teachers=2):
  """Rows that say where they came from: image[i] == i, logits[k, i] == k, i."""
  index = np.arange(n)
  return {
      "image": np.broadcast_to(index[:, None, None, None],
                               (n, 2, 2, 1)).astype(np.float32),
      "label": (index % classes).astype(np.int32),
      "teacher_logits": (np.arange(teachers)[:, None, None] * 1000
                         + index[None, :, None]
                         + np.zeros((1, 1, classes))).astype(np.float32),
  }


def _loader(arrays, **kwargs):
  kwargs.setdefault("batch_size", 3)
  kwargs.setdefault("seed", 0)
  kwargs.setdefault("process_index", 0)
  kwargs.setdefault("process_count", 1)
  kwargs.setdefault("example_axis", {"teacher_logits": 1})
  return data.make_array_loader(arrays, **kwargs)


def _positions(batch):
  return batch["image"][:, 0, 0, 0].astype(int)


@pytest.mark.parametrize("n, batch_size, seed", [(10, 3, 0), (1438, 64, 7)])
def test_batches_follow_the_numpy_permutation_of_each_epoch(n, batch_size,
                                                            seed):
  # The reference, written out: epoch e is default_rng([seed, e]).permutation
  # cut into n // batch_size whole batches (the remainder left out).
  arrays = _arrays(n=n)
  loader = _loader(arrays, batch_size=batch_size, seed=seed)
  per_epoch = n // batch_size
  for t in range(3 * per_epoch + 1):
    epoch, within = divmod(t, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    rows = order[within * batch_size:(within + 1) * batch_size]
    batch = next(loader)
    np.testing.assert_array_equal(_positions(batch), rows)
    np.testing.assert_array_equal(batch["label"], arrays["label"][rows])


def test_every_epoch_is_a_fresh_permutation_of_all_examples():
  loader = _loader(_arrays(n=10), batch_size=5)
  positions = np.concatenate([_positions(next(loader)) for _ in range(8)])
  epochs = positions.reshape(4, 10)
  for epoch in epochs:
    assert sorted(epoch) == list(range(10))
  assert len({tuple(epoch) for epoch in epochs}) == 4
  again = _loader(_arrays(n=10), batch_size=5)
  np.testing.assert_array_equal(
      np.concatenate([_positions(next(again)) for _ in range(8)]), positions)
  other = _loader(_arrays(n=10), batch_size=5, seed=1)
  assert not np.array_equal(
      np.concatenate([_positions(next(other)) for _ in range(8)]), positions)


def test_rows_of_every_array_stay_together_along_their_example_axis():
  arrays = _arrays(n=10, classes=3, teachers=2)
  batch = next(_loader(arrays, batch_size=4))
  rows = _positions(batch)
  assert batch["teacher_logits"].shape == (2, 4, 3)
  np.testing.assert_array_equal(batch["label"], rows % 3)
  for k in range(2):
    np.testing.assert_array_equal(batch["teacher_logits"][k, :, 0],
                                  1000 * k + rows)


def test_resumes_exactly_from_a_json_state():
  loader = _loader(_arrays(n=10), batch_size=3)
  for _ in range(5):  # Across the first epoch boundary.
    next(loader)
  state = json.loads(json.dumps(loader.get_state()))
  expected = [_positions(next(loader)) for _ in range(7)]
  resumed = _loader(_arrays(n=10), batch_size=3)
  resumed.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(_positions(next(resumed)), want)


@pytest.mark.parametrize("change", [
    {"seed": 1}, {"batch_size": 2}, {"arrays": _arrays(n=11)},
    {"arrays": {**_arrays(n=10), "label": np.zeros(10, np.int64)}},
])
def test_a_state_from_other_arguments_is_refused(change):
  state = _loader(_arrays(n=10)).get_state()
  arrays = change.pop("arrays", _arrays(n=10))
  other = _loader(arrays, **change)
  with pytest.raises(ValueError, match="different arguments"):
    other.set_state(state)


def test_processes_share_each_global_batch():
  # Process i of P takes global positions i, i + P, ...: together the t-th
  # batches of both processes are the t-th batch of one process of 2 B.
  arrays = _arrays(n=12)
  whole = _loader(arrays, batch_size=4, process_count=1)
  parts = [_loader(arrays, batch_size=2, process_index=i, process_count=2)
           for i in range(2)]
  for _ in range(9):
    global_rows = _positions(next(whole))
    shards = [_positions(next(p)) for p in parts]
    np.testing.assert_array_equal(shards[0], global_rows[0::2])
    np.testing.assert_array_equal(shards[1], global_rows[1::2])


@pytest.mark.parametrize("arrays, kwargs, message", [
    ({}, {}, "`arrays` is empty"),
    ({"a": np.zeros(4), "b": np.zeros(5)}, {"example_axis": {}},
     "different numbers of examples"),
    ({"a": np.zeros(4)}, {"example_axis": {"b": 0}}, "names \\['b'\\]"),
    ({"a": np.zeros(4)}, {"example_axis": {"a": 1}},
     "`example_axis\\['a'\\]` is 1"),
    ({"a": np.zeros(4)}, {"example_axis": {}, "batch_size": 5},
     "larger than the 4 examples"),
    ({"a": np.zeros(4)}, {"example_axis": {}, "batch_size": 3,
                          "process_count": 2}, "x 2 processes"),
])
def test_bad_arguments_are_named(arrays, kwargs, message):
  with pytest.raises(ValueError, match=message):
    _loader(arrays, **kwargs)


def test_bad_types_are_named():
  with pytest.raises(TypeError, match="`batch_size` must be an int"):
    _loader(_arrays(), batch_size=2.0)
  with pytest.raises(ValueError, match="`seed` must be in"):
    _loader(_arrays(), seed=-1)
