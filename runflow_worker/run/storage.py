"""Output storage: an S3-compatible bucket, or a local directory (the embedded default).

``open_storage(url)`` takes ``s3://bucket/prefix`` or ``file:///dir``. Object keys are
``[<prefix>/]runs/<run_id>/<output_id>/<filename>``; each object carries its sha256 as
metadata. ``url_for`` gives a presigned GET (S3) or a ``file://`` URL (local).

Every key is checked (``check_key``) before it is used: each segment passes the one path
segment rule (``runtime.graph.path_segment_problem``), so nothing is ever written outside
the storage prefix. A transfer polls the caller's ``should_stop`` and ends with
``UploadCanceled`` once it returns True (a canceled or timed-out run stops within a fraction
of a second, also in the middle of a large file, and also when an S3 server stops
answering: see ``S3Storage.put``). Foreign errors (botocore, boto3, OS) leave as
``StorageError`` without the worker's local file paths.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Protocol
from urllib.parse import unquote, urlsplit

from runflow_worker.errors import ConfigError, StorageError, UploadCanceled
from runflow_worker.run.dirreserve import DirReserve, make_dirs
from runflow_worker.runtime.graph import path_segment_problem

log = logging.getLogger(__name__)

ShouldStop = Callable[[], bool]
"""Polled during a transfer: True once the run must stop."""
COPY_CHUNK_BYTES = 8 << 20
"""Local copies check ``should_stop`` between chunks of this size."""
MAX_KEY_SEGMENT_CHARS = 255
"""Longest segment of an object key (output ids, file names: a file name's limit on most
file systems; run ids are shorter by the message rules)."""

S3_CONNECT_TIMEOUT_S = 5.0
"""botocore connect timeout of the storage client."""
S3_READ_TIMEOUT_S = 20.0
"""botocore read timeout (no byte received for this long: the request failed)."""
S3_MAX_ATTEMPTS = 3
"""Attempts per S3 request, the first included ("standard" retry mode). With the timeouts
above a request to a server that stopped answering gives up after about a minute; a run's
stop never waits for that (``S3Storage.put``)."""
STOP_POLL_S = 0.05
"""How often a caller waiting on an S3 transfer polls ``should_stop``."""
ABANDON_AFTER_S = 0.4
"""After a stop is seen, how long the caller lets the transfer end by itself (its progress
callback raises as the next bytes move, and s3transfer aborts a multipart upload) before
abandoning it: a run's upload phase ends within about half a second of its stop."""


def check_key(key: str) -> str:
    """``key`` when it is a clean relative object key; StorageError otherwise.

    Clean: every ``/``-separated segment passes ``path_segment_problem`` (so no empty, ``.``
    or ``..`` segment, no leading slash, no backslash, no control character): normalising
    it changes nothing, so it stays under the prefix. Defence in depth: the keys come from
    ``run.outputs.object_key``, which checks its parts with the same rule.
    """
    for segment in key.split("/"):
        why = path_segment_problem(segment, max_chars=MAX_KEY_SEGMENT_CHARS)
        if why is not None:
            raise StorageError(f"refusing object key {key!r}: not a clean relative path "
                               f"(a segment {why})")
    return key


class StoredObject(NamedTuple):
    """What ``Storage.put`` stored: the digest and size its record reports."""

    sha256: str
    size_bytes: int


class Storage(Protocol):
    """Where a run's output files go."""

    hashes_as_it_stores: bool
    """True when ``put`` hashes the bytes as it writes them (``sha256=None``): the digest is
    then of the stored bytes exactly, whatever the source file becomes meanwhile (a run's
    output, which a warm child may still hold open)."""

    def put(self, local_path: Path, key: str, *, content_type: str, sha256: str | None,
            should_stop: ShouldStop | None = None,
            keep_if_late: ShouldStop | None = None) -> StoredObject:
        """Store ``local_path`` under ``key`` (relative to the storage prefix) and say what
        was stored; raise ``UploadCanceled`` once ``should_stop`` returns True, StorageError
        on failure. ``sha256``: the file's digest, taken before (None only for a storage
        that ``hashes_as_it_stores``). ``keep_if_late``: asked when a transfer given up after
        a stop completes all the same; True keeps the object (another holder of the run
        writes that key now)."""

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
    hashes_as_it_stores: ClassVar[bool] = True
    reserve: DirReserve | None = field(default=None, compare=False, repr=False)
    """Where new folders come from (``run.dirreserve``; the pipeline sets its run
    directories' reserve), else ``mkdir``."""
    _stored: tuple[str, str] | None = field(default=None, init=False, repr=False,
                                            compare=False)
    """The key last stored and its path (``url_for`` right after ``put``)."""

    def full_key(self, key: str) -> str:
        """Local storage has no prefix: the key is the path under ``root``."""
        return key

    @functools.cached_property
    def _root_resolved(self) -> Path:
        # Once: resolving the root walks every component of its path, twice a stored output.
        return self.root.resolve()

    @functools.cached_property
    def _root_str(self) -> str:
        return os.fspath(self._root_resolved)

    def _path_str(self, key: str) -> str:
        # Joined, not resolved: a clean key (``check_key``: no ``..``, no leading slash)
        # cannot leave the root, and nothing below the root is written by anyone but the
        # worker (no child sees it). Resolving walked every component of the path, ~0.1 ms
        # an output; and it refused an operator's symlink inside the root (``runs`` on
        # another disk, say) as an escape. A string: ``put`` runs for every output on the
        # run's path, where a key's path parsed and re-parsed by pathlib was a good part of it.
        return f"{self._root_str.rstrip('/')}/{check_key(key)}"

    def _path(self, key: str) -> Path:
        return Path(self._path_str(key))

    def put(self, local_path: Path, key: str, *, content_type: str, sha256: str | None,
            should_stop: ShouldStop | None = None,
            keep_if_late: ShouldStop | None = None) -> StoredObject:
        """Copy the file in, written atomically (never given up, so ``keep_if_late`` has
        nothing to decide), hashing the bytes as they are copied: the digest returned is of
        the stored file (``sha256``, given or not, is not needed).

        A copy, never a hard link: the file is a run's output, which the warm ComfyUI child
        (untrusted code) may still hold open and change; a link would share those changes
        with the stored object. One read, hashed as it is copied: hashed first and copied in
        a second read, the stored bytes could differ from the digest.
        """
        root = self._root_str
        dest = self._path_str(key)
        if _stopped(should_stop):
            raise UploadCanceled(f"upload of {key!r} stopped")
        parent, _, name = dest.rpartition("/")
        tmp = f"{parent}/.{name}.{os.getpid()}.tmp"
        try:
            make_dirs(parent, under=root, reserve=self.reserve)
            # An empty file made ahead, written without O_TRUNC: on ext4 a truncation to
            # zero makes close() start the file's writeback (the auto_da_alloc heuristic).
            taken = self.reserve is not None and self.reserve.take_file(tmp, under=root)
            stored = _copy(local_path, tmp, should_stop, key, truncate=not taken)
            os.replace(tmp, dest)
            self._stored = (key, dest)
            return stored
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise StorageError(f"cannot write output {key!r}: {exc.strerror or exc}") from exc
        except UploadCanceled:
            Path(tmp).unlink(missing_ok=True)
            raise

    def delete(self, key: str) -> None:
        """Remove the file, then its directories up to ``root`` that are left empty."""
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot delete output {key!r}: {exc.strerror or exc}") from exc
        root = self._root_resolved
        for parent in path.parents:
            if parent == root or not parent.is_relative_to(root):
                break
            try:
                parent.rmdir()
            except OSError:
                break  # not empty (or gone): the directories above are not empty either

    def url_for(self, key: str) -> str:
        """A ``file://`` URL of the stored object."""
        stored = self._stored
        # Right after its ``put`` (the usual call), the path that put made.
        path = Path(stored[1]) if stored is not None and stored[0] == key else self._path(key)
        return path.as_uri()


def _copy(src: Path, dest: Path | str, should_stop: ShouldStop | None, key: str, *,
          truncate: bool = True) -> StoredObject:
    """Copy ``src`` to ``dest`` in chunks, stopping when ``should_stop`` says so; the
    digest and size of what was written. ``truncate=False`` when ``dest`` is known to be a
    new, empty file.

    Descriptors, not file objects: ``open`` asks each file whether it is a terminal and
    where it stands (three system calls a file, ~0.1 ms of a warm run on a small VM)."""
    fin = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if truncate else 0)
        fout = os.open(dest, flags, 0o666)
        try:
            digest, size = hashlib.sha256(), 0
            while chunk := os.read(fin, COPY_CHUNK_BYTES):
                if _stopped(should_stop):
                    raise UploadCanceled(f"upload of {key!r} stopped")
                digest.update(chunk)
                size += len(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fout, view):]
        finally:
            os.close(fout)
    finally:
        os.close(fin)
    return StoredObject(digest.hexdigest(), size)


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


class _Transfer:
    """One S3 upload on its helper thread, and what its caller decided about it.

    The caller may *abandon* a transfer that does not end after a stop (a server that
    accepted the request and never answers: no bytes move, so the progress callback never
    runs). The helper thread then runs on until botocore gives up; should the upload
    complete after all, the thread deletes the object itself, so an abandoned upload leaves
    nothing behind (best-effort).
    """

    def __init__(self, storage: S3Storage, key: str, should_stop: ShouldStop | None,
                 keep_if_late: ShouldStop | None) -> None:
        self.storage = storage
        self.key = key
        self.should_stop = should_stop
        self.keep_if_late = keep_if_late
        self.stop = threading.Event()
        """Set by the caller once it saw the stop: the progress callback raises."""
        self.done = threading.Event()
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._finished = False
        self._abandoned = False

    def progress(self, _bytes: int) -> None:
        """boto3's progress callback (its transfer threads, as bytes go out).

        Raising fails the transfer (s3transfer aborts a multipart upload).
        """
        if self.stop.is_set() or _stopped(self.should_stop):
            raise UploadCanceled(f"upload of {self.key!r} stopped")

    def run(self, upload: Callable[[Callable[[int], None]], None]) -> None:
        """The helper thread: ``upload(progress)``, then settle with the caller."""
        try:
            upload(self.progress)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            self.error = exc
        with self._lock:
            self._finished = True
            orphan = self._abandoned and self.error is None
        self.done.set()
        # After a shutdown the run is released or taken over: its next holder writes this
        # very key, and deleting it now could remove that holder's object.
        if orphan and not _stopped(self.keep_if_late):
            self.storage.delete_quietly(self.key, why="its upload completed after the run "
                                                      "stopped waiting for it")

    def abandon(self) -> bool:
        """Give the transfer up; False when it has already finished (its outcome counts)."""
        with self._lock:
            if self._finished:
                return False
            self._abandoned = True
            return True


class S3Storage:
    """Outputs in an S3-compatible bucket, returned as presigned GET URLs.

    The client has explicit timeouts and a bounded retry count (``S3_CONNECT_TIMEOUT_S``,
    ``S3_READ_TIMEOUT_S``, ``S3_MAX_ATTEMPTS``) instead of botocore's 60 s and 5 attempts.
    """

    hashes_as_it_stores = False
    """The object's metadata carries the digest, so it is taken before the upload (of the
    same open file; a child that changes its output meanwhile makes them differ: its own
    run's record, nobody else's)."""

    def __init__(self, bucket: str, prefix: str, *, endpoint_url: str | None,
                 presign_ttl_s: int, client: object | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.presign_ttl_s = presign_ttl_s
        self._client: Any = client or s3_client(endpoint_url)

    def full_key(self, key: str) -> str:
        """``<prefix>/<key>`` (or ``key`` without a prefix)."""
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, local_path: Path, key: str, *, content_type: str, sha256: str | None,
            should_stop: ShouldStop | None = None,
            keep_if_late: ShouldStop | None = None) -> StoredObject:
        """Upload (multipart for large files) with ``sha256`` (required) as object metadata.

        The transfer runs on a helper thread while this thread polls ``should_stop`` every
        ``STOP_POLL_S``: once it returns True the transfer is told to stop (it ends at its
        next bytes) and, if it has not ended ``ABANDON_AFTER_S`` later (a server that went
        silent), it is abandoned and ``UploadCanceled`` raised anyway. ``should_stop`` is
        also called from boto3's transfer threads.
        """
        if sha256 is None:
            raise ValueError("S3Storage.put needs the file's sha256 (its object metadata)")
        full_key = self.full_key(key)
        if _stopped(should_stop):
            raise UploadCanceled(f"upload of {key!r} stopped")
        size_bytes = os.stat(local_path).st_size
        transfer = _Transfer(self, key, should_stop, keep_if_late)

        def upload(progress: Callable[[int], None]) -> None:
            self._client.upload_file(
                str(local_path), self.bucket, full_key,
                ExtraArgs={"ContentType": content_type, "Metadata": {"sha256": sha256}},
                Callback=progress,
            )

        # A daemon thread, so that it never holds the process's exit itself. (s3transfer's
        # own pool threads may, for an abandoned transfer: until botocore gives up, at most
        # about S3_MAX_ATTEMPTS x (connect + read timeout).)
        threading.Thread(target=transfer.run, args=(upload,), name="s3-put",
                         daemon=True).start()
        stop_seen: float | None = None
        while not transfer.done.wait(STOP_POLL_S):
            if stop_seen is None and _stopped(should_stop):
                stop_seen = time.monotonic()
                transfer.stop.set()
            if stop_seen is not None and time.monotonic() - stop_seen >= ABANDON_AFTER_S:
                if transfer.abandon():
                    log.warning("upload of %s abandoned: no answer %.1f s after the stop",
                                key, ABANDON_AFTER_S, extra={"event": "upload_abandoned"})
                    raise UploadCanceled(f"upload of {key!r} stopped (transfer abandoned)")
                break  # it finished just now: its own outcome counts
        self._raise_for(transfer, should_stop)
        return StoredObject(sha256, size_bytes)

    def _raise_for(self, transfer: _Transfer, should_stop: ShouldStop | None) -> None:
        """Re-raise a finished transfer's error in the caller's thread, translated."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        exc = transfer.error
        if exc is None:
            return
        key = transfer.key
        if isinstance(exc, UploadCanceled):
            raise UploadCanceled(f"upload of {key!r} stopped") from exc
        if isinstance(exc, (Boto3Error, BotoCoreError, ClientError, OSError)):
            if transfer.stop.is_set() or _stopped(should_stop):
                # The stop surfaced as a transfer error.
                raise UploadCanceled(f"upload of {key!r} stopped") from exc
            raise StorageError(f"upload of {key!r} to bucket {self.bucket!r} failed: "
                               f"{_s3_reason(exc)}") from exc
        raise exc  # a bug, not a storage error: as it was raised

    def delete_quietly(self, key: str, *, why: str) -> None:
        """``delete``, logging a failure instead of raising (for background clean-ups)."""
        try:
            self.delete(key)
        except StorageError as exc:
            log.warning("could not delete %s (%s): %s", key, why, exc,
                        extra={"event": "output_delete_failed"})
        else:
            log.info("deleted %s: %s", key, why, extra={"event": "output_deleted"})

    def delete(self, key: str) -> None:
        """Delete the object (S3 answers success for a missing key too)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.delete_object(
                Bucket=self.bucket, Key=self.full_key(key))
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"cannot delete {key!r} from bucket {self.bucket!r}: "
                               f"{_s3_reason(exc)}") from exc

    def url_for(self, key: str) -> str:
        """A presigned GET URL valid for ``presign_ttl_s``."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self._client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self.full_key(key)},
                ExpiresIn=self.presign_ttl_s,
            )
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"cannot presign {key!r}: {type(exc).__name__}") from exc


def s3_client(endpoint_url: str | None) -> Any:
    """A boto3 S3 client with the storage's timeouts and bounded retries."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3", endpoint_url=endpoint_url,
        config=Config(connect_timeout=S3_CONNECT_TIMEOUT_S, read_timeout=S3_READ_TIMEOUT_S,
                      retries={"total_max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"},
                      s3={"addressing_style": "path"} if endpoint_url else {}),
    )


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
