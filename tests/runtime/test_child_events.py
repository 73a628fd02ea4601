"""The child holds a job's events and sends them in batches (``runtime.child.JobEvents``):
with the outcome, in one write, or once the oldest has waited ``EVENT_FLUSH_S``."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from runflow_worker.runtime import child
from runflow_worker.runtime import protocol as p
from runflow_worker.runtime.child import ChildEnd, JobEvents
from runflow_worker.runtime.runner import Runner
from runflow_worker.runtime.wire import Channel, FrameDecoder, decode_payload
from tests.fakes import HELD_EVENTS_CHILD
from tests.support.runners import job, runner_config

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def pair():
    mine, theirs = socket.socketpair()
    conn = ChildEnd(Channel(mine.detach(), recv_max_bytes=1 << 20, send_max_bytes=1 << 20))
    yield conn, theirs
    conn.close()
    theirs.close()


def _frames_waiting(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    try:
        return sock.recv(1 << 20)
    except BlockingIOError:
        return b""


def test_held_events_leave_with_the_outcome_in_one_write(pair) -> None:
    conn, parent = pair
    events = JobEvents(conn)
    for n in range(3):
        events.hold(p.NodeStarted("j1", str(n), "Node"))
    assert _frames_waiting(parent) == b""  # nothing written yet
    events.send_with(p.Done("j1", (), 0.0, None))
    data = _frames_waiting(parent)  # one write: all of it is there at once
    decoded = [p.child_message(decode_payload(payload))
               for payload in FrameDecoder(1 << 20).feed(data)]
    assert [type(m).__name__ for m in decoded] == ["NodeStarted"] * 3 + ["Done"]
    assert [m.node_id for m in decoded[:3]] == ["0", "1", "2"]


def test_held_events_are_sent_once_the_oldest_is_due(pair,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    conn, parent = pair
    events = JobEvents(conn)
    events.hold(p.NodeStarted("j1", "1", "Node"))
    events.send_due()
    assert _frames_waiting(parent) == b""  # not due yet
    monkeypatch.setattr(child, "EVENT_FLUSH_S", 0.0)
    events.send_due()
    assert _frames_waiting(parent) != b""


def test_a_long_jobs_events_reach_the_parent_while_it_runs(tmp_path: Path) -> None:
    runner = Runner(runner_config(tmp_path, entry=HELD_EVENTS_CHILD))
    try:
        runner.start()
        seen: list[p.JobEvent] = []
        asked = time.monotonic() + 20  # the fallback: the test ends either way

        def should_interrupt() -> bool:
            return bool(seen) or time.monotonic() > asked

        graph = {"1": {"class_type": "StandIn", "inputs": {}, "events": 2,
                       "until_interrupted": True}}
        outcome = runner.execute(job(tmp_path, graph), on_event=seen.append,
                                 should_interrupt=should_interrupt)
        # The job waited for the interrupt, which came only once the events had arrived:
        # the reader thread sent them while the job ran.
        assert [type(e) for e in seen] == [p.NodeStarted, p.NodeStarted]
        assert isinstance(outcome, p.Failed) and outcome.kind is p.FailureKind.INTERRUPTED
        assert time.monotonic() < asked

        quick: list[p.JobEvent] = []
        graph = {"1": {"class_type": "StandIn", "inputs": {}, "events": 3}}
        done = runner.execute(job(tmp_path, graph, job_id="j2"), on_event=quick.append)
        assert isinstance(done, p.Done)
        assert [e.node_id for e in quick] == ["0", "1", "2"]  # all before the outcome
    finally:
        runner.stop()
