"""``serve`` starts the ComfyUI child at boot: the first run finds it and uses it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.queue import graph, record, submit
from tests.support.waiting import wait_for


@pytest.mark.timeout(60)
def test_serve_starts_the_child_before_the_first_run_and_the_run_uses_it(
        r, spawn_worker, tmp_path: Path) -> None:
    w = spawn_worker("--max-runs", "1")
    [started] = wait_for(lambda: w.logged("child_prestarted"), 30, "the pre-started child")
    pid = started["pid"]
    os.kill(pid, 0)  # the child exists, and no run was enqueued yet
    assert record(r, "after-boot") is None
    pid_file = tmp_path / "child.pid"
    submit(r, "after-boot", graph(extra={"5": {"class_type": "TestPid",
                                               "inputs": {"path": str(pid_file)}}}))
    assert w.wait(30) == 0
    rec = record(r, "after-boot")
    assert rec["status"] == "succeeded", rec
    assert int(pid_file.read_text()) == pid  # the run used the pre-started child
