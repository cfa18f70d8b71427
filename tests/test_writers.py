"""The run's logs survive: torn lines, full disks, resumed event files."""

from __future__ import annotations

import errno
import json
import logging
import pathlib

import pytest

from experiments import writers


def no_space(*args, **kwargs):
  del args, kwargs
  raise OSError(errno.ENOSPC, "No space left on device")


# -- metrics.jsonl -------------------------------------------------------------


def write_lines(path, *lines):
  path.write_text("".join(line + "\n" for line in lines))


def test_a_torn_last_line_is_dropped_with_a_warning(tmp_path, caplog):
  path = tmp_path / "metrics.jsonl"
  write_lines(path, '{"step": 1, "loss": 2.5}', '{"step": 2, "loss": 2.0}')
  with path.open("a") as f:
    f.write('{"step": 3, "lo')  # the process died mid-write
  log = writers.JsonlWriter(path)
  with caplog.at_level(logging.WARNING):
    records = log.truncate_after(5)
  assert records == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0}]
  assert "dropping its last line, cut short (15 characters)" in caplog.text
  assert str(path) in caplog.text
  # The file is clean again: the next start reads it without a warning.
  caplog.clear()
  log.write({"step": 3, "loss": 1.5})
  with caplog.at_level(logging.WARNING):
    assert [r["step"] for r in log.read()] == [1, 2, 3]
  assert not caplog.records


def test_an_unreadable_line_in_the_middle_is_skipped(tmp_path, caplog):
  path = tmp_path / "metrics.jsonl"
  write_lines(path, '{"step": 1}', "\x00\x00garbage", "[1, 2]", "",
              '{"step": 2}')
  with caplog.at_level(logging.WARNING):
    records = writers.JsonlWriter(path).read()
  assert records == [{"step": 1}, {"step": 2}]
  assert "skipping line 2, which is not a JSON object" in caplog.text
  assert "skipping line 3" in caplog.text
  assert len(caplog.records) == 2


def test_truncate_keeps_the_steps_up_to_the_checkpoint(tmp_path):
  path = tmp_path / "metrics.jsonl"
  log = writers.JsonlWriter(path)
  for step in range(1, 6):
    log.write({"step": step, "loss": float("nan") if step == 2 else 1.0})
  assert [r["step"] for r in log.truncate_after(3)] == [1, 2, 3]
  assert [json.loads(line)["step"] for line in
          path.read_text().splitlines()] == [1, 2, 3]
  assert log.read()[1]["loss"] == "nan"
  assert log.truncate_after(-1) == [] and path.read_text() == ""


def test_a_full_disk_while_appending_names_the_file(tmp_path, monkeypatch):
  path = tmp_path / "metrics.jsonl"
  log = writers.JsonlWriter(path)
  log.write({"step": 1})
  monkeypatch.setattr(pathlib.Path, "open", no_space)
  with pytest.raises(writers.LogWriteError) as info:
    log.write({"step": 2})
  monkeypatch.undo()
  assert info.value.errno == errno.ENOSPC
  assert str(info.value) == f"Cannot write {path}: No space left on device"
  assert log.read() == [{"step": 1}]


def test_a_full_disk_while_truncating_keeps_the_old_file(tmp_path,
                                                          monkeypatch):
  path = tmp_path / "metrics.jsonl"
  write_lines(path, '{"step": 1}', '{"step": 2}')
  before = path.read_bytes()
  monkeypatch.setattr(pathlib.Path, "write_text", no_space)
  with pytest.raises(writers.LogWriteError, match=f"Cannot write {path}"):
    writers.JsonlWriter(path).truncate_after(1)
  monkeypatch.undo()
  assert path.read_bytes() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


# -- TensorBoard ---------------------------------------------------------------


def scalars(logdir, tag):
  event_accumulator = pytest.importorskip(
      "tensorboard.backend.event_processing.event_accumulator")
  accumulator = event_accumulator.EventAccumulator(str(logdir))
  accumulator.Reload()
  return [(e.step, e.value) for e in accumulator.Scalars(tag)]


def test_events_are_read_by_tensorboard(tmp_path):
  events = writers.EventWriter(tmp_path)
  events.scalars(1, {"train/loss": 2.5, "flag": True, "name": "x"})
  events.scalars(2, {"train/loss": 2.0})
  events.scalars(3, {"only": "text"})  # nothing numeric: no event
  events.close()
  events.close()
  assert scalars(tmp_path, "train/loss") == [(1, 2.5), (2, 2.0)]


def test_a_resumed_run_purges_the_steps_it_writes_again(tmp_path):
  first = writers.EventWriter(tmp_path)
  for step in range(1, 6):  # checkpoint at 2; steps 3-5 then lost
    first.scalars(step, {"loss": float(step)})
  first.close()
  second = writers.EventWriter(tmp_path, purge_step=3)
  for step in range(3, 8):
    second.scalars(step, {"loss": 10.0 + step})
  second.close()
  assert len(list(tmp_path.iterdir())) == 2  # a new file, the old one kept
  assert scalars(tmp_path, "loss") == [
      (1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0), (5, 15.0), (6, 16.0),
      (7, 17.0)]


def test_a_full_disk_while_writing_events(tmp_path, monkeypatch):
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top

  events = writers.EventWriter(tmp_path)
  events.scalars(1, {"loss": 1.0})
  monkeypatch.setattr(record_writer.RecordWriter, "flush", no_space)
  with pytest.raises(writers.LogWriteError,
                     match=r"Cannot write .*events\.out\.tfevents\..*: No"
                           r" space left on device"):
    events.scalars(2, {"loss": 2.0})
  monkeypatch.undo()
  events.close()
  assert scalars(tmp_path, "loss")[0] == (1, 1.0)


def test_event_files_sort_in_the_order_they_were_made(tmp_path):
  # TensorBoard reads a directory's event files in name order; a purge
  # applies to the files read before it.
  made = []
  for _ in range(12):
    writer = writers.EventWriter(tmp_path)
    made.append(writer.path.name)
    writer.close()
  assert sorted(made) == made and len(set(made)) == 12
