"""Output storage: S3 errors translated, transfers that stop, keys that stay in their run.

S3 is moto in server mode on loopback (real HTTP, so boto3's transfer threads and retries
run as they do against a bucket).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runtime.protocol import OutputFile
from worker.errors import ErrorCode, RunFailure, StorageError
from worker.outputs import discard_outputs, object_key, store_outputs
from worker.storage import LocalStorage, S3Storage, UploadCanceled, check_key

pytestmark = pytest.mark.timeout(120)

BUCKET = "outputs"


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Any]]:
    """A moto S3 endpoint with the bucket ``outputs``: its URL and a client."""
    import boto3
    from moto.server import ThreadedMotoServer

    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    try:
        yield url, client
    finally:
        server.stop()


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

    def put(self, local_path: Path, key: str, **kwargs: Any) -> None:
        self.current = key
        super().put(local_path, key, **kwargs)


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
