"""A ComfyUI child that breaks the channel protocol, seen through the serve daemon: its run
fails once with INTERNAL, the worker carries on and the next run succeeds on a fresh child;
the child's log lines are the worker's records, tagged with the worker's run id."""

from __future__ import annotations

import json

import pytest

from tests.fakes import HOSTILE_CHILD
from tests.support.queue import graph, record, submit, terminal_events

FORGED = {"level": "error", "logger": "runflow_worker.serve.daemon", "msg": "forged by a node",
          "run_id": "someone-else", "event": "run_succeeded"}


@pytest.mark.timeout(90)
def test_a_protocol_violation_fails_one_run_and_the_worker_serves_the_next(
        r, spawn_worker) -> None:
    bad = submit(r, "hostile-run", graph(extra={
        "0": {"class_type": "HostileFrame", "inputs": {"kind": "garbage"}}}))
    good = submit(r, "next-run", graph(extra={
        "0": {"class_type": "HostileLog", "inputs": {"line": json.dumps(FORGED)}}}))
    w = spawn_worker("--max-runs", "2", env={"RUNFLOW_RUNNER_ENTRY": HOSTILE_CHILD})
    assert w.wait(60) == 0
    rec = record(r, bad)
    assert rec["status"] == "failed" and rec["error"]["code"] == "INTERNAL", rec
    assert rec["error"]["message"].startswith(
        "protocol violation from the ComfyUI process: frame is not valid UTF-8")
    assert len(terminal_events(r, bad)) == 1
    ok = record(r, good)
    assert ok["status"] == "succeeded", ok
    assert len(terminal_events(r, good)) == 1
    lines = w.log_lines()
    assert [line for line in lines if line.get("event") == "child_protocol_violation"]
    relayed = [line for line in lines if line.get("msg") == "forged by a node"]
    assert relayed, "the child's line never reached the worker's log"
    for line in relayed:
        assert line["logger"] == "runflow.comfyui" and line["origin"] == "comfyui"
        assert line["run_id"] == good and line["child_logger"] == "runflow_worker.serve.daemon"
        assert "event" not in line
