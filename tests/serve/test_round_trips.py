"""What one run costs in Redis round trips, counted on a real ``Worker``'s connections
(``tests/support/redis_count.py``): a change that adds a request to the run path shows here as
a count, never as a time.

A warm run is three round trips, all on the loop's thread: the read that delivers it, the
begin script (fencing token, ``running`` record and event) and the finalise script (the
progress events not written yet, the terminal record and event, the ack). When runs are
queued, the finalise script also reads the next entry, so each further run is two. What is
driven by time (a lease tick every quarter second, a batch of events once its oldest is
``BATCH_DELAY_S`` old) is turned off here by long periods, so the counts are exact.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runflow_worker.serve import keys
from runflow_worker.serve.daemon import Worker
from runflow_worker.serve.outcomes import Outcome
from tests.support.queue import events, graph, is_terminal, record, status_of, submit
from tests.support.redis_count import CommandLog, counting_client, describe
from tests.support.waiting import wait_for
from tests.support.workers import make_worker

QUIET_S = 3600.0
"""A lease tick or event batch period no test run reaches."""


def counted_worker(inprocess_worker: Any, redis_url: str, *, batch_delay_s: float = QUIET_S,
                   **overrides: Any) -> tuple[Any, CommandLog]:
    """An in-process worker whose Redis requests are recorded; no lease tick comes within a
    run, and events wait for the run's end unless ``batch_delay_s`` says otherwise."""
    log = CommandLog()

    def quiet(worker: Worker) -> None:
        worker.keeper.tick_s = QUIET_S
        worker.publisher.batch_delay_s = batch_delay_s
        log.name_scripts(store=worker.store, queue=worker.queue)

    w = inprocess_worker(client=counting_client(redis_url, log), before_start=quiet,
                         **{"lease_s": 600.0, **overrides})
    return w, log


def run_and_window(r: Any, log: CommandLog, run_id: str, g: dict[str, Any] | None = None
                   ) -> list[Any]:
    """Submit ``run_id``, wait for its terminal record and the loop's next read; return
    what it sent."""
    submit(r, run_id, g)
    wait_for(lambda: is_terminal(r, run_id), 30, f"{run_id} to finish")
    wait_for(lambda: log.next_read_sent(run_id), 10, "the loop's next read")
    return log.run_window(run_id)


def kinds(r: Any, run_id: str) -> list[tuple[str, str]]:
    """The run's events as (type, status), oldest first."""
    return [(e["type"], e["status"]) for e in events(r, run_id)]


@pytest.mark.timeout(60)
def test_a_warm_run_costs_three_round_trips(r, redis_server, inprocess_worker) -> None:
    _, log = counted_worker(inprocess_worker, redis_server.url)
    # The first run (it starts the child) too: the worker loaded its scripts at boot, so
    # no call is refused for a script Redis does not have yet.
    first = run_and_window(r, log, "first")
    assert [q.label for q in first] == ["XREADGROUP", "EVALSHA begin",
                                        "EVALSHA finalise"], describe(first)
    window = run_and_window(r, log, "warm")
    assert [q.label for q in window] == ["XREADGROUP", "EVALSHA begin",
                                         "EVALSHA finalise"], describe(window)
    assert len({q.thread for q in window}) == 1, describe(window)  # the loop's own
    # The progress events went with the terminal write, before its terminal event.
    assert kinds(r, "warm") == [("status", "queued"), ("status", "running"),
                                ("progress", ""), ("progress", ""), ("status", "succeeded")]
    progress = [e for e in events(r, "warm") if e["type"] == "progress"]
    assert [e["data"]["node_id"] for e in progress] == ["1", "9"]
    assert all(e["attempt"] == "1" and e["data"]["phase"] == "execute" for e in progress)


@pytest.mark.timeout(60)
def test_events_of_a_long_run_go_in_batches_before_its_terminal_event(
        r, redis_server, inprocess_worker) -> None:
    _, log = counted_worker(inprocess_worker, redis_server.url, batch_delay_s=0.0)
    window = run_and_window(r, log, "long", graph(sleep_s=0.3))
    run_thread = window[0].thread
    assert [q.label for q in window if q.thread == run_thread] == [
        "XREADGROUP", "EVALSHA begin", "EVALSHA finalise"], describe(window)
    batches = [q for q in window if q.thread != run_thread]
    assert batches and {q.label for q in batches} == {"EVALSHA publish"}, describe(window)
    got = kinds(r, "long")
    assert got[:2] == [("status", "queued"), ("status", "running")]
    assert got[-1] == ("status", "succeeded")
    assert set(got[2:-1]) == {("progress", "")}
    steps = [e["data"]["step"] for e in events(r, "long") if "step" in e["data"]]
    assert steps and steps == sorted(steps)


@pytest.mark.timeout(60)
def test_a_released_run_writes_its_last_events_with_the_release(r, redis_server,
                                                                inprocess_worker,
                                                                tmp_path: Path) -> None:
    # The test child writes its mark outside any sandbox.
    w, log = counted_worker(inprocess_worker, redis_server.url, sandbox="none")
    mark = tmp_path / "mark"
    submit(r, "stopped", graph(sleep_s=30, mark=mark, tag="stopped"))
    # The job reached the child: its node events are on their way, ahead of its outcome.
    wait_for(mark.exists, 20, "the run to execute")
    w.worker.shutdown.request_cold()
    wait_for(lambda: status_of(r, "stopped") == "queued", 20, "the release")
    w.thread.join(20)
    window = log.run_window("stopped")
    assert [q.label for q in window] == ["XREADGROUP", "EVALSHA begin",
                                         "EVALSHA release"], describe(window)
    got = kinds(r, "stopped")
    assert got[:2] == [("status", "queued"), ("status", "running")]
    assert got[-1] == ("status", "queued") and events(r, "stopped")[-1]["data"]["released"]
    assert got[2:-1] and set(got[2:-1]) == {("progress", "")}


@pytest.mark.timeout(60)
def test_queued_runs_cost_two_round_trips_each(r, redis_server, inprocess_worker) -> None:
    ids = [submit(r, f"queued-{n}") for n in range(3)]
    _, log = counted_worker(inprocess_worker, redis_server.url)
    for run_id in ids:
        wait_for(lambda run_id=run_id: is_terminal(r, run_id), 30, f"{run_id} to finish")
    wait_for(lambda: log.next_read_sent(ids[-1]), 10, "the last run's terminal write")
    windows = [log.run_window(run_id) for run_id in ids]
    # The first is read by the loop; each terminal write reads the next entry ahead.
    assert [q.label for q in windows[0]] == ["XREADGROUP", "EVALSHA begin",
                                             "EVALSHA finalise"], describe(windows[0])
    for window in windows[1:]:
        assert [q.label for q in window] == ["EVALSHA begin",
                                             "EVALSHA finalise"], describe(window)
    assert [record(r, i)["status"] for i in ids] == ["succeeded"] * 3
    started = [record(r, i)["started_at"] for i in ids]
    assert started == sorted(started)  # taken in queue order
    assert r.xpending(keys.runs_stream("cpu"), keys.CONSUMER_GROUP)["pending"] == 0


@pytest.fixture
def idle_worker(redis_server: Any, tmp_path: Path) -> Iterator[Worker]:
    """A worker whose loop is not started: the test drives ``perform_run`` itself, as the
    loop would (reading on after the run, no reclaim due)."""
    w = make_worker(redis_server.url, tmp_path, child_sandbox=False)
    w.queue.ensure_group()
    w.intake.reads_on, w.intake.next_reclaim_s = True, float("inf")
    yield w
    w._close()
    w.pipeline.close()


@pytest.mark.timeout(60)
def test_an_entry_read_ahead_is_given_back_when_the_loop_ends(r, idle_worker: Worker) -> None:
    submit(r, "done")
    submit(r, "next")
    delivery = idle_worker.queue.read_new(block_ms=None)
    assert delivery is not None
    assert idle_worker.perform_run(delivery) is Outcome.FINALISED
    ahead = idle_worker.intake.read_ahead
    assert ahead is not None and json.loads(ahead.payload or "{}")["run_id"] == "next"
    idle_worker.intake.give_back_read_ahead()  # what ``work`` does when its loop ends
    # Pending, expired at once and its delivery not counted: the next reclaim takes it.
    taken = idle_worker.queue.reclaim_expired()
    assert taken is not None and taken.entry_id == ahead.entry_id and taken.deliveries == 1
    assert status_of(r, "next") == "queued"


@pytest.mark.timeout(60)
def test_no_entry_is_read_ahead_once_a_stop_was_asked(r, idle_worker: Worker) -> None:
    submit(r, "done", graph(sleep_s=0.3))
    submit(r, "next")
    delivery = idle_worker.queue.read_new(block_ms=None)
    assert delivery is not None
    idle_worker.shutdown.request_warm(30.0)  # within the grace: the run finishes
    assert idle_worker.perform_run(delivery) is Outcome.FINALISED
    assert idle_worker.intake.read_ahead is None
    assert r.xpending(keys.runs_stream("cpu"), keys.CONSUMER_GROUP)["pending"] == 0
