"""Runs through the Redis queue as the serve tests drive them: the fake workflow, a run
submitted as ``runflow-worker submit`` does, its record and its events read back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import redis

from runflow_worker.run.contract import parse_message
from runflow_worker.serve import keys
from runflow_worker.serve.submit import enqueue_message
from tests.support import factories


def graph(*, sleep_s: float = 0.0, mark: Path | None = None, tag: str = "",
          extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fake workflow: a string input saved as output ``out``, optionally slowed or marked
    (``TestMark`` of ``tests.fakes.serve_child``)."""
    g: dict[str, Any] = {
        "1": {"class_type": "RunflowInputString", "inputs": {"input_id": "prompt"}},
    }
    if mark is not None:
        g["5"] = {"class_type": "TestMark", "inputs": {"path": str(mark), "tag": tag}}
    if sleep_s:
        g["6"] = {"class_type": "FakeSleep", "inputs": {"seconds": sleep_s}}
    g.update(extra or {})
    g["9"] = {"class_type": "FakeSave", "inputs": {"text": ["1", 0], "output_id": "out"}}
    return g


def submit(client: redis.Redis, run_id: str, g: dict[str, Any] | None = None, *,
           gpu_class: str = "cpu", **overrides: Any) -> str:
    """Enqueue a run the way ``runflow-worker submit`` does; return the run id."""
    overrides.setdefault("input", {"prompt": f"hello {run_id}"})
    msg = parse_message(factories.message(g or graph(), run_id=run_id, **overrides))
    enqueue_message(client, msg, gpu_class, events_maxlen=100_000)
    return run_id


def record(client: redis.Redis, run_id: str) -> dict[str, Any] | None:
    """The run record as a dict, or None."""
    raw = client.get(keys.run_record(run_id))
    return json.loads(raw) if raw else None


def status_of(client: redis.Redis, run_id: str) -> str | None:
    """The record's status, or None."""
    rec = record(client, run_id)
    return rec["status"] if rec else None


def is_terminal(client: redis.Redis, run_id: str) -> bool:
    """True once the run's record is succeeded, failed or canceled."""
    return status_of(client, run_id) in ("succeeded", "failed", "canceled")


def events(client: redis.Redis, run_id: str | None = None) -> list[dict[str, Any]]:
    """Events (of one run, or all), oldest first, with ``data`` decoded."""
    out = []
    for entry_id, fields in client.xrange(keys.EVENTS_STREAM):
        if run_id is None or fields.get("run_id") == run_id:
            out.append({**fields, "id": entry_id, "data": json.loads(fields.get("data", "{}"))})
    return out


def terminal_events(client: redis.Redis, run_id: str) -> list[dict[str, Any]]:
    """The run's status events with a terminal status."""
    return [e for e in events(client, run_id) if e["type"] == "status"
            and e["status"] in ("succeeded", "failed", "canceled")]


def fence_value(client: redis.Redis, run_id: str) -> int:
    """How many pickups the run had (its fencing counter)."""
    return int(client.get(keys.fence(run_id)) or 0)
