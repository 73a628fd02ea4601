"""Output storage: an S3-compatible bucket, or a local directory (the embedded default).

``open_storage(url)`` takes ``s3://bucket/prefix`` or ``file:///dir``. Object keys are
``[<prefix>/]runs/<run_id>/<output_id>/<filename>``; each object carries its sha256 as
metadata. ``url_for`` gives a presigned GET (S3) or a ``file://`` URL (local).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

from worker.errors import ConfigError, StorageError


class Storage(Protocol):
    """Where a run's output files go."""

    def put(self, local_path: Path, key: str, *, content_type: str, sha256: str) -> None:
        """Store ``local_path`` under ``key`` (relative to the storage prefix)."""

    def full_key(self, key: str) -> str:
        """The object key with the storage prefix."""

    def url_for(self, key: str) -> str:
        """A URL a client can GET the object from."""


@dataclass
class LocalStorage:
    """Outputs in a directory on disk, addressed by ``file://`` URLs."""

    root: Path

    def full_key(self, key: str) -> str:
        """Local storage has no prefix: the key is the path under ``root``."""
        return key

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise StorageError(f"key {key!r} escapes the storage directory")
        return path

    def put(self, local_path: Path, key: str, *, content_type: str, sha256: str) -> None:
        """Copy the file in (same volume: hard link), written atomically."""
        dest = self._path(key)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
            try:
                os.link(local_path, tmp)
            except OSError:
                shutil.copyfile(local_path, tmp)
            os.replace(tmp, dest)
        except OSError as exc:
            raise StorageError(f"cannot write output {key!r}: {exc.strerror or exc}") from exc

    def url_for(self, key: str) -> str:
        """A ``file://`` URL of the stored object."""
        return self._path(key).as_uri()


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
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, local_path: Path, key: str, *, content_type: str, sha256: str) -> None:
        """Upload (multipart for large files) with the sha256 as object metadata."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.upload_file(  # type: ignore[attr-defined]
                str(local_path), self.bucket, self.full_key(key),
                ExtraArgs={"ContentType": content_type, "Metadata": {"sha256": sha256}},
            )
        except (BotoCoreError, ClientError, OSError) as exc:
            raise StorageError(f"upload of {key!r} to bucket {self.bucket!r} failed: "
                               f"{type(exc).__name__}") from exc

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
