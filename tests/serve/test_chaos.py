"""Bounded chaos: 200+ runs, 3 workers, one killed -9 at random every few seconds.

Whatever is killed: no run is lost, each run has exactly one terminal record and one
terminal status event, and a run executes twice only because a worker died under it.
"""

from __future__ import annotations

import json
import random
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from runflow_worker.serve import keys
from tests.support.queue import graph, submit, terminal_events
from tests.support.waiting import wait_for

RUNS = 210
WORKERS = 3
KILL_EVERY_S = (1.0, 2.5)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_chaos_kills_lose_no_run_and_finalise_each_once(r, spawn_worker,
                                                        tmp_path: Path) -> None:
    rng = random.Random(20261122)
    mark = tmp_path / "marks"
    ids = [f"chaos-{i:03d}" for i in range(RUNS)]
    for run_id in ids:
        submit(r, run_id, graph(sleep_s=0.1, mark=mark, tag=run_id))
    env = {"RUNFLOW_LEASE_S": "2"}
    workers = [spawn_worker(env=env) for _ in range(WORKERS)]
    record_keys = [keys.run_record(i) for i in ids]

    def done_count() -> int:
        raws = r.mget(record_keys)
        return sum(1 for raw in raws if raw and json.loads(raw)["status"] in (
            "succeeded", "failed", "canceled"))

    kills = 0
    deadline = time.monotonic() + 200
    next_kill = time.monotonic() + rng.uniform(*KILL_EVERY_S)
    while done_count() < RUNS:
        assert time.monotonic() < deadline, f"only {done_count()} of {RUNS} runs finished"
        if time.monotonic() >= next_kill:
            victim = rng.choice([w for w in workers if w.alive()])
            victim.signal(signal.SIGKILL)
            victim.wait(10)
            workers.remove(victim)
            workers.append(spawn_worker(env=env))
            kills += 1
            next_kill = time.monotonic() + rng.uniform(*KILL_EVERY_S)
        wait_for(lambda at=next_kill: done_count() >= RUNS or time.monotonic() >= at,
                 60, "all runs or the next kill", interval_s=0.1)
    for w in workers:
        # A worker still starting Python has no handlers yet: let it come up first.
        wait_for(lambda w=w: w.logged("worker_started"), 30, "the worker to be up")
        w.signal(signal.SIGTERM)
    for w in workers:
        assert w.wait(30) == 0

    assert kills >= 3
    executions = Counter(mark.read_text().splitlines())
    for run_id in ids:
        raw = r.get(keys.run_record(run_id))
        assert raw is not None, f"{run_id} lost"
        assert json.loads(raw)["status"] == "succeeded", raw
        assert len(terminal_events(r, run_id)) == 1, run_id
        assert executions[run_id] >= 1
    duplicates = sum(n - 1 for n in executions.values())
    assert duplicates <= kills, (duplicates, kills)
    assert r.xpending(keys.runs_stream("cpu"), keys.CONSUMER_GROUP)["pending"] == 0
    assert r.xlen(keys.runs_stream("cpu")) == 0
