"""SIGTERM (warm and cold), idle exit, cancellation, and Redis going away mid-run."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest

from runflow_worker.serve import keys
from tests.support.queue import (
    events,
    graph,
    is_terminal,
    record,
    status_of,
    submit,
    terminal_events,
)
from tests.support.waiting import wait_for


def _pending(r) -> int:
    return r.xpending(keys.runs_stream("cpu"), keys.CONSUMER_GROUP)["pending"]


def _progress_seen(r, run_id: str) -> bool:
    return any(e["type"] == "progress" and "step" in e["data"] for e in events(r, run_id))


@pytest.mark.timeout(60)
def test_sigterm_lets_the_current_run_finish_within_grace_and_takes_no_new_one(
        r, spawn_worker) -> None:
    submit(r, "current", graph(sleep_s=1.5))
    submit(r, "next")
    w = spawn_worker(env={"RUNFLOW_GRACE_S": "20"})
    wait_for(lambda: _progress_seen(r, "current"), 20, "the run to be executing")
    w.signal(signal.SIGTERM)
    assert w.wait(30) == 0
    assert record(r, "current")["status"] == "succeeded"
    assert record(r, "next")["status"] == "queued"
    assert _pending(r) == 0


@pytest.mark.timeout(60)
def test_sigterm_beyond_grace_releases_the_run_for_another_worker(r, spawn_worker) -> None:
    submit(r, "long", graph(sleep_s=30))
    w = spawn_worker(env={"RUNFLOW_GRACE_S": "0.5", "RUNFLOW_LEASE_S": "30"})
    wait_for(lambda: _progress_seen(r, "long"), 20, "the run to be executing")
    w.signal(signal.SIGTERM)
    assert w.wait(20) == 0
    # Not failed, not acked: pending, immediately claimable despite the 30 s lease, and
    # recorded as waiting in the queue again.
    assert status_of(r, "long") == "queued"
    assert not terminal_events(r, "long")
    assert [e["status"] for e in events(r, "long") if e["type"] == "status"][-2:] == [
        "running", "queued"]
    assert _pending(r) == 1
    detail = r.xpending_range(keys.runs_stream("cpu"), keys.CONSUMER_GROUP, "-", "+", 1)[0]
    assert detail["times_delivered"] == 0  # the release does not count as a lost delivery
    assert w.logged("run_released")
    rescuer = spawn_worker("--burst", env={"RUNFLOW_LEASE_S": "30"})
    wait_for(lambda: any(e["type"] == "status" and e["data"].get("reclaimed")
                         for e in events(r, "long")), 10, "a prompt reclaim")
    rescuer.signal(signal.SIGINT)
    assert rescuer.wait(20) == 0


@pytest.mark.timeout(60)
def test_second_sigterm_stops_at_once_and_leaves_the_run_pending(r, spawn_worker) -> None:
    submit(r, "long", graph(sleep_s=30))
    w = spawn_worker(env={"RUNFLOW_GRACE_S": "60"})
    wait_for(lambda: _progress_seen(r, "long"), 20, "the run to be executing")
    w.signal(signal.SIGTERM)
    time.sleep(0.2)  # two distinct signals (not a synchronisation wait)
    started = time.monotonic()
    w.signal(signal.SIGTERM)
    assert w.wait(20) == 0
    assert time.monotonic() - started < 5
    assert status_of(r, "long") == "queued" and _pending(r) == 1


@pytest.mark.timeout(60)
def test_sigterm_while_idle_and_idle_exit(r, spawn_worker) -> None:
    idle = spawn_worker()
    wait_for(lambda: idle.logged("worker_started"), 20, "the worker to start")
    idle.signal(signal.SIGTERM)
    assert idle.wait(10) == 0
    scaler = spawn_worker(env={"RUNFLOW_IDLE_EXIT_S": "1"})
    assert scaler.wait(20) == 0
    assert "idle" in scaler.logged("worker_stopping")[0]["reason"]


@pytest.mark.timeout(60)
def test_canceled_queued_run_is_finalised_without_running(r, inprocess_worker,
                                                          tmp_path: Path) -> None:
    mark = tmp_path / "marks"
    submit(r, "nope", graph(mark=mark, tag="nope"))
    r.set(keys.cancel_flag("nope"), "1", ex=60)
    w = inprocess_worker(burst=True, sandbox="none")  # the test child writes marks outside
    w.thread.join(30)
    rec = record(r, "nope")
    assert rec["status"] == "canceled" and rec["error"]["code"] == "CANCELED"
    assert rec["billing"]["gpu_seconds"] == 0
    assert not mark.exists()
    assert [e["status"] for e in events(r, "nope") if e["type"] == "status"] == [
        "queued", "canceled"]


@pytest.mark.timeout(60)
def test_running_run_is_canceled_within_two_seconds(r, inprocess_worker) -> None:
    submit(r, "stopme", graph(sleep_s=30))
    inprocess_worker()
    wait_for(lambda: _progress_seen(r, "stopme"), 20, "the run to be executing")
    asked = time.monotonic()
    r.set(keys.cancel_flag("stopme"), "1")
    wait_for(lambda: is_terminal(r, "stopme"), 5, "the canceled record")
    assert time.monotonic() - asked < 2.0
    rec = record(r, "stopme")
    assert rec["status"] == "canceled" and rec["error"]["code"] == "CANCELED"
    assert rec["billing"]["gpu_seconds"] > 0
    assert len(terminal_events(r, "stopme")) == 1


@pytest.mark.timeout(60)
def test_a_run_canceled_before_pickup_ends_without_waiting_for_a_child_start(
        r, inprocess_worker, tmp_path: Path) -> None:
    # The pipeline starts the run's environment before it reads the begin's reply
    # (serve.beginahead): a begin that says "canceled" stops that start, which here would
    # never end (its gate is never opened), instead of waiting for it.
    from tests.fakes import GATED_START_CHILD

    submit(r, "no-start", graph())
    r.set(keys.cancel_flag("no-start"), "1", ex=60)
    inprocess_worker(burst=True, child_entry=GATED_START_CHILD)
    wait_for(lambda: is_terminal(r, "no-start"), 20, "the canceled record")
    assert record(r, "no-start")["status"] == "canceled"
    assert not (tmp_path / "comfyui" / "gate").exists()


@pytest.mark.timeout(60)
def test_a_slow_input_download_keeps_the_lease_and_sees_a_cancel(r, inprocess_worker) -> None:
    # The begin is sent ahead and its reply read when the run first needs it, after its
    # inputs (serve.beginahead): the lease keeper reads it itself at its first tick, so
    # a download longer than the lease keeps the run's lease and notices a cancel.
    from runflow_worker.cache.errors import FetchCanceled

    entered = threading.Event()

    def slow_fetch(url: str, dest: Path, *, max_bytes: int, cancel) -> str:  # noqa: ANN001
        entered.set()
        while not cancel():  # a download that never ends, polling its cancel as one does
            time.sleep(0.01)
        raise FetchCanceled("the download was stopped")

    w = inprocess_worker(lease_s=0.2, before_start=lambda wk: setattr(
        wk.pipeline, "fetch_input", slow_fetch))
    g = {"1": {"class_type": "RunflowInputFile", "inputs": {"input_id": "doc"}},
         "9": {"class_type": "FakeSave", "inputs": {"text": ["1", 0], "output_id": "out"}}}
    submit(r, "slow-input", g, input={"doc": "https://127.0.0.1:9/doc.txt"})
    assert entered.wait(20)
    at_start = w.worker.keeper.renewals
    wait_for(lambda: w.worker.keeper.renewals >= at_start + 3, 10,
             "lease renewals during the download")
    assert status_of(r, "slow-input") == "running"
    r.set(keys.cancel_flag("slow-input"), "1")
    wait_for(lambda: is_terminal(r, "slow-input"), 10, "the canceled record")
    assert record(r, "slow-input")["status"] == "canceled"


@pytest.mark.timeout(90)
@pytest.mark.slow
def test_redis_restart_mid_run_writes_the_outcome_once_back(r, redis_server, spawn_worker,
                                                            tmp_path: Path) -> None:
    mark = tmp_path / "marks"
    submit(r, "survivor", graph(sleep_s=2, mark=mark, tag="survivor"))
    w = spawn_worker()
    wait_for(lambda: _progress_seen(r, "survivor"), 20, "the run to be executing")
    redis_server.stop()  # all data is lost: stream, group, record, fencing counter
    wait_for(lambda: w.logged("finalise_retry"), 20, "the worker to wait for Redis")
    redis_server.start()
    r.connection_pool.disconnect()
    wait_for(lambda: is_terminal(r, "survivor"), 30, "the outcome after the restart")
    assert record(r, "survivor")["status"] == "succeeded"
    assert len(terminal_events(r, "survivor")) == 1
    assert mark.read_text().splitlines() == ["survivor"]  # executed once
    # The worker recreated the group and goes on serving.
    submit(r, "after")
    wait_for(lambda: is_terminal(r, "after"), 30, "a run submitted after the restart")
    assert w.alive()
    w.signal(signal.SIGTERM)
    assert w.wait(20) == 0


@pytest.mark.timeout(60)
def test_worker_started_while_redis_is_down_waits_and_then_serves(r, redis_server,
                                                                  spawn_worker) -> None:
    redis_server.stop()
    w = spawn_worker()
    wait_for(lambda: w.logged("redis_error"), 20, "the worker to find Redis away")
    assert w.alive()
    redis_server.start()
    r.connection_pool.disconnect()
    wait_for(lambda: w.logged("worker_started"), 20, "the worker to connect")
    submit(r, "late")
    wait_for(lambda: is_terminal(r, "late"), 20, "the run")
    assert record(r, "late")["status"] == "succeeded"
    w.signal(signal.SIGTERM)
    assert w.wait(20) == 0
