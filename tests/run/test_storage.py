"""Output storage: S3 errors translated, transfers that stop, keys that stay in their run.

S3 is moto in server mode on loopback (real HTTP, so boto3's transfer threads and retries
run as they do against a bucket), or a server that accepts requests and never answers.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runflow_worker.errors import ErrorCode, RunFailure, StorageError
from runflow_worker.run import storage as storage_module
from runflow_worker.run.outputs import (
    discard_outputs,
    discard_outputs_later,
    object_key,
    store_outputs,
)
from runflow_worker.run.storage import (
    MAX_KEY_SEGMENT_CHARS,
    LocalStorage,
    S3Storage,
    StoredObject,
    UploadCanceled,
    check_key,
)
from runflow_worker.runtime.graph import path_segment_problem
from runflow_worker.runtime.protocol import OutputFile
from tests.support.s3_servers import SilentServer, aws_test_credentials, moto_s3

pytestmark = pytest.mark.timeout(120)

BUCKET = "outputs"


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Any]]:
    """A moto S3 endpoint with the bucket ``outputs``: its URL and a client."""
    aws_test_credentials(monkeypatch)
    with moto_s3(BUCKET) as (url, client):
        yield url, client


def _outputs(tmp_path: Path, sizes: dict[str, int]) -> tuple[Path, list[OutputFile]]:
    out = tmp_path / "out"
    out.mkdir()
    files = []
    for name, size in sizes.items():
        (out / name).write_bytes(os.urandom(size))
        files.append(OutputFile("9", "RunflowOutputImage", name, "hero"))
    return out, files


def _keys(client: Any) -> list[str]:
    return [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET).get("Contents", [])]


# --------------------------------------------------------------------------- S3 errors


def test_s3_upload_failure_is_upload_failed_without_local_paths(s3, tmp_path: Path) -> None:
    from boto3.exceptions import S3UploadFailedError

    url, _ = s3
    storage = S3Storage("no-such-bucket", "pfx", endpoint_url=url, presign_ttl_s=60)
    out, files = _outputs(tmp_path, {"hero_00001_.png": 100})
    with pytest.raises(RunFailure) as info:
        store_outputs(files, out, "r1", storage)
    assert info.value.code is ErrorCode.UPLOAD_FAILED
    assert "NoSuchBucket" in info.value.message and "no-such-bucket" in info.value.message
    assert str(tmp_path) not in info.value.message and str(out) not in info.value.message
    storage_error = info.value.__cause__
    assert isinstance(storage_error, StorageError)
    assert isinstance(storage_error.__cause__, S3UploadFailedError)  # raise ... from exc


def test_s3_outputs_are_stored_with_their_digest_and_deleted_on_request(s3,
                                                                        tmp_path: Path
                                                                        ) -> None:
    url, client = s3
    storage = S3Storage(BUCKET, "pfx", endpoint_url=url, presign_ttl_s=60)
    out, files = _outputs(tmp_path, {"a.png": 10, "b.png": 20})
    entries = store_outputs(files, out, "r1", storage, should_stop=lambda: False)
    assert [e.key for e in entries] == ["pfx/runs/r1/hero/a.png", "pfx/runs/r1/hero/b.png"]
    head = client.head_object(Bucket=BUCKET, Key=entries[0].key)
    assert head["Metadata"]["sha256"] == entries[0].sha256
    discard_outputs(storage, ["runs/r1/hero/a.png", "runs/r1/hero/b.png"], run_id="r1")
    assert _keys(client) == []


# --------------------------------------------------------------------------- stopping


class _Watched(S3Storage):
    """Remembers which key is being transferred."""

    current: str | None = None

    def put(self, local_path: Path, key: str, **kwargs: Any) -> StoredObject:
        self.current = key
        return super().put(local_path, key, **kwargs)


def test_s3_transfer_stops_mid_file_and_the_run_keeps_no_object(s3, tmp_path: Path) -> None:
    url, client = s3
    storage = _Watched(BUCKET, "", endpoint_url=url, presign_ttl_s=60)
    # The second file is large enough for a multipart upload (several parts).
    out, files = _outputs(tmp_path, {"a.png": 1000, "b.bin": 24 << 20})
    polls = {"during b": 0}

    def should_stop() -> bool:
        # Stop once the large transfer has made progress: from inside boto3's callback.
        if storage.current == "runs/r1/hero/b.bin":
            polls["during b"] += 1
        return polls["during b"] > 3

    written: list[str] = []
    with pytest.raises(UploadCanceled):
        store_outputs(files, out, "r1", storage, should_stop=should_stop, written=written)
    assert polls["during b"] > 3  # stopped by the transfer callback, not between files
    assert written == ["runs/r1/hero/a.png", "runs/r1/hero/b.bin"]
    assert _keys(client) == ["runs/r1/hero/a.png"]
    assert not client.list_multipart_uploads(Bucket=BUCKET).get("Uploads")  # aborted
    discard_outputs(storage, written, run_id="r1")
    assert _keys(client) == []


@pytest.fixture
def silent_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[SilentServer]:
    """An S3 endpoint that accepts every request and never answers."""
    aws_test_credentials(monkeypatch)
    server = SilentServer()
    try:
        yield server
    finally:
        server.close()  # the abandoned transfer's retries are refused: it ends


def _in_thread(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``fn`` on a thread; the dict gets its ``error`` and ``ended`` (monotonic)."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - inspected by the test
            outcome["error"] = exc
        outcome["ended"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_s3_transfer_to_a_silent_server_stops_promptly(silent_s3, tmp_path: Path) -> None:
    # No bytes move once the request is sent: boto3's progress callback never runs again,
    # and botocore alone would wait for its read timeout times its attempts.
    storage = S3Storage(BUCKET, "", endpoint_url=silent_s3.url, presign_ttl_s=60)
    out, files = _outputs(tmp_path, {"a.png": 1000})
    stop = threading.Event()
    stopped_at: list[float] = []

    def should_stop() -> bool:
        if stop.is_set() and not stopped_at:
            stopped_at.append(time.monotonic())
        return stop.is_set()

    written: list[str] = []
    thread, outcome = _in_thread(lambda: store_outputs(files, out, "r1", storage,
                                                       should_stop=should_stop,
                                                       written=written))
    assert silent_s3.received.wait(20)  # the request is in flight
    stop.set()
    thread.join(5)
    assert not thread.is_alive(), "the upload ignored the stop"
    assert isinstance(outcome["error"], UploadCanceled)
    # About 0.45 s after the stop was seen (ABANDON_AFTER_S plus a poll); a loaded machine
    # gets some slack, well inside the 2 s a run has to stop.
    assert outcome["ended"] - stopped_at[0] < 2.0  # the stop budget of SPEC section 2
    assert written == ["runs/r1/hero/a.png"]  # for the discard


class _SlowClient:
    """A boto3 client stand-in whose upload completes only when the test says so."""

    def __init__(self) -> None:
        self.uploading = threading.Event()
        self.complete = threading.Event()
        self.deleted: list[str] = []
        self.deleted_event = threading.Event()

    def upload_file(self, filename: str, bucket: str, key: str, *, ExtraArgs: Any,
                    Callback: Any) -> None:
        self.uploading.set()
        assert self.complete.wait(30)  # the server answers late (no bytes meanwhile)

    def delete_object(self, *, Bucket: str, Key: str) -> None:
        self.deleted.append(Key)
        self.deleted_event.set()


def _abandoned_put(tmp_path: Path, **put_options: Any) -> tuple[_SlowClient, Any, dict]:
    """A put to a server that answers only when the test says, stopped once it started."""
    client = _SlowClient()
    storage = S3Storage(BUCKET, "pfx", endpoint_url=None, presign_ttl_s=60, client=client)
    src = tmp_path / "a.png"
    src.write_bytes(b"x")
    thread, outcome = _in_thread(lambda: storage.put(
        src, "runs/r1/hero/a.png", content_type="image/png", sha256="0",
        should_stop=client.uploading.is_set, **put_options))
    return client, thread, outcome


def test_an_abandoned_transfer_that_completes_later_deletes_its_object(tmp_path: Path
                                                                       ) -> None:
    client, thread, outcome = _abandoned_put(tmp_path)
    try:
        thread.join(3)
        assert not thread.is_alive(), "the caller waited for the stalled transfer"
        assert isinstance(outcome["error"], UploadCanceled)
        assert client.deleted == []  # nothing stored yet: nothing to delete
    finally:
        client.complete.set()  # the upload completes after all...
    assert client.deleted_event.wait(10)
    assert client.deleted == ["pfx/runs/r1/hero/a.png"]  # ...and its object is deleted


def test_an_abandoned_transfer_that_completes_after_a_shutdown_keeps_its_object(
        tmp_path: Path) -> None:
    # After a shutdown the run is released or taken over, and its next holder writes this
    # very key: a late delete would remove that holder's object.
    client, thread, outcome = _abandoned_put(tmp_path, keep_if_late=lambda: True)
    try:
        thread.join(3)
        assert isinstance(outcome["error"], UploadCanceled)
        helpers = [t for t in threading.enumerate() if t.name == "s3-put"]
    finally:
        client.complete.set()
    for helper in helpers:
        helper.join(10)
        assert not helper.is_alive()
    assert client.deleted == []


def test_a_transfer_that_completes_before_the_stop_keeps_its_object(tmp_path: Path
                                                                    ) -> None:
    client = _SlowClient()
    client.complete.set()
    storage = S3Storage(BUCKET, "", endpoint_url=None, presign_ttl_s=60, client=client)
    src = tmp_path / "a.png"
    src.write_bytes(b"x")
    storage.put(src, "runs/r1/hero/a.png", content_type="image/png", sha256="0",
                should_stop=lambda: False)
    assert client.uploading.is_set() and client.deleted == []


def test_storage_client_has_explicit_timeouts_and_bounded_retries() -> None:
    config = S3Storage(BUCKET, "", endpoint_url="http://127.0.0.1:9", presign_ttl_s=60
                       )._client.meta.config
    # botocore's defaults would be 60 s each and, with the old setting, 5 attempts.
    assert (config.connect_timeout, config.read_timeout,
            config.retries.get("total_max_attempts")) == (5.0, 20.0, 3)
    assert (storage_module.S3_CONNECT_TIMEOUT_S, storage_module.S3_READ_TIMEOUT_S,
            storage_module.S3_MAX_ATTEMPTS) == (5.0, 20.0, 3)  # the documented values


def test_a_background_discard_does_not_hold_its_caller(tmp_path: Path) -> None:
    release = threading.Event()

    class SlowDeletes(LocalStorage):
        def delete(self, key: str) -> None:
            assert release.wait(30)
            super().delete(key)

    storage = SlowDeletes(tmp_path / "store")
    out, files = _outputs(tmp_path, {"a.png": 10})
    written: list[str] = []
    store_outputs(files, out, "r1", storage, written=written)
    thread = discard_outputs_later(storage, written, run_id="r1")  # returns at once
    assert thread.is_alive() and (tmp_path / "store" / written[0]).exists()
    release.set()
    thread.join(10)
    assert not thread.is_alive() and list((tmp_path / "store").rglob("*")) == []


def test_a_discard_past_its_deadline_starts_no_delete(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "store")
    out, files = _outputs(tmp_path, {"a.png": 10, "b.png": 10})
    written: list[str] = []
    store_outputs(files, out, "r1", storage, written=written)
    discard_outputs(storage, written, run_id="r1", deadline=time.monotonic() - 1)
    assert (tmp_path / "store" / written[0]).exists()  # bounded: nothing started late
    discard_outputs(storage, written, run_id="r1", deadline=time.monotonic() + 60)
    assert list((tmp_path / "store").rglob("*")) == []


def test_local_upload_stops_between_files(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "store")
    out, files = _outputs(tmp_path, {"a.png": 10, "b.png": 10})
    written: list[str] = []
    with pytest.raises(UploadCanceled):
        store_outputs(files, out, "r1", storage, should_stop=lambda: bool(written),
                      written=written)
    assert written == ["runs/r1/hero/a.png"]
    discard_outputs(storage, written, run_id="r1")
    assert list((tmp_path / "store").rglob("*")) == []  # empty folders removed too


# --------------------------------------------------------------------------- keys


@pytest.mark.parametrize("output_id", ["../victim-run/hero", "..", ".", "a/b", "a\\b",
                                       "x\x00y", "tab\there", "x" * 256])
def test_output_id_that_is_not_one_safe_segment_is_refused(tmp_path: Path,
                                                           output_id: str) -> None:
    root = tmp_path / "outputs"
    victim = root / "runs" / "victim-run" / "hero" / "hero_00001_.png"
    victim.parent.mkdir(parents=True)
    victim.write_bytes(b"VICTIM")
    out = tmp_path / "out"
    out.mkdir()
    (out / "hero_00001_.png").write_bytes(b"ATTACKER")
    files = [OutputFile("9", "RunflowOutputImage", "hero_00001_.png", output_id)]
    with pytest.raises(RunFailure) as info:
        store_outputs(files, out, "attacker-run", LocalStorage(root))
    assert info.value.code is ErrorCode.UPLOAD_FAILED
    assert "output_id" in info.value.message and "safe path segment" in info.value.message
    assert victim.read_bytes() == b"VICTIM"
    assert not (root / "runs" / "attacker-run").exists()


def test_keys_stay_under_their_run() -> None:
    assert object_key("r1", "hero", "a.png") == "runs/r1/hero/a.png"
    assert object_key("r1", "12:3", "é.png") == "runs/r1/12:3/é.png"
    for run_id, output_id, filename in [("..", "hero", "a.png"), ("r1", "hero", ".."),
                                        ("r1", "", "a.png"), ("a/b", "hero", "a.png")]:
        with pytest.raises(RunFailure) as info:
            object_key(run_id, output_id, filename)
        assert info.value.code is ErrorCode.UPLOAD_FAILED


@pytest.mark.parametrize("segment", ["hero", "12:3", "é.png", "", ".", "..", "a\\b",
                                     "x\x00y", "tab\there", "del\x7f", "x" * 128,
                                     "x" * 129, "x" * 255, "x" * 256])
def test_outputs_and_storage_apply_the_one_path_segment_rule(segment: str) -> None:
    # runtime.graph.path_segment_problem is the rule; output keys and storage keys allow
    # file names up to 255 characters, while ids in the run message keep 128.
    refused = path_segment_problem(segment, max_chars=MAX_KEY_SEGMENT_CHARS) is not None
    try:
        object_key("r1", "hero", segment)
        output_refused = False
    except RunFailure:
        output_refused = True
    try:
        check_key(f"runs/r1/hero/{segment}")
        storage_refused = False
    except StorageError:
        storage_refused = True
    assert output_refused == storage_refused == refused
    assert (path_segment_problem(segment) is not None) == (refused or len(segment) > 128)


@pytest.mark.parametrize("key", ["runs/r1/../r2/hero/a.png", "/runs/r1/a", "runs//r1/a",
                                 "runs/r1/./a", "", "runs/r1/a\\..\\b", "runs/r1/\x00"])
def test_storage_refuses_keys_that_are_not_clean_relative_paths(tmp_path: Path,
                                                                key: str) -> None:
    with pytest.raises(StorageError):
        check_key(key)
    src = tmp_path / "f"
    src.write_bytes(b"x")
    with pytest.raises(StorageError):
        LocalStorage(tmp_path / "store").put(src, key, content_type="x", sha256="0")
    with pytest.raises(StorageError):
        S3Storage("bucket", "pfx", endpoint_url=None, presign_ttl_s=60,
                  client=object()).full_key(key)
    assert not (tmp_path / "store").exists()


def test_local_storage_writes_through_an_operators_symlink_inside_its_root(
        tmp_path: Path) -> None:
    # The operator put the outputs' runs/ on another disk: a link inside the root, which
    # only the worker writes, is followed (a clean key never leaves the root by itself).
    other_disk = tmp_path / "other-disk"
    other_disk.mkdir()
    root = tmp_path / "store"
    root.mkdir()
    (root / "runs").symlink_to(other_disk)
    src = tmp_path / "a.png"
    src.write_bytes(b"png")
    storage = LocalStorage(root)
    storage.put(src, "runs/r1/hero/a.png", content_type="image/png", sha256="0")
    assert (other_disk / "r1" / "hero" / "a.png").read_bytes() == b"png"
    assert storage.url_for("runs/r1/hero/a.png").endswith("/store/runs/r1/hero/a.png")


def test_local_storage_reads_an_output_once_and_its_digest_is_of_the_stored_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hashed as it is copied: no first read that a child still holding the file could
    outrun by changing it before the copy."""
    out, files = _outputs(tmp_path, {"a.png": 3000})

    def no_separate_hash(*args: Any, **kwargs: Any) -> str:
        raise AssertionError("local storage hashes the bytes it copies; no read before")

    monkeypatch.setattr("runflow_worker.run.outputs.sha256_of_fd", no_separate_hash)
    storage = LocalStorage(tmp_path / "stored")
    (entry,) = store_outputs(files, out, "r1", storage)
    stored = (tmp_path / "stored" / entry.key).read_bytes()
    assert stored == (out / "a.png").read_bytes()
    assert entry.sha256 == hashlib.sha256(stored).hexdigest()
    assert entry.size_bytes == len(stored) == 3000


def test_s3_storage_needs_the_digest_it_stores_as_metadata(tmp_path: Path) -> None:
    storage = S3Storage(BUCKET, "", endpoint_url="http://127.0.0.1:9", presign_ttl_s=60,
                        client=object())
    assert not storage.hashes_as_it_stores
    with pytest.raises(ValueError, match="sha256"):
        storage.put(tmp_path / "x", "runs/r1/o/x.png", content_type="image/png", sha256=None)
