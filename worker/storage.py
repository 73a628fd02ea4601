"""Output storage: an S3-compatible bucket, or a local directory (the embedded default).

``open_storage(url)`` takes ``s3://bucket/prefix`` or ``file:///dir``. Object keys are
``[<prefix>/]runs/<run_id>/<output_id>/<filename>``; each object carries its sha256 as
metadata. ``url_for`` gives a presigned GET (S3) or a ``file://`` URL (local).

Every key is checked (``check_key``) before it is used: a clean relative path, so nothing is
ever written outside the storage prefix. A transfer polls the caller's ``should_stop`` and
ends with ``UploadCanceled`` once it returns True (a canceled or timed-out run stops within
a fraction of a second, also in the middle of a large file). Foreign errors (botocore,
boto3, OS) leave as ``StorageError`` without the worker's local file paths.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

from worker.errors import ConfigError, StorageError, WorkerError

log = logging.getLogger(__name__)

ShouldStop = Callable[[], bool]
"""Polled during a transfer: True once the run must stop."""
COPY_CHUNK_BYTES = 8 << 20
"""Local copies (when a hard link is impossible) check ``should_stop`` between chunks."""


class UploadCanceled(WorkerError):
    """A transfer stopped because the caller's ``should_stop`` returned True."""


def check_key(key: str) -> str:
    """``key`` when it is a clean relative object key; StorageError otherwise.

    Clean: no empty, ``.`` or ``..`` segment (so no leading slash either), no backslash, no
    control character; normalising it changes nothing, so it stays under the prefix.
    """
    segments = key.split("/")
    if (not key or any(s in ("", ".", "..") for s in segments)
            or any(c == "\\" or ord(c) < 32 or c == "\x7f" for c in key)):
        raise StorageError(f"refusing object key {key!r}: not a clean relative path")
    return key


class Storage(Protocol):
    """Where a run's output files go."""

    def put(self, local_path: Path, key: str, *, content_type: str, sha256: str,
            should_stop: ShouldStop | None = None) -> None:
        """Store ``local_path`` under ``key`` (relative to the storage prefix); raise
        ``UploadCanceled`` once ``should_stop`` returns True, StorageError on failure."""

    def delete(self, key: str) -> None:
        """Remove the object at ``key`` (absent: nothing to do); StorageError on failure."""

    def full_key(self, key: str) -> str:
        """The object key with the storage prefix."""

    def url_for(self, key: str) -> str:
        """A URL a client can GET the object from."""


def _stopped(should_stop: ShouldStop | None) -> bool:
    return should_stop is not None and should_stop()


@dataclass
class LocalStorage:
    """Outputs in a directory on disk, addressed by ``file://`` URLs."""

    root: Path

    def full_key(self, key: str) -> str:
        """Local storage has no prefix: the key is the path under ``root``."""
        return key

    def _path(self, key: str) -> Path:
        path = (self.root / check_key(key)).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise StorageError(f"key {key!r} escapes the storage directory")
        return path

    def put(self, local_path: Path, key: str, *, content_type: str, sha256: str,
            should_stop: ShouldStop | None = None) -> None:
        """Copy the file in (same volume: hard link), written atomically."""
        dest = self._path(key)
        if _stopped(should_stop):
            raise UploadCanceled(f"upload of {key!r} stopped")
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(local_path, tmp)
            except OSError:
                _copy(local_path, tmp, should_stop, key)
            os.replace(tmp, dest)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StorageError(f"cannot write output {key!r}: {exc.strerror or exc}") from exc
        except UploadCanceled:
            tmp.unlink(missing_ok=True)
            raise

    def delete(self, key: str) -> None:
        """Remove the file, then its directories up to ``root`` that are left empty."""
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot delete output {key!r}: {exc.strerror or exc}") from exc
        root = self.root.resolve()
        for parent in path.parents:
            if parent == root or not parent.is_relative_to(root):
                break
            try:
                parent.rmdir()
            except OSError:
                break  # not empty (or gone): the directories above are not empty either

    def url_for(self, key: str) -> str:
        """A ``file://`` URL of the stored object."""
        return self._path(key).as_uri()


def _copy(src: Path, dest: Path, should_stop: ShouldStop | None, key: str) -> None:
    """Copy ``src`` to ``dest`` in chunks, stopping when ``should_stop`` says so."""
    if should_stop is None:
        shutil.copyfile(src, dest)
        return
    with src.open("rb") as fin, dest.open("wb") as fout:
        while chunk := fin.read(COPY_CHUNK_BYTES):
            if should_stop():
                raise UploadCanceled(f"upload of {key!r} stopped")
            fout.write(chunk)


def _s3_reason(exc: BaseException) -> str:
    """What went wrong, for messages: the S3 error code when there is one, else the type.

    Never ``str(exc)``: boto3's messages name the worker's local file path.
    """
    from botocore.exceptions import ClientError

    seen: BaseException | None = exc
    for _ in range(5):  # S3UploadFailedError wraps the ClientError as its context
        if seen is None:
            break
        if isinstance(seen, ClientError):
            code = seen.response.get("Error", {}).get("Code")
            return f"{type(exc).__name__} ({code})" if code else type(exc).__name__
        seen = seen.__cause__ or seen.__context__
    return type(exc).__name__


class S3Storage:
    """Outputs in an S3-compatible bucket, returned as presigned GET URLs."""

    def __init__(self, bucket: str, prefix: str, *, endpoint_url: str | None,
                 presign_ttl_s: int, client: object | None = None) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.presign_ttl_s = presign_ttl_s
        self._client = client or boto3.client(
            "s3", endpoint_url=endpoint_url,
            config=Config(retries={"max_attempts": 5, "mode": "standard"},
                          s3={"addressing_style": "path"} if endpoint_url else {}),
        )

    def full_key(self, key: str) -> str:
        """``<prefix>/<key>`` (or ``key`` without a prefix)."""
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, local_path: Path, key: str, *, content_type: str, sha256: str,
            should_stop: ShouldStop | None = None) -> None:
        """Upload (multipart for large files) with the sha256 as object metadata."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        full_key = self.full_key(key)
        if _stopped(should_stop):
            raise UploadCanceled(f"upload of {key!r} stopped")

        def progress(_bytes: int) -> None:
            # boto3 calls this from its transfer threads as bytes go out; raising here
            # fails the transfer (a multipart upload is aborted by s3transfer).
            if _stopped(should_stop):
                raise UploadCanceled(f"upload of {key!r} stopped")

        try:
            self._client.upload_file(  # type: ignore[attr-defined]
                str(local_path), self.bucket, full_key,
                ExtraArgs={"ContentType": content_type, "Metadata": {"sha256": sha256}},
                Callback=progress if should_stop is not None else None,
            )
        except UploadCanceled:
            raise
        except (Boto3Error, BotoCoreError, ClientError, OSError) as exc:
            if _stopped(should_stop):  # the stop surfaced as a transfer error
                raise UploadCanceled(f"upload of {key!r} stopped") from exc
            raise StorageError(f"upload of {key!r} to bucket {self.bucket!r} failed: "
                               f"{_s3_reason(exc)}") from exc

    def delete(self, key: str) -> None:
        """Delete the object (S3 answers success for a missing key too)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.delete_object(  # type: ignore[attr-defined]
                Bucket=self.bucket, Key=self.full_key(key))
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"cannot delete {key!r} from bucket {self.bucket!r}: "
                               f"{_s3_reason(exc)}") from exc

    def url_for(self, key: str) -> str:
        """A presigned GET URL valid for ``presign_ttl_s``."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self._client.generate_presigned_url(  # type: ignore[attr-defined]
                "get_object", Params={"Bucket": self.bucket, "Key": self.full_key(key)},
                ExpiresIn=self.presign_ttl_s,
            )
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"cannot presign {key!r}: {type(exc).__name__}") from exc


def open_storage(url: str, *, endpoint_url: str | None = None,
                 presign_ttl_s: int = 3600) -> Storage:
    """Storage for ``s3://bucket/prefix`` or ``file:///dir``; ConfigError otherwise."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        return LocalStorage(Path(unquote(parts.path)))
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ConfigError(f"storage URL {url!r} has no bucket")
        return S3Storage(parts.netloc, parts.path, endpoint_url=endpoint_url,
                         presign_ttl_s=presign_ttl_s)
    raise ConfigError(f"storage URL must be s3://bucket/prefix or file:///dir, not {url!r}")
