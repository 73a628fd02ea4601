"""Leases: renewal keeps a long run, death and freezing hand it over, fencing drops the zombie.

Pickups are counted with the run's fencing counter (one increment per pickup) and
executions with the marker file the test child appends to when a job reaches it.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from runflow_worker.serve import keys
from tests.support.queue import (
    events,
    fence_value,
    graph,
    is_terminal,
    record,
    status_of,
    submit,
    terminal_events,
)
from tests.support.waiting import wait_for


def _executions(mark: Path, tag: str) -> int:
    if not mark.exists():
        return 0
    return sum(1 for line in mark.read_text().splitlines() if line == tag)


def _running_on(r, run_id: str) -> bool:
    return status_of(r, run_id) == "running"


@pytest.mark.timeout(60)
def test_run_three_leases_long_is_never_reclaimed(r, spawn_worker, tmp_path: Path) -> None:
    mark = tmp_path / "marks"
    submit(r, "long", graph(sleep_s=3, mark=mark, tag="long"))
    first = spawn_worker("--max-runs", "1")
    wait_for(lambda: _running_on(r, "long"), 20, "the run to start")
    second = spawn_worker()  # idle and eager to reclaim anything that expires
    idle_ms: list[int] = []

    def finished_while_sampling_idle() -> bool:
        rows = r.xpending_range(keys.runs_stream("cpu"), keys.CONSUMER_GROUP, "-", "+", 1)
        idle_ms.extend(row["time_since_delivered"] for row in rows)
        return is_terminal(r, "long")

    wait_for(finished_while_sampling_idle, 30, "the run to finish")
    # Renewed every quarter lease: the entry never idles anywhere near the 1 s lease.
    assert len(idle_ms) > 20 and max(idle_ms) < 500, max(idle_ms)
    assert record(r, "long")["status"] == "succeeded"
    assert fence_value(r, "long") == 1  # one pickup: 0 reclaims
    assert _executions(mark, "long") == 1
    assert not [e for e in events(r, "long") if e["type"] == "status"
                and e["data"].get("reclaimed")]
    assert first.wait(20) == 0
    second.signal(signal.SIGTERM)
    assert second.wait(20) == 0
    assert not second.logged("run_started")


@pytest.mark.timeout(60)
def test_without_lease_renewal_the_run_is_reclaimed_exactly_once(r, spawn_worker,
                                                                  tmp_path: Path) -> None:
    mark = tmp_path / "marks"
    submit(r, "unrenewed", graph(sleep_s=3, mark=mark, tag="unrenewed"))
    frozen_lease = spawn_worker("--max-runs", "1", env={"RUNFLOW_LEASE_RENEWAL": "0"})
    wait_for(lambda: _running_on(r, "unrenewed"), 20, "the run to start")
    rescuer = spawn_worker()
    wait_for(lambda: is_terminal(r, "unrenewed"), 30, "the run to finish")
    assert record(r, "unrenewed")["status"] == "succeeded"
    assert fence_value(r, "unrenewed") == 2  # two pickups: exactly 1 reclaim
    reclaimed = [e for e in events(r, "unrenewed")
                 if e["type"] == "status" and e["data"].get("reclaimed")]
    assert len(reclaimed) == 1
    assert len(terminal_events(r, "unrenewed")) == 1
    assert frozen_lease.wait(20) == 0
    assert frozen_lease.logged("run_fenced")  # it noticed and wrote nothing
    rescuer.signal(signal.SIGTERM)
    assert rescuer.wait(20) == 0


@pytest.mark.timeout(60)
@pytest.mark.slow
def test_killed_worker_run_is_reclaimed_and_finished_by_another(r, spawn_worker,
                                                               tmp_path: Path) -> None:
    mark = tmp_path / "marks"
    submit(r, "orphan", graph(sleep_s=2, mark=mark, tag="orphan"))
    victim = spawn_worker()
    wait_for(lambda: _executions(mark, "orphan") == 1, 20, "the run to reach the child")
    victim.signal(signal.SIGKILL)
    victim.wait(10)
    assert status_of(r, "orphan") == "running"
    rescuer = spawn_worker()
    wait_for(lambda: is_terminal(r, "orphan"), 30, "the rescuer to finish the run")
    rec = record(r, "orphan")
    assert rec["status"] == "succeeded"
    assert _executions(mark, "orphan") == 2
    assert len(terminal_events(r, "orphan")) == 1
    assert r.xpending(keys.runs_stream("cpu"), keys.CONSUMER_GROUP)["pending"] == 0
    rescuer.signal(signal.SIGTERM)
    assert rescuer.wait(20) == 0


@pytest.mark.timeout(90)
@pytest.mark.slow
def test_frozen_worker_is_fenced_after_another_finished_its_run(r, spawn_worker,
                                                                tmp_path: Path) -> None:
    mark = tmp_path / "marks"
    submit(r, "zombie", graph(sleep_s=2, mark=mark, tag="zombie"))
    zombie = spawn_worker()
    wait_for(lambda: _executions(mark, "zombie") == 1, 20, "the run to reach the child")
    zombie.signal(signal.SIGSTOP)
    try:
        rescuer = spawn_worker()
        wait_for(lambda: is_terminal(r, "zombie"), 30, "the rescuer to finish the run")
        rescuer.signal(signal.SIGTERM)
        assert rescuer.wait(20) == 0
        final = r.get(keys.run_record("zombie"))
        events_before = r.xlen(keys.EVENTS_STREAM)
    finally:
        zombie.signal(signal.SIGCONT)
    # The zombie wakes up with a finished (or finishing) run it no longer owns.
    wait_for(lambda: zombie.logged("run_fenced"), 20, "the zombie to notice it lost the run")
    zombie.signal(signal.SIGTERM)
    assert zombie.wait(20) == 0
    assert r.get(keys.run_record("zombie")) == final
    assert r.xlen(keys.EVENTS_STREAM) == events_before
    assert len(terminal_events(r, "zombie")) == 1
    assert fence_value(r, "zombie") == 2
    assert r.xpending(keys.runs_stream("cpu"), keys.CONSUMER_GROUP)["pending"] == 0


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_poison_run_is_dead_lettered_after_max_deliveries(r, spawn_worker,
                                                          tmp_path: Path) -> None:
    mark = tmp_path / "marks"
    poison_graph = graph(mark=mark, tag="poison",
                         extra={"7": {"class_type": "TestKillWorker", "inputs": {}}})
    submit(r, "poison", poison_graph)
    normal = [submit(r, f"normal-{i}", graph(mark=mark, tag=f"normal-{i}")) for i in range(3)]
    everyone = ["poison", *normal]
    workers = []
    # Keep two workers alive (the poison run kills its worker each time) until all are done.
    deadline = time.monotonic() + 90
    while not all(is_terminal(r, i) for i in everyone):
        assert time.monotonic() < deadline, "runs not finished in time"
        alive = [w for w in workers if w.alive()]
        for _ in range(2 - len(alive)):
            workers.append(spawn_worker(env={"RUNFLOW_MAX_DELIVERIES": "3"}))
        wait_for(lambda: all(is_terminal(r, i) for i in everyone)
                 or sum(w.alive() for w in workers) < 2, 30, "a run to end or a worker to die")
    rec = record(r, "poison")
    assert rec["status"] == "failed" and rec["error"]["code"] == "WORKER_LOST"
    assert _executions(mark, "poison") == 3
    dead = r.xrange(keys.DEAD_LETTER_STREAM)
    assert len(dead) == 1
    assert '"run_id":"poison"' in dead[0][1]["run"] and dead[0][1]["reason"] == "max_deliveries"
    assert len(terminal_events(r, "poison")) == 1
    for run_id in normal:
        assert record(r, run_id)["status"] == "succeeded"
        assert _executions(mark, run_id) == 1
    for w in workers:
        w.signal(signal.SIGTERM)
