"""Cancellation and ``timeout_s`` reach the upload phase too (SPEC §2: within 2 s, any phase).

The storage here writes each object, then, on the first one, holds the transfer open until
the run's ``should_stop`` says stop (as the S3 transfer callback does). The run must end
``canceled`` / ``TIMEOUT`` without uploading the next file, and keep no object.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.serve.conftest import graph, is_terminal, record, submit, terminal_events, wait_for
from worker import keys
from worker.storage import LocalStorage

pytestmark = pytest.mark.timeout(60)

HELD_AT_MOST_S = 15.0
"""How long the held transfer waits when no ``should_stop`` reaches it (the bug)."""


class HeldStorage(LocalStorage):
    """Local storage whose first transfer lasts until the run is told to stop."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.holding = threading.Event()
        self.puts: list[str] = []

    def put(self, local_path: Path, key: str, *, content_type: str, sha256: str,
            should_stop: Any = None) -> None:
        super().put(local_path, key, content_type=content_type, sha256=sha256,
                    should_stop=should_stop)
        self.puts.append(key)
        if len(self.puts) > 1:
            return
        self.holding.set()
        deadline = time.monotonic() + HELD_AT_MOST_S
        while time.monotonic() < deadline and not (should_stop is not None and should_stop()):
            time.sleep(0.01)


def _two_files() -> dict[str, Any]:
    g = graph()
    g["9"]["inputs"]["copies"] = 2
    return g


def _stored_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


@pytest.mark.parametrize(("how", "code", "status"), [("cancel", "CANCELED", "canceled"),
                                                     ("timeout", "TIMEOUT", "failed")])
def test_a_stop_during_the_upload_ends_the_run_and_keeps_no_output(
        r, inprocess_worker, tmp_path: Path, how: str, code: str, status: str) -> None:
    storage = HeldStorage(tmp_path / "held-outputs")
    timeout_s = 3.0 if how == "timeout" else 60.0
    submit(r, "up", _two_files(), timeout_s=timeout_s)
    inprocess_worker(storage=storage)
    wait_for(storage.holding.is_set, 20, "the upload to start")
    asked = time.monotonic()
    if how == "cancel":
        r.set(keys.cancel_flag("up"), 1)
    wait_for(lambda: is_terminal(r, "up"), 20, "the outcome")
    rec = record(r, "up")
    if how == "cancel":
        assert time.monotonic() - asked < 2.0  # within 2 s of the cancel
    else:
        assert rec["duration_ms"] < (timeout_s + 2.0) * 1000  # within 2 s of the deadline
    assert rec["status"] == status and rec["error"]["code"] == code
    assert rec["output"] is None and "upload" in rec["timings_ms"]
    assert len(terminal_events(r, "up")) == 1
    assert len(storage.puts) == 1  # the second file was never sent
    assert _stored_files(storage.root) == []  # the first was deleted again
