"""The exceptions of the ``cache`` package, and the redaction of URLs in their messages.

Hierarchy::

    CacheError                      any failure of this package; ``.reason`` is a short code
    ├── FetchError                  getting bytes from somewhere failed
    │   ├── URLRefused              the URL policy refused the URL (scheme, credentials,
    │   │                           address); nothing was sent
    │   ├── FetchConnectError       DNS, TCP or TLS failure before a response
    │   ├── FetchTimeout            connect/read inactivity timeout or overall deadline
    │   ├── FetchInterrupted        the connection dropped mid-body (resumable with Range)
    │   ├── FetchTooLarge           the body exceeds the byte cap
    │   ├── HTTPStatusError         the server answered a non-success status
    │   ├── TooManyRedirects        more redirects than allowed
    │   ├── FetchCanceled*          the caller's ``cancel()`` said stop
    │   └── SourceUnavailable       no source could provide the blob (object missing,
    │                               bucket denied, mirror absent, every source failed)
    ├── IntegrityError              content does not match its sha256
    ├── InsufficientDisk            not enough free space, even after eviction
    ├── BlobNotFound                the digest is not in the store
    ├── UnsafePath                  a link destination outside its base directory
    ├── GitError                    a mirror fetch or checkout failed (commit not found, ...)
    │   └── OriginRefused           the URL policy refused a git origin (or where it
    │                               redirects); git was not run
    ├── EnvironmentBuildError       a custom node's requirements could not be installed
    └── BuildCanceled*              the caller's ``cancel()`` stopped an environment build

    Canceled                        stopped on the caller's request: the one base of every
    │                               "canceled" of the project, here because every layer
    │                               imports this module (a run translates them all in one
    │                               place, ``run.failures``)
    ├── FetchCanceled*              (above)
    ├── BuildCanceled*              (above)
    ├── runtime.errors.RunnerStartCanceled   a ComfyUI start was interrupted
    └── errors.UploadCanceled       an upload of a run's outputs stopped

    * also a ``CacheError``: a cancel is one of this package's failures, and a ``Canceled``

Foreign exceptions (httpcore, botocore, git, OSError) are translated where they enter this package
with ``raise ... from exc``. Messages never contain URL credentials or query strings:
presigned URLs carry their signature in the query, so every URL in a message goes through
``redact_url`` first.
"""

from __future__ import annotations

import errno
import functools
from urllib.parse import urlsplit, urlunsplit


@functools.lru_cache(maxsize=64)
def redact_url(url: str) -> str:
    """Return ``url`` without user info, query string or fragment (safe for logs and errors).

    A query string is replaced by ``?...`` so a reader can tell one was there. Kept for
    the last URLs: a fetch names its URL this way at each of its steps, several a run.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{host}:{port}" if port is not None else host
    text = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    return text + "?..." if parts.query else text


class Canceled(Exception):
    """Base of every error that means "stopped because the caller's stop said so" (a fetch, an
    environment build, a ComfyUI start, an upload), whatever the package that raised it."""


class CacheError(Exception):
    """Base of every error raised by the ``cache`` package.

    ``reason`` is a short stable code (e.g. ``"url_refused"``) for metrics and run errors; the
    message is for people and never holds secrets.
    """

    reason = "cache_error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class FetchError(CacheError):
    """Getting bytes from a source failed."""

    reason = "fetch_failed"


class URLRefused(FetchError):
    """The URL policy refused a URL; no connection was made."""

    reason = "url_refused"


class FetchConnectError(FetchError):
    """Name resolution, TCP connect or TLS handshake failed."""

    reason = "connect_failed"


class FetchTimeout(FetchError):
    """An inactivity timeout or the overall deadline expired."""

    reason = "timeout"


class FetchInterrupted(FetchError):
    """The connection dropped before the whole body arrived; ``received_bytes`` were written."""

    reason = "interrupted"

    def __init__(self, message: str, *, received_bytes: int = 0) -> None:
        super().__init__(message)
        self.received_bytes = received_bytes


class FetchTooLarge(FetchError):
    """The body is larger than the allowed number of bytes."""

    reason = "too_large"


class HTTPStatusError(FetchError):
    """The server answered with a status that is not a success; ``status_code`` holds it."""

    reason = "http_status"

    def __init__(self, message: str, *, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


class TooManyRedirects(FetchError):
    """The redirect chain is longer than allowed."""

    reason = "too_many_redirects"


class FetchCanceled(FetchError, Canceled):
    """The caller's cancel callable asked to stop."""

    reason = "canceled"


class SourceUnavailable(FetchError):
    """No source could provide the content (missing object, denied bucket, every source failed)."""

    reason = "source_unavailable"


class IntegrityError(CacheError):
    """Content does not match the sha256 it was asked for."""

    reason = "integrity"


class InsufficientDisk(CacheError):
    """Not enough free disk space for a download, even after eviction."""

    reason = "insufficient_disk"


class BlobNotFound(CacheError):
    """The digest is not present in the store."""

    reason = "blob_not_found"


class UnsafePath(CacheError):
    """A link destination lies outside the directory it must stay in."""

    reason = "unsafe_path"


class GitError(CacheError):
    """A git mirror could not provide a commit, or a checkout failed."""

    reason = "git_failed"


class OriginRefused(GitError):
    """The URL policy refused a git origin, or the place it redirects to; git never ran."""

    reason = "origin_refused"


class EnvironmentBuildError(CacheError):
    """An environment could not be prepared (requirements that cannot be installed)."""

    reason = "environment_failed"


class BuildCanceled(CacheError, Canceled):
    """The caller's ``cancel()`` stopped an environment build."""

    reason = "canceled"


def from_os_error(exc: OSError, what: str) -> CacheError:
    """The package error for an ``OSError`` met while doing ``what`` (a full disk becomes
    ``InsufficientDisk``). Use as ``raise from_os_error(exc, "...") from exc``."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientDisk(f"insufficient disk space while {what}")
    return CacheError(f"{what} failed: {exc.strerror or exc}", reason="io_error")


def combine_errors(digest: str, errors: list[CacheError]) -> CacheError:
    """The error for a failed fetch of ``digest`` from several sources: the only error as
    is, else a summary of all."""
    if len(errors) == 1:
        return errors[0]
    if errors and all(isinstance(e, IntegrityError) for e in errors):
        return IntegrityError(f"no source gave sha256 {digest[:12]}...: "
                              + "; ".join(str(e) for e in errors))
    summary = "; ".join(f"{type(e).__name__}: {e}" for e in errors) or "no source"
    return SourceUnavailable(f"no source gave sha256 {digest[:12]}...: {summary}")
