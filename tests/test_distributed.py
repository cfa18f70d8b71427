"""Tests of jaxkd.distributed that need one process only.

The two-process behaviour (a killed peer, the survivor's exit, the resume)
is tested in tests/test_faults_multihost.py.
"""

from __future__ import annotations

import inspect
import io
import time
import types

import jax
import pytest

from jaxkd import distributed


def test_jax_heartbeat_timeout_exceeds_twice_the_peer_timeout():
  for peer, expected in [(10.0, 25), (4.0, 13), (0.3, 6), (2.5, 10)]:
    assert distributed.jax_heartbeat_timeout(peer) == expected
    assert expected >= 2 * peer + 5


def test_the_time_outs_are_arguments_of_jax_distributed_initialize():
  # jax 0.10.2 and 0.12 both take these keywords (the oldest stack is tested
  # by CI with this same test).
  names = inspect.signature(jax.distributed.initialize).parameters
  for name in ("initialization_timeout", "heartbeat_timeout_seconds",
               "shutdown_timeout_seconds", "coordinator_bind_address"):
    assert name in names


def test_initialize_for_one_process_does_nothing():
  assert distributed.initialize("127.0.0.1:1", 1, 0) is False
  assert not jax.distributed.is_initialized()


@pytest.mark.parametrize("name", ["peer_timeout", "initialization_timeout",
                                  "shutdown_timeout"])
@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), True,
                                   "5"])
def test_initialize_rejects_bad_time_outs(name, value):
  with pytest.raises(ValueError, match=rf"`{name}` must be a positive finite"
                     rf" number of seconds, got {value!r}"):
    distributed.initialize("127.0.0.1:1", 2, 0, **{name: value})


def test_watch_peers_in_one_process_is_a_noop():
  stream = io.StringIO()
  with distributed.watch_peers(peer_timeout=0.01, stream=stream):
    time.sleep(0.05)
  assert stream.getvalue() == ""
  with pytest.raises(ZeroDivisionError):  # errors go through untouched
    with distributed.watch_peers():
      _ = 1 / 0
  with pytest.raises(ValueError, match=r"`peer_timeout` must be a positive"):
    with distributed.watch_peers(peer_timeout=-2):
      pass


def fake_heartbeat(count=3):
  """A `_Heartbeat` of process 0 of ``count``, without a thread or a client."""
  # pylint: disable-next=protected-access
  beat = object.__new__(distributed._Heartbeat)
  beat.me, beat.count, beat.peer_timeout = 0, count, 5.0
  beat.lock = distributed.threading.Lock()
  now = time.monotonic()
  beat.seen = {p: (None, now) for p in range(1, count)}
  beat.last_ok, beat.last_error = now, None
  return beat


def test_lost_names_the_silent_process_and_its_host():
  beat = fake_heartbeat()
  assert beat.lost(5.0) is None
  now = time.monotonic()
  beat.seen[2] = ("17 node-b pid 4242", now - 6.5)
  message = beat.lost(5.0)
  assert message.startswith("lost process 2 of 3 (node-b pid 4242): no"
                            " heartbeat for 6.")
  assert beat.lost(10.0) is None  # within a longer time-out
  beat.seen[1] = (None, now - 7.0)  # never seen: no host to name
  assert beat.lost(5.0).startswith("lost process 1 of 3: no heartbeat for 7.")


def test_lost_coordinator_comes_first(monkeypatch):
  beat = fake_heartbeat()
  beat.seen[1] = ("3 a pid 1", time.monotonic() - 9)
  beat.last_ok = time.monotonic() - 8
  beat.last_error = "JaxRuntimeError: UNAVAILABLE: connection refused"
  # pylint: disable-next=protected-access
  monkeypatch.setattr(distributed._jax_distributed, "global_state",
                      types.SimpleNamespace(coordinator_address="h:9"))
  message = beat.lost(5.0)
  assert message.startswith("lost the coordination service at h:9 (process 0)"
                            " for 8.")
  assert message.endswith(": JaxRuntimeError: UNAVAILABLE: connection refused")
