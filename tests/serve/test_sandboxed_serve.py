"""The daemon with the sandbox on (the default), and unsandboxed by the operator's choice."""

from __future__ import annotations

import json
import shutil
import signal
import urllib.request
from pathlib import Path

import pytest

from tests.support.queue import is_terminal, record, submit
from tests.support.redis_server import free_port
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(90)


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed")
def test_sandboxed_worker_runs_the_queue(r, spawn_worker) -> None:
    ids = [submit(r, f"boxed-{i}") for i in range(2)]
    w = spawn_worker("--burst", env={"RUNFLOW_SANDBOX": "bwrap"})
    assert w.wait(60) == 0
    for run_id in ids:
        rec = record(r, run_id)
        assert rec["status"] == "succeeded", rec
        out = rec["output"]["outputs"][0]
        assert Path(out["url"].removeprefix("file://")).read_text() == f"hello {run_id}"
    assert not any(line.get("event") == "unsandboxed" for line in w.log_lines())


def _readyz(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except OSError:
        return 0, {}


def test_unsandboxed_worker_is_ready_and_says_so(r, spawn_worker) -> None:
    port = free_port()
    w = spawn_worker(env={"RUNFLOW_SANDBOX": "none", "RUNFLOW_HTTP_PORT": str(port)})
    status, body = wait_for(lambda: (lambda got: got if got[0] == 200 else None)(
        _readyz(port)), 30, "/readyz to answer 200")
    assert status == 200
    assert any("RUNFLOW_SANDBOX=none" in text for text in body["warnings"])
    submit(r, "loose")
    wait_for(lambda: is_terminal(r, "loose"), 30, "the run")
    assert record(r, "loose")["status"] == "succeeded"
    w.signal(signal.SIGTERM)
    assert w.wait(30) == 0
    assert any(line.get("event") == "unsandboxed" for line in w.log_lines())
