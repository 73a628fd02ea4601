"""Cancellation and ``timeout_s`` reach the upload phase too (SPEC §2: within 2 s, any phase).

``HeldStorage`` writes each object, then, on the first one, holds the transfer open until
the run's ``should_stop`` says stop (as the S3 transfer callback does). The run must end
``canceled`` / ``TIMEOUT`` without uploading the next file, and keep no object. An S3
endpoint that never answers (no bytes move, so no callback runs) must not hold the run
either, and neither may deleting what was stored: the record is written first.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from runflow_worker.run.storage import LocalStorage, S3Storage, StoredObject
from runflow_worker.serve import keys
from tests.support.queue import graph, is_terminal, record, submit, terminal_events
from tests.support.s3_servers import SilentServer, aws_test_credentials, moto_s3
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(60)

HELD_AT_MOST_S = 15.0
"""How long the held transfer waits when no ``should_stop`` reaches it (the bug)."""


class HeldStorage(LocalStorage):
    """Local storage whose first transfer lasts until the run is told to stop."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.holding = threading.Event()
        self.puts: list[str] = []

    def put(self, local_path: Path, key: str, *, content_type: str, sha256: str | None,
            should_stop: Any = None, keep_if_late: Any = None) -> StoredObject:
        stored = super().put(local_path, key, content_type=content_type, sha256=sha256,
                             should_stop=should_stop, keep_if_late=keep_if_late)
        self.puts.append(key)
        if len(self.puts) > 1:
            return stored
        self.holding.set()
        deadline = time.monotonic() + HELD_AT_MOST_S
        while time.monotonic() < deadline and not (should_stop is not None and should_stop()):
            time.sleep(0.01)
        return stored


def _two_files() -> dict[str, Any]:
    g = graph()
    g["9"]["inputs"]["copies"] = 2
    return g


def _stored_files(root: Path) -> list[Path]:
    # os.walk skips a directory removed while it walks: the deletions run meanwhile, and
    # rglob raised FileNotFoundError for a folder that went between its listing and its scan.
    return [Path(d) / f for d, _, files in os.walk(root) for f in files]


def _assert_stopped_in_time(r, run_id: str, how: str, asked: float, timeout_s: float,
                            code: str, status: str) -> dict[str, Any]:
    """Wait for the outcome; it must come within 2 s of the cancel (or of the deadline)."""
    wait_for(lambda: is_terminal(r, run_id), 20, "the outcome")
    rec = record(r, run_id)
    if how == "cancel":
        assert time.monotonic() - asked < 2.0  # within 2 s of the cancel
    else:
        assert rec["duration_ms"] < (timeout_s + 2.0) * 1000  # within 2 s of the deadline
    assert rec["status"] == status and rec["error"]["code"] == code
    assert rec["output"] is None and "upload" in rec["timings_ms"]
    assert len(terminal_events(r, run_id)) == 1
    return rec


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
    _assert_stopped_in_time(r, "up", how, asked, timeout_s, code, status)
    assert len(storage.puts) == 1  # the second file was never sent
    # The first is deleted again (in the background: the record does not wait for it).
    wait_for(lambda: _stored_files(storage.root) == [], 10, "the stored output's deletion")


@pytest.mark.parametrize(("how", "code", "status"), [("cancel", "CANCELED", "canceled"),
                                                     ("timeout", "TIMEOUT", "failed")])
def test_a_stop_reaches_an_upload_stalled_on_a_silent_s3_server(
        r, inprocess_worker, monkeypatch, how: str, code: str, status: str) -> None:
    aws_test_credentials(monkeypatch)
    server = SilentServer()
    try:
        storage = S3Storage("outputs", "", endpoint_url=server.url, presign_ttl_s=60)
        timeout_s = 3.0 if how == "timeout" else 60.0
        submit(r, "stall", graph(), timeout_s=timeout_s)
        inprocess_worker(storage=storage)
        assert server.received.wait(20)  # the upload is in flight, and will never end
        asked = time.monotonic()
        if how == "cancel":
            r.set(keys.cancel_flag("stall"), 1)
        _assert_stopped_in_time(r, "stall", how, asked, timeout_s, code, status)
    finally:
        server.close()  # the abandoned transfer (and the discard's delete) end now
    # The background discard of the run's key gives up on the closed server (refused): it
    # ends within the test, not in a later one.
    wait_for(lambda: not any(t.name == "discard-stall" for t in threading.enumerate()), 30,
             "the background discard to end")


def test_a_run_stores_its_outputs_in_s3(r, inprocess_worker, monkeypatch) -> None:
    # The normal path through the transfer's helper thread, against moto over real HTTP.
    aws_test_credentials(monkeypatch)
    with moto_s3("outputs") as (url, client):
        storage = S3Storage("outputs", "pfx", endpoint_url=url, presign_ttl_s=60)
        submit(r, "s3ok", _two_files())
        inprocess_worker(storage=storage)
        wait_for(lambda: is_terminal(r, "s3ok"), 20, "the outcome")
        rec = record(r, "s3ok")
        assert rec["status"] == "succeeded", rec["error"]
        outputs = rec["output"]["outputs"]
        stored = sorted(o["Key"] for o in client.list_objects_v2(Bucket="outputs")["Contents"])
        assert stored == sorted(o["key"] for o in outputs) == [
            "pfx/runs/s3ok/out/out_00001_.txt", "pfx/runs/s3ok/out/out_00002_.txt"]
        head = client.head_object(Bucket="outputs", Key=outputs[0]["key"])
        assert head["Metadata"]["sha256"] == outputs[0]["sha256"]


class SlowDeleteStorage(HeldStorage):
    """``HeldStorage`` whose deletes wait until the test allows them."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.deletes_allowed = threading.Event()

    def delete(self, key: str) -> None:
        assert self.deletes_allowed.wait(HELD_AT_MOST_S)
        super().delete(key)


def test_the_record_does_not_wait_for_deleting_the_stored_outputs(
        r, inprocess_worker, tmp_path: Path) -> None:
    storage = SlowDeleteStorage(tmp_path / "slow-delete-outputs")
    submit(r, "slowdel", _two_files())
    inprocess_worker(storage=storage)
    wait_for(storage.holding.is_set, 20, "the upload to start")
    asked = time.monotonic()
    r.set(keys.cancel_flag("slowdel"), 1)
    _assert_stopped_in_time(r, "slowdel", "cancel", asked, 60.0, "CANCELED", "canceled")
    assert len(_stored_files(storage.root)) == 1  # still there: its delete waits
    storage.deletes_allowed.set()
    wait_for(lambda: _stored_files(storage.root) == [], 10, "the stored output's deletion")
