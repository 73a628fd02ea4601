"""Reclaim scans: resumed from the saved cursor, they wrap around the pending list once, so
``serve --burst`` never exits while an expired entry is left (SPEC §2)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from runflow_worker.serve import keys
from runflow_worker.serve.daemon import Worker
from runflow_worker.serve.queue import RunQueue
from tests.support.queue import graph, is_terminal, submit
from tests.support.workers import InProcessWorker, make_worker

pytestmark = pytest.mark.timeout(60)

EXPIRED_MS = 60_000


def _pending_for_ghost(r, n: int) -> list[str]:
    """``n`` entries read by a consumer that then died (nothing expired yet)."""
    stream = keys.runs_stream("cpu")
    ids = [r.xadd(stream, {keys.RUN_FIELD: "{}"}) for _ in range(n)]
    r.xreadgroup(keys.CONSUMER_GROUP, "ghost", {stream: ">"}, count=n)
    return ids


def _expire(r, entry_id: str) -> None:
    r.xclaim(keys.runs_stream("cpu"), keys.CONSUMER_GROUP, "ghost", 0, [entry_id],
             idle=EXPIRED_MS, justid=True)


def test_a_scan_resumed_mid_list_wraps_around_to_the_entries_before_it(r) -> None:
    queue = RunQueue(r, "cpu", "burst-worker", lease_s=30.0)
    queue.ensure_group()
    first, second, third = _pending_for_ghost(r, 3)
    _expire(r, second)
    got = queue.reclaim_expired()
    assert got is not None and got.entry_id == second
    assert queue._reclaim_cursor == third  # the next scan resumes after the reclaimed one
    _expire(r, first)  # expires behind the cursor
    got = queue.reclaim_expired()
    assert got is not None and got.entry_id == first
    # A whole turn finds nothing else: the third entry is still live.
    assert queue.reclaim_expired() is None
    _expire(r, third)
    got = queue.reclaim_expired()
    assert got is not None and got.entry_id == third


def test_a_wrapped_scan_stops_where_it_began(r, monkeypatch) -> None:
    # 100 live entries, the scan resuming at the 6th: the first leg reads entries 5..99,
    # the wrap reads from the head; once its cursor passes entry 5 everything was seen.
    queue = RunQueue(r, "cpu", "burst-worker", lease_s=30.0)
    queue.ensure_group()
    ids = _pending_for_ghost(r, 100)
    calls: list[str] = []
    xautoclaim = r.xautoclaim

    def counted(*args, **kwargs):
        reply = xautoclaim(*args, **kwargs)
        calls.append(reply[0])
        return reply

    monkeypatch.setattr(r, "xautoclaim", counted)
    queue._reclaim_cursor = ids[5]
    assert queue.reclaim_expired() is None
    # The wrap stops once its cursor reaches the start: far fewer calls than a second full
    # pass (how many entries one XAUTOCLAIM call looks at is Redis's own business).
    def position(entry_id: str) -> tuple[int, ...]:
        return tuple(int(part) for part in entry_id.split("-"))

    assert position(calls[-1]) >= position(ids[5])
    first_leg = calls.index("0-0") + 1
    assert len(calls) - first_leg <= max(1, first_leg // 2)
    calls.clear()
    _expire(r, ids[3])  # found by the next scan, which resumes at ids[10] and wraps
    got = queue.reclaim_expired()
    assert got is not None and got.entry_id == ids[3]


def _worker(redis_server, tmp_path: Path, *, idle_exit_s: float) -> Worker:
    """A worker not started yet (its queue can be inspected or wrapped first)."""
    return make_worker(redis_server.url, tmp_path, child_sandbox=True, lease_s=30.0,
                       idle_exit_s=idle_exit_s)


def test_burst_reclaims_every_expired_entry_before_exiting(r, redis_server, tmp_path: Path
                                                          ) -> None:
    ids = [submit(r, f"orphan-{i}", graph()) for i in range(4)]
    stream = keys.runs_stream("cpu")
    entries = [entry_id for entry_id, _ in r.xrange(stream)]
    r.xgroup_create(stream, keys.CONSUMER_GROUP, id="0")
    r.xreadgroup(keys.CONSUMER_GROUP, "ghost", {stream: ">"}, count=4)
    _expire(r, entries[0])
    _expire(r, entries[1])  # the last two stay live (their holder's lease runs)
    worker = _worker(redis_server, tmp_path, idle_exit_s=0.0)
    # As after earlier reclaims in this process: the saved cursor is past the expired ones.
    worker.queue._reclaim_cursor = entries[2]
    w = InProcessWorker(worker, burst=True)
    try:
        w.thread.join(40)
        assert not w.thread.is_alive() and w.exit_code == 0
    finally:
        w.stop()
    assert [is_terminal(r, run_id) for run_id in ids] == [True, True, False, False]
    pending = r.xpending_range(stream, keys.CONSUMER_GROUP, min="-", max="+", count=10)
    assert [(p["message_id"], p["consumer"]) for p in pending] == [
        (entries[2], "ghost"), (entries[3], "ghost")]


def test_idle_exit_first_takes_a_run_released_back_to_the_queue(r, redis_server,
                                                                 tmp_path: Path) -> None:
    # A stopping sibling releases its run (entry pending, idle past the lease) after this
    # worker's periodic reclaim: the run is queued, so the worker must serve it before it
    # exits to scale to zero.
    run_id = submit(r, "released", graph())
    stream = keys.runs_stream("cpu")
    r.xgroup_create(stream, keys.CONSUMER_GROUP, id="0")
    (entry_id, _), = r.xreadgroup(keys.CONSUMER_GROUP, "sibling", {stream: ">"}, count=1)[0][1]
    worker = _worker(redis_server, tmp_path, idle_exit_s=2.0)
    first_reclaim = threading.Event()
    released = threading.Event()
    reclaim = worker.queue.reclaim_expired

    def first_reclaim_waits_for_the_release():
        found = reclaim()
        if not first_reclaim.is_set():
            # The periodic reclaim found nothing; the worker now waits (in this call) until
            # the sibling has released its run, so however slow this test thread is, the
            # release comes before the idle window can end: no timing decides the outcome.
            first_reclaim.set()
            assert released.wait(30)
        return found

    worker.queue.reclaim_expired = first_reclaim_waits_for_the_release  # type: ignore[method-assign]
    w = InProcessWorker(worker)
    try:
        assert first_reclaim.wait(20)
        r.xclaim(stream, keys.CONSUMER_GROUP, "sibling", 0, [entry_id], idle=EXPIRED_MS,
                 retrycount=0, justid=True)  # what a release does
        released.set()
        w.thread.join(40)
        assert not w.thread.is_alive() and w.exit_code == 0
    finally:
        w.stop()
    assert is_terminal(r, run_id)
    assert r.xpending(stream, keys.CONSUMER_GROUP)["pending"] == 0
