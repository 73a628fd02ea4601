"""``Worker.perform_run`` takes each delivery to the outcome its scenario calls for, and
``serve.outcomes`` turns each outcome into its log line and metrics."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from runflow_worker.run.contract import RunStatus
from runflow_worker.serve import keys
from runflow_worker.serve.daemon import Worker
from runflow_worker.serve.metrics import Metrics
from runflow_worker.serve.outcomes import Ending, Outcome, report_ending
from runflow_worker.serve.queue import Delivery, RedisUnavailable
from tests.support.queue import events, graph, record, status_of, submit
from tests.support.waiting import wait_for
from tests.support.workers import make_worker

OOM = {"8": {"class_type": "FakeOOM", "inputs": {}}}


@pytest.fixture
def worker(redis_server: Any, tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """Workers not started: the test hands each delivery to ``perform_run`` itself."""
    made: list[Worker] = []

    def make(**overrides: Any) -> Worker:
        w = make_worker(redis_server.url, tmp_path, child_sandbox=False, **overrides)
        w.queue.ensure_group()
        made.append(w)
        return w

    yield make
    for w in made:
        w._close()
        w.pipeline.close()


def next_delivery(w: Worker) -> Delivery:
    """The next entry of the worker's stream."""
    delivery = w.queue.read_new(block_ms=None)
    assert delivery is not None
    return delivery


def while_running(r: Any, run_id: str, then: Callable[[], None]) -> threading.Thread:
    """Call ``then`` from a thread once ``run_id``'s record is ``running``."""

    def act() -> None:
        wait_for(lambda: status_of(r, run_id) == "running", 20, f"{run_id} to run")
        then()

    thread = threading.Thread(target=act, daemon=True)
    thread.start()
    return thread


@pytest.mark.timeout(60)
def test_a_run_that_executes_is_finalised(r, worker) -> None:
    w = worker()
    submit(r, "done")
    assert w.perform_run(next_delivery(w)) is Outcome.FINALISED
    assert record(r, "done")["status"] == "succeeded"


@pytest.mark.timeout(60)
def test_a_run_canceled_before_it_started_is_finalised(r, worker, tmp_path: Path) -> None:
    w = worker()
    mark = tmp_path / "ran"
    submit(r, "early-cancel", graph(mark=mark))
    r.set(keys.cancel_flag("early-cancel"), 1)
    assert w.perform_run(next_delivery(w)) is Outcome.FINALISED
    assert record(r, "early-cancel")["status"] == "canceled"
    # The begin's reply came after the pipeline's first steps (``serve.beginahead``): the
    # run stopped at it, before its graph reached the child, and wrote no event of its own.
    assert not mark.exists()
    assert [e["type"] for e in events(r, "early-cancel")] == ["status", "status"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("change", [{"status": "succeeded"}, {"attempt": 2}],
                         ids=["terminal", "superseded"])
def test_a_run_over_already_is_skipped(r, worker, change: dict[str, Any],
                                       tmp_path: Path) -> None:
    w = worker()
    mark = tmp_path / "ran"
    submit(r, "over", graph(mark=mark))
    rec = {**record(r, "over"), **change}
    r.set(keys.run_record("over"), json.dumps(rec))
    assert w.perform_run(next_delivery(w)) is Outcome.SKIPPED
    assert record(r, "over") == rec  # nothing written
    assert r.xlen(keys.runs_stream("cpu")) == 0  # acked and deleted
    assert not mark.exists()  # nothing executed


@pytest.mark.timeout(60)
def test_out_of_memory_with_a_larger_class_is_promoted(r, worker) -> None:
    w = worker(gpu_ladder="cpu:0,t4:16")
    submit(r, "hungry", graph(extra=OOM))
    assert w.perform_run(next_delivery(w)) is Outcome.PROMOTED
    assert record(r, "hungry")["status"] == "queued"
    assert r.xlen(keys.runs_stream("t4")) == 1


@pytest.mark.timeout(60)
def test_out_of_memory_at_the_top_of_the_ladder_is_finalised(r, worker) -> None:
    w = worker(gpu_ladder="cpu:0")
    submit(r, "hungry", graph(extra=OOM))
    assert w.perform_run(next_delivery(w)) is Outcome.FINALISED
    assert record(r, "hungry")["error"]["code"] == "OUT_OF_MEMORY"


@pytest.mark.timeout(60)
def test_a_run_interrupted_by_a_stop_is_released(r, worker) -> None:
    w = worker()
    submit(r, "stopped", graph(sleep_s=30))
    while_running(r, "stopped", w.shutdown.request_cold)
    assert w.perform_run(next_delivery(w)) is Outcome.RELEASED
    assert record(r, "stopped")["status"] == "queued"


@pytest.mark.timeout(60)
def test_a_run_taken_over_by_another_pickup_is_fenced(r, worker) -> None:
    w = worker()
    submit(r, "taken", graph(sleep_s=30))
    while_running(r, "taken", lambda: r.incr(keys.fence("taken")))  # another pickup
    assert w.perform_run(next_delivery(w)) is Outcome.FENCED
    assert record(r, "taken")["status"] == "running"  # not ours to write any more


@pytest.mark.timeout(60)
def test_an_entry_delivered_too_often_is_dead_lettered(r, worker) -> None:
    w = worker(max_deliveries=3)
    submit(r, "poison")
    delivery = dataclasses.replace(next_delivery(w), deliveries=4)
    assert w.perform_run(delivery) is Outcome.DEAD_LETTERED
    assert record(r, "poison")["error"]["code"] == "WORKER_LOST"
    assert r.xlen(keys.DEAD_LETTER_STREAM) == 1


@pytest.mark.timeout(60)
def test_an_unparseable_message_is_finalised_or_dead_lettered_without_a_run_id(
        r, worker) -> None:
    w = worker()
    r.xadd(keys.runs_stream("cpu"), {keys.RUN_FIELD: json.dumps({"run_id": "broken"})})
    r.xadd(keys.runs_stream("cpu"), {keys.RUN_FIELD: "not json"})
    assert w.perform_run(next_delivery(w)) is Outcome.FINALISED
    assert record(r, "broken")["status"] == "failed"
    assert w.perform_run(next_delivery(w)) is Outcome.DEAD_LETTERED
    assert r.xlen(keys.DEAD_LETTER_STREAM) == 1


@pytest.mark.timeout(60)
def test_a_terminal_write_given_up_is_abandoned(r, worker, monkeypatch) -> None:
    w = worker()
    submit(r, "unwritten")
    r.set(keys.cancel_flag("unwritten"), 1)  # finalised at pickup, without running

    def redis_away(*args: Any, **kwargs: Any) -> Any:
        raise RedisUnavailable("Redis unavailable")

    monkeypatch.setattr(w.store, "finalise", redis_away)
    w.shutdown.request_cold()  # a cold stop gives up at the first failure
    assert w.perform_run(next_delivery(w)) is Outcome.ABANDONED
    assert record(r, "unwritten")["status"] == "queued"


# --------------------------------------------------------------------------- log and metrics


DELIVERY = Delivery("runflow:runs:cpu", "1-0", "{}", deliveries=2, reclaimed=False)


def _written(status: RunStatus = RunStatus.SUCCEEDED, **fields: Any) -> Any:
    from runflow_worker.run.contract import AttemptBilling, Billing, RunRecord

    return RunRecord(id="r", status=status, attempt=1, duration_ms=5,
                     timings_ms={"queue": 3, "execute": 40},
                     billing=Billing(gpu_seconds=1.5, attempts=[AttemptBilling(
                         attempt=1, gpu_class="cpu", gpu_seconds=1.5, outcome=status.value)]),
                     **fields)


@pytest.mark.parametrize(("ending", "events", "counted"), [
    (Ending(Outcome.SKIPPED, DELIVERY, run_id="r", attempt=1, reason="terminal"),
     ["run_skipped_terminal"], []),
    (Ending.of_record(Outcome.FINALISED, DELIVERY, _written()), ["run_finished"],
     ['runflow_runs_total{error_code="",status="succeeded"} 1.0',
      'runflow_gpu_seconds_total{gpu_class="cpu"} 1.5',
      'runflow_run_phase_seconds_count{phase="execute"} 1.0']),
    (Ending.of_record(Outcome.DEAD_LETTERED, DELIVERY,
                      _written(RunStatus.FAILED, error={"code": "WORKER_LOST"})),
     ["run_dead_lettered", "run_finished"],
     ["runflow_dead_letters_total 1.0",
      'runflow_runs_total{error_code="WORKER_LOST",status="failed"} 1.0']),
    (Ending(Outcome.DEAD_LETTERED, DELIVERY), ["entry_dead_lettered"],
     ["runflow_dead_letters_total 1.0"]),
    (Ending.of_record(Outcome.PROMOTED, DELIVERY, _written(RunStatus.FAILED),
                      promoted_to="t4"), ["run_promoted"],
     ["runflow_oom_promotions_total 1.0"]),
    (Ending(Outcome.RELEASED, DELIVERY, run_id="r", attempt=1, released=True),
     ["run_released"], []),
    (Ending(Outcome.RELEASED, DELIVERY, run_id="r", attempt=1, reason="Redis away",
            unfit="CUDA unusable", unfit_starts=2),
     ["worker_unfit", "release_failed", "run_released"], ["runflow_unfit_starts_total 1.0"]),
    (Ending(Outcome.FENCED, DELIVERY, run_id="r", attempt=1, reason="lease_lost"),
     ["run_fenced"], ["runflow_fenced_writes_total 1.0"]),
    (Ending(Outcome.FENCED, DELIVERY, run_id="r", attempt=1, reason="refused"),
     ["run_fenced"], ["runflow_fenced_writes_total 1.0"]),
    (Ending(Outcome.ABANDONED, DELIVERY, run_id="r", attempt=1, reason="Redis away"),
     ["finalise_abandoned"], []),
], ids=lambda v: v.outcome.value if isinstance(v, Ending) else None)
def test_each_outcome_has_its_log_line_and_metrics(ending: Ending, events: list[str],
                                                   counted: list[str],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    with caplog.at_level(logging.INFO, logger="runflow_worker.serve.daemon"):
        report_ending(ending, metrics, gpu_class="cpu", max_unfit_starts=3)
    assert [getattr(rec, "event", None) for rec in caplog.records] == events
    for rec in caplog.records:
        assert rec.entry_id == "1-0"
        if ending.run_id is not None:
            assert (rec.run_id, rec.attempt) == ("r", 1)
    text = metrics.render().decode()
    for line in counted:
        assert line in text
    if ending.record is None or ending.outcome is Outcome.PROMOTED:
        assert "runflow_runs_total{" not in text  # only runs that finished count as runs

