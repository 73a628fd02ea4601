"""Where blob bytes come from: https URLs, S3 objects, Runflow assets and local mirrors.

``Sources`` turns the URLs a deployment gives for a digest into ``Source`` objects, in order:

1. local mirror directories (offline operation), searched for a file named by the sha256,
   as ``<dir>/<sha256>`` or in the store's own layout ``<dir>/sha256/<aa>/<sha256>``;
2. each URL: ``https://`` (through the SSRF-safe ``Fetcher``), ``s3://bucket/key`` (boto3,
   any endpoint), ``runflow://assets/<uuid>`` (object ``assets/<uuid>`` of the asset bucket),
   and ``file://`` paths only when explicitly allowed.

Every source writes into a file given by the store, hashing in the same pass, and can resume
from a byte offset. The store tries them in turn until one yields the right digest.

Each source says whether it is ``private``: it needed credentials (an S3 object or a Runflow
asset, read with the worker's; an https URL with user info or one the fetcher sends a
credential header to; a ``file://`` path the worker can read). The store hands bytes a
private source gave to another owner's run only once that run's own source has shown them
(``runflow_worker/cache/access.py``). ``S3Source.content_sha256`` is the cheap way to show them: the sha256
S3 keeps of a whole object uploaded in one part with a SHA256 checksum.

``s3://`` reads arbitrary buckets with the worker's own credentials: enable it for URLs a
deployment (the platform) supplies, not for URLs a caller supplies.
"""

from __future__ import annotations

import base64
import os
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    IncompleteReadError,
    NoCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from runflow_worker.cache.errors import (
    CacheError,
    FetchConnectError,
    FetchError,
    FetchInterrupted,
    FetchTimeout,
    FetchTooLarge,
    SourceUnavailable,
    URLRefused,
    redact_url,
)
from runflow_worker.cache.fetcher import DEFAULT_MAX_BYTES, Fetcher, FetchResult
from runflow_worker.cache.hashing import HashingFileWriter
from runflow_worker.cache.progress import (
    Cancel,
    CancelCheck,
    Progress,
    ProgressThrottle,
    continues_at,
    finish_from_file,
    resume_after_cuts,
)

CHUNK_BYTES = 1 << 20
RESUME_ATTEMPTS = 3
BeforeBody = Callable[[int | None], None]


class Source(Protocol):
    """Something that can write one blob's bytes into a file."""

    label: str
    """Where the bytes come from, safe for messages (no credentials, no query string)."""
    private: bool
    """The source needed credentials: its bytes are not everyone's to have."""

    def fetch(
        self,
        dest: Path,
        *,
        start_offset: int = 0,
        max_bytes: int = DEFAULT_MAX_BYTES,
        progress: Progress | None = None,
        cancel: Cancel | None = None,
        before_body: BeforeBody | None = None,
        fsync: bool = True,
    ) -> FetchResult:
        """Write the content into ``dest`` (keeping its first ``start_offset`` bytes if the
        source can continue from there) and return size and sha256 of the whole file.
        ``fsync=False``: leave the bytes to the page cache (a file that dies with the run)."""
        ...


class HttpsSource:
    """An ``https://`` URL, fetched through the SSRF-safe fetcher."""

    def __init__(self, url: str, fetcher: Fetcher) -> None:
        self.url = url
        self.label = redact_url(url)
        self._fetcher = fetcher
        self.private = _needs_credentials(url, fetcher)

    def fetch(
        self,
        dest: Path,
        *,
        start_offset: int = 0,
        max_bytes: int = DEFAULT_MAX_BYTES,
        progress: Progress | None = None,
        cancel: Cancel | None = None,
        before_body: BeforeBody | None = None,
        fsync: bool = True,
    ) -> FetchResult:
        """Download the URL into ``dest`` (see ``Fetcher.fetch_to_file``)."""
        return self._fetcher.fetch_to_file(
            self.url, dest, max_bytes=max_bytes, cancel=cancel, progress=progress,
            start_offset=start_offset, before_body=before_body, fsync=fsync,
        )


class FileSource:
    """A local file: a mirror entry, or a ``file://`` URL where those are allowed."""

    def __init__(self, path: Path, label: str | None = None, *, direct_io: bool = True,
                 private: bool = False) -> None:
        self.path = path
        self.label = label or f"mirror file {path.name}"
        self._direct_io = direct_io
        self.private = private
        """False for a mirror: the operator's, and tried first for every run anyway."""

    def fetch(
        self,
        dest: Path,
        *,
        start_offset: int = 0,
        max_bytes: int = DEFAULT_MAX_BYTES,
        progress: Progress | None = None,
        cancel: Cancel | None = None,
        before_body: BeforeBody | None = None,
        fsync: bool = True,
    ) -> FetchResult:
        """Copy the file into ``dest``, hashing as it goes (a copy, never a link: the mirror
        may be read-only or change later)."""
        checker = CancelCheck(cancel)
        throttle = ProgressThrottle(progress)
        try:
            src = self.path.open("rb", buffering=0)
        except FileNotFoundError as exc:
            raise SourceUnavailable(f"{self.label} does not exist", reason="not_found") from exc
        except OSError as exc:
            raise SourceUnavailable(f"cannot read {self.label}") from exc
        with src:
            total = self._size(src)
            if total > max_bytes:
                raise FetchTooLarge(f"{self.label} is {total} bytes, over {max_bytes}")
            offset = start_offset if 0 < start_offset <= total else 0
            if before_body is not None:
                before_body(total - offset)
            writer = HashingFileWriter(dest, start_offset=offset, expected_bytes=total - offset,
                                       direct_io=self._direct_io)
            try:
                src.seek(offset)
                while chunk := src.read(CHUNK_BYTES):
                    checker.raise_if_canceled()
                    writer.write(chunk)
                    throttle(writer.size, total)
            except OSError as exc:
                writer.abort()
                raise SourceUnavailable(f"reading {self.label} failed") from exc
            except BaseException:
                writer.abort()
                raise
            digest, size = writer.close(fsync=fsync)
            throttle(size, total, final=True)
        return FetchResult(dest, size, digest, None, self.label)

    @staticmethod
    def _size(f: Any) -> int:
        return os.fstat(f.fileno()).st_size


class S3Source:
    """An object in an S3-compatible store, read with boto3 (``Range`` for resumes)."""

    def __init__(self, bucket: str, key: str, client: Callable[[], Any], label: str | None = None,
                 *, direct_io: bool = True):
        self.bucket = bucket
        self.key = key
        self.label = label or f"s3://{bucket}/{key}"
        self._client = client
        self._direct_io = direct_io
        self.private = True  # read with the worker's credentials

    def content_sha256(self) -> tuple[str, int] | None:
        """The hex sha256 and size of the whole object as S3 keeps them, or None when it
        keeps none that is one (no checksum, another algorithm, a multipart object's
        checksum of part checksums, an error).

        S3 checks a ``ChecksumSHA256`` given at upload against the bytes it receives, and for
        an object put in one part that is the sha256 of the whole object.
        """
        try:
            head = self._client().head_object(Bucket=self.bucket, Key=self.key,
                                              ChecksumMode="ENABLED")
        except (BotoCoreError, ClientError, OSError):
            return None
        value = head.get("ChecksumSHA256")
        kind = head.get("ChecksumType")
        if not isinstance(value, str) or "-" in value or kind not in (None, "FULL_OBJECT"):
            return None  # "<b64>-<parts>" / COMPOSITE: a checksum of the parts' checksums
        try:
            raw = base64.b64decode(value, validate=True)
            size = int(head["ContentLength"])
        except (ValueError, KeyError, TypeError):
            return None
        return (raw.hex(), size) if len(raw) == 32 else None

    def fetch(
        self,
        dest: Path,
        *,
        start_offset: int = 0,
        max_bytes: int = DEFAULT_MAX_BYTES,
        progress: Progress | None = None,
        cancel: Cancel | None = None,
        before_body: BeforeBody | None = None,
        fsync: bool = True,
    ) -> FetchResult:
        """Download the object into ``dest``, resuming after a cut up to RESUME_ATTEMPTS times."""
        checker = CancelCheck(cancel)
        throttle = ProgressThrottle(progress)
        version: dict[str, str] = {}  # the ETag of the object the download started on
        return resume_after_cuts(
            lambda offset: self._transfer(dest, offset, max_bytes, checker, throttle,
                                          before_body, version, fsync),
            dest, start_offset=start_offset, attempts=RESUME_ATTEMPTS)

    def _transfer(
        self,
        dest: Path,
        offset: int,
        max_bytes: int,
        checker: CancelCheck,
        throttle: ProgressThrottle,
        before_body: BeforeBody | None,
        version: dict[str, str],
        fsync: bool,
    ) -> FetchResult:
        checker.raise_if_canceled()
        request: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key}
        if offset > 0:
            request["Range"] = f"bytes={offset}-"
            if "etag" in version:
                # The rest of the object the download started on, or nothing: an object
                # replaced in between must not be spliced onto the old one's bytes.
                request["IfMatch"] = version["etag"]
        try:
            response = self._client().get_object(**request)
        except ClientError as exc:
            if offset > 0 and _error_code(exc) in ("PreconditionFailed", "412"):
                version.clear()
                return self._transfer(dest, 0, max_bytes, checker, throttle, before_body,
                                      version, fsync)
            if offset > 0 and _error_code(exc) == "InvalidRange":
                if self._size() == offset and offset <= max_bytes:
                    # The file already holds every byte (its writer was killed before
                    # publishing): its hash decides, not a second download.
                    digest, size = finish_from_file(dest)
                    throttle(size, size, final=True)
                    return FetchResult(dest, size, digest, None, self.label)
                return self._transfer(dest, 0, max_bytes, checker, throttle, before_body,
                                      version, fsync)
            raise self._translate(exc) from exc
        except (BotoCoreError, OSError) as exc:
            raise self._translate(exc) from exc
        length = response.get("ContentLength")
        if offset > 0 and not response.get("ContentRange"):
            offset = 0  # the store ignored Range: the body is the whole object
        elif offset > 0 and not continues_at(response.get("ContentRange"), offset, length):
            response["Body"].close()  # a range that continues nothing: start again
            return self._transfer(dest, 0, max_bytes, checker, throttle, before_body, version,
                                  fsync)
        if offset == 0 and response.get("ETag"):
            version["etag"] = response["ETag"]
        total = offset + length if length is not None else None
        body = response["Body"]
        try:
            if total is not None and total > max_bytes:
                raise FetchTooLarge(f"{self.label} is {total} bytes, over {max_bytes}")
            if before_body is not None:
                before_body(length)
            writer = HashingFileWriter(dest, start_offset=offset, expected_bytes=length,
                                       direct_io=self._direct_io)
            try:
                for chunk in body.iter_chunks(CHUNK_BYTES):
                    checker.raise_if_canceled()
                    if writer.size + len(chunk) > max_bytes:
                        raise FetchTooLarge(f"{self.label} exceeds {max_bytes} bytes")
                    writer.write(chunk)
                    throttle(writer.size, total)
            except (BotoCoreError, OSError) as exc:
                writer.abort()
                raise self._translate(exc, in_body=True) from exc
            except BaseException:
                writer.abort()
                raise
            digest, size = writer.close(fsync=fsync)
        finally:
            body.close()
        if total is not None and size != total:
            raise FetchInterrupted(f"{self.label} ended early", received_bytes=size)
        throttle(size, total, final=True)
        return FetchResult(dest, size, digest, response.get("ContentType"), self.label)

    def _size(self) -> int | None:
        """The object's size (HEAD), or None when it cannot be read."""
        try:
            return int(self._client().head_object(Bucket=self.bucket, Key=self.key)
                       ["ContentLength"])
        except (BotoCoreError, ClientError, OSError, KeyError, ValueError):
            return None

    def _translate(self, exc: Exception, *, in_body: bool = False) -> FetchError:
        if isinstance(exc, ClientError):
            code = _error_code(exc)
            if code in ("NoSuchKey", "NoSuchBucket", "404", "NotFound"):
                return SourceUnavailable(f"{self.label} does not exist", reason="not_found")
            if code in ("AccessDenied", "403", "Forbidden", "InvalidAccessKeyId",
                        "SignatureDoesNotMatch"):
                return SourceUnavailable(f"access to {self.label} denied", reason="denied")
            return SourceUnavailable(f"reading {self.label} failed ({code})")
        if isinstance(exc, NoCredentialsError):
            return SourceUnavailable(f"no credentials to read {self.label}", reason="denied")
        if isinstance(exc, (ConnectTimeoutError, ReadTimeoutError)) and not in_body:
            return FetchTimeout(f"timed out reading {self.label}")
        if in_body or isinstance(exc, (IncompleteReadError, ResponseStreamingError)):
            return FetchInterrupted(f"connection dropped while reading {self.label}")
        if isinstance(exc, EndpointConnectionError):
            return FetchConnectError(f"cannot connect to the endpoint for {self.label}")
        return FetchConnectError(f"reading {self.label} failed ({type(exc).__name__})")


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class Sources:
    """Builds the ``Source`` list for a digest from its URLs and the configured mirrors.

    ``fetcher``: for https URLs. ``s3_client``: a factory returning a boto3 S3 client (called
    once, lazily). ``asset_bucket``: bucket of ``runflow://assets/<uuid>``. ``mirror_dirs``:
    offline mirror directories. ``allow_file_urls``: accept ``file://`` URLs. ``allow_s3``:
    accept ``s3://`` URLs. ``direct_io``: mirror and S3 copies write large files past the
    page cache (https downloads follow their ``Fetcher``'s own setting).
    """

    def __init__(
        self,
        *,
        fetcher: Fetcher | None = None,
        s3_client: Callable[[], Any] | None = None,
        asset_bucket: str | None = None,
        mirror_dirs: Sequence[Path] = (),
        allow_file_urls: bool = False,
        allow_s3: bool = True,
        direct_io: bool = True,
    ) -> None:
        self.fetcher = fetcher
        self.direct_io = direct_io
        self.asset_bucket = asset_bucket
        self.mirror_dirs = tuple(Path(d) for d in mirror_dirs)
        self.allow_file_urls = allow_file_urls
        self.allow_s3 = allow_s3
        self._client_factory = s3_client
        self._client: Any = None
        self._client_lock = threading.Lock()

    def mirrors_for(self, sha256: str) -> list[Source]:
        """Mirror files named by ``sha256`` that exist, in mirror order."""
        found: list[Source] = []
        for root in self.mirror_dirs:
            for candidate in (root / sha256, root / "sha256" / sha256[:2] / sha256):
                if candidate.is_file():
                    found.append(FileSource(candidate, direct_io=self.direct_io))
                    break
        return found

    def source_for(self, url: str) -> Source:
        """The Source for one URL; raise ``URLRefused`` / ``SourceUnavailable`` if unusable."""
        shown = redact_url(url)
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "https":
            if self.fetcher is None:
                raise SourceUnavailable(f"no https fetcher configured for {shown}")
            self.fetcher.policy.check_url(url)  # refuse early, before any other work
            return HttpsSource(url, self.fetcher)
        if scheme == "s3":
            if not self.allow_s3:
                raise URLRefused(f"refused {shown}: s3 URLs are not allowed here")
            bucket, key = _bucket_and_key(url)
            return S3Source(bucket, key, self._s3, direct_io=self.direct_io)
        if scheme == "runflow":
            asset = _asset_id(url)
            if not self.asset_bucket:
                raise SourceUnavailable(f"no asset bucket configured for {shown}")
            return S3Source(self.asset_bucket, f"assets/{asset}", self._s3,
                            label=f"runflow://assets/{asset}", direct_io=self.direct_io)
        if scheme == "file":
            if not self.allow_file_urls:
                raise URLRefused(f"refused {shown}: file URLs are not allowed")
            parts = urlsplit(url)
            if parts.netloc not in ("", "localhost"):
                raise URLRefused(f"refused {shown}: file URL with a host")
            return FileSource(Path(unquote(parts.path)), label=f"file {Path(parts.path).name}",
                              direct_io=self.direct_io, private=True)
        raise URLRefused(f"refused {shown}: unsupported scheme {scheme or '(none)'!r}")

    def fetch_to_file(
        self,
        url: str,
        dest: Path,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        cancel: Cancel | None = None,
        progress: Progress | None = None,
        fsync: bool = True,
    ) -> FetchResult:
        """Fetch one URL of any accepted scheme into ``dest`` (no digest known: caller files).
        ``fsync=False`` leaves the bytes to the page cache.

        Raises ``URLRefused`` for schemes this instance does not accept.
        """
        return self.source_for(url).fetch(dest, max_bytes=max_bytes, cancel=cancel,
                                          progress=progress, fsync=fsync)

    def for_digest(self, sha256: str, urls: Sequence[str]) -> list[Source | CacheError]:
        """Mirrors first, then one entry per URL: a Source, or the error that rules it out."""
        out: list[Source | CacheError] = list(self.mirrors_for(sha256))
        for url in urls:
            try:
                out.append(self.source_for(url))
            except CacheError as exc:
                out.append(exc)
        return out

    def _s3(self) -> Any:
        with self._client_lock:
            if self._client is None:
                if self._client_factory is None:
                    raise SourceUnavailable("no S3 client configured")
                self._client = self._client_factory()
            return self._client


def _needs_credentials(url: str, fetcher: Fetcher) -> bool:
    """Whether fetching ``url`` sends credentials: user info in the URL, or a credential
    header the fetcher adds for its host (a fetcher that does answers ``sends_credentials``).
    """
    parts = urlsplit(url)
    if "@" in parts.netloc:
        return True
    sends = getattr(fetcher, "sends_credentials", None)
    return bool(sends(url)) if callable(sends) else False


def _bucket_and_key(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    bucket = parts.netloc
    key = unquote(parts.path.lstrip("/"))
    if not bucket or "@" in bucket or not key:
        raise URLRefused(f"refused {redact_url(url)}: expected s3://bucket/key")
    return bucket, key


def _asset_id(url: str) -> str:
    parts = urlsplit(url)
    segments = parts.path.strip("/").split("/")
    if parts.netloc != "assets" or len(segments) != 1 or parts.query:
        raise URLRefused(f"refused {redact_url(url)}: expected runflow://assets/<uuid>")
    try:
        return str(uuid.UUID(segments[0]))
    except ValueError as exc:
        raise URLRefused(f"refused {redact_url(url)}: asset id is not a UUID") from exc
