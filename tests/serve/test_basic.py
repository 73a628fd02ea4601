"""The happy path of the serve loop: records, events, billing, burst and max-runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runflow_worker.serve import keys
from tests.support.queue import (
    events,
    fence_value,
    graph,
    is_terminal,
    record,
    submit,
    terminal_events,
)
from tests.support.waiting import wait_for


@pytest.mark.timeout(60)
def test_burst_worker_runs_queued_runs_to_one_terminal_record_each(r, inprocess_worker,
                                                                  tmp_path: Path) -> None:
    ids = [submit(r, f"run-{i}") for i in range(3)]
    w = inprocess_worker(burst=True)
    w.thread.join(30)
    assert w.exit_code == 0
    for run_id in ids:
        rec = record(r, run_id)
        assert rec["status"] == "succeeded", rec
        assert rec["attempt"] == 1
        assert rec["started_at"] and rec["finished_at"] and rec["duration_ms"] >= 0
        out = rec["output"]["outputs"]
        assert [o["output_id"] for o in out] == ["out"]
        assert Path(out[0]["url"].removeprefix("file://")).read_text() == f"hello {run_id}"
        assert set(rec["timings_ms"]) >= {"queue", "validate", "environment", "execute",
                                          "upload"}
        billing = rec["billing"]
        assert len(billing["attempts"]) == 1
        attempt = billing["attempts"][0]
        assert attempt["gpu_class"] == "cpu" and attempt["outcome"] == "succeeded"
        assert attempt["gpu_seconds"] > 0
        assert billing["gpu_seconds"] == attempt["gpu_seconds"]
        statuses = [e["status"] for e in events(r, run_id) if e["type"] == "status"]
        assert statuses == ["queued", "running", "succeeded"]
        assert len(terminal_events(r, run_id)) == 1
        assert fence_value(r, run_id) == 1
        progress = [e for e in events(r, run_id) if e["type"] == "progress"]
        assert progress and all(e["attempt"] == "1" for e in progress)
    # Only the first run that does GPU work carries the boot time as its cold start.
    colds = [record(r, i)["billing"]["attempts"][0]["cold_start_seconds"] for i in ids]
    assert colds[0] > 0 and colds[1] == 0 and colds[2] == 0
    # Acked and deleted: nothing pending, nothing left in the stream.
    assert r.xpending(keys.runs_stream("cpu"), keys.CONSUMER_GROUP)["pending"] == 0
    assert r.xlen(keys.runs_stream("cpu")) == 0


@pytest.mark.timeout(60)
def test_max_runs_and_entries_added_before_any_worker(r, spawn_worker) -> None:
    # The stream and its entries exist before the group: the group starts from id 0.
    ids = [submit(r, f"early-{i}") for i in range(3)]
    w = spawn_worker("--max-runs", "2")
    assert w.wait(30) == 0
    assert sum(1 for i in ids if is_terminal(r, i)) == 2
    assert record(r, ids[2])["status"] == "queued"
    # The last run's terminal write did not read the third entry ahead: never delivered,
    # it is any worker's next read.
    assert r.xpending(keys.runs_stream("cpu"), keys.CONSUMER_GROUP)["pending"] == 0


@pytest.mark.timeout(60)
def test_rejected_run_fails_without_gpu_work_and_boot_goes_to_next_run(r, inprocess_worker
                                                                       ) -> None:
    submit(r, "bad", input={"nope": 1})
    submit(r, "good")
    w = inprocess_worker(burst=True)
    w.thread.join(30)
    bad, good = record(r, "bad"), record(r, "good")
    assert bad["status"] == "failed" and bad["error"]["code"] == "INVALID_INPUT"
    assert bad["billing"]["gpu_seconds"] == 0
    assert bad["billing"]["attempts"][0]["cold_start_seconds"] == 0
    assert good["status"] == "succeeded"
    assert good["billing"]["attempts"][0]["cold_start_seconds"] > 0


@pytest.mark.timeout(60)
def test_unparseable_entries_fail_or_go_to_dead_letters(r, inprocess_worker) -> None:
    stream = keys.runs_stream("cpu")
    r.xadd(stream, {"run": '{"run_id": "broken-1", "workflow": 5}'})
    r.xadd(stream, {"run": "not json at all"})
    w = inprocess_worker(burst=True)
    w.thread.join(30)
    rec = record(r, "broken-1")
    assert rec["status"] == "failed" and rec["error"]["code"] == "INVALID_WORKFLOW"
    assert len(terminal_events(r, "broken-1")) == 1
    dead = r.xrange(keys.DEAD_LETTER_STREAM)
    assert len(dead) == 1 and dead[0][1]["run"] == "not json at all"
    assert r.xpending(stream, keys.CONSUMER_GROUP)["pending"] == 0


@pytest.mark.timeout(60)
def test_redelivered_run_with_terminal_record_is_acked_and_skipped(r, inprocess_worker) -> None:
    submit(r, "done-already")
    rec = record(r, "done-already")
    rec["status"] = "succeeded"
    r.set(keys.run_record("done-already"), json.dumps(rec))
    w = inprocess_worker(burst=True)
    w.thread.join(30)
    assert record(r, "done-already") == rec
    assert not [e for e in events(r, "done-already") if e["type"] == "status"
                and e["status"] == "running"]
    assert r.xpending(keys.runs_stream("cpu"), keys.CONSUMER_GROUP)["pending"] == 0


@pytest.mark.timeout(60)
def test_timeout_ends_failed_with_timeout(r, inprocess_worker) -> None:
    submit(r, "slow", graph(sleep_s=30), timeout_s=0.5)
    w = inprocess_worker(burst=True)
    wait_for(lambda: is_terminal(r, "slow"), 20, "the timed-out run's record")
    rec = record(r, "slow")
    assert rec["status"] == "failed" and rec["error"]["code"] == "TIMEOUT"
    assert len(terminal_events(r, "slow")) == 1
    w.thread.join(20)
