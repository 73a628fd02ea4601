"""The one HTTP client for URLs the worker did not choose: inputs, callbacks, models, resources.

``Fetcher`` is built on ``httpcore`` with a network backend of its own (``cache.transport``):

- every URL, and every redirect target, passes ``URLPolicy`` (https only, public addresses);
- the connection goes to exactly the address the policy checked: the backend never resolves
  the name again (DNS rebinding fails), while TLS still verifies the certificate for, and
  sends SNI and ``Host`` with, the original host name;
- size is capped (``max_bytes``), time too (connect/read inactivity ``timeout_s`` and an
  overall ``deadline_s``), and a ``cancel()`` callable stops a transfer within ~0.1 s of
  returning true, even while a read is blocked (a watchdog shuts the socket down);
- ``fetch_to_file`` hashes while it writes, resumes with ``Range`` after a cut, and restarts
  from byte 0 when the server ignores ``Range``. A body that is neither chunked nor encoded
  is decrypted from the socket straight into the writer's buffers (``FetchResponse.readinto``),
  without passing through the HTTP parser: on a fast link that parser's copies and per-piece
  work, not the network, would set the pace;
- a connection whose response was read to its end is kept alive for the next request with
  the same host, checked address, TLS settings and credential (``cache.connpool``); every
  request still passes the policy first, and only an address it returned is reused;
- downloads (``fetch_to_file``) carry the configured per-host credential
  (``cache.credentials``) to the host of the URL asked for, and to no other: the first
  redirect to another origin drops it for good (Hugging Face and Civitai redirect to CDNs
  with signed URLs). ``FetchResult.credential_sent`` says whether one was sent. Callbacks and
  git probes (``open`` / ``post``) never carry one.

``cancel`` callables are called from a helper thread, about ten times a second.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpcore

from runflow_worker.cache.connpool import (
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_MAX_IDLE,
    IdleConnections,
    PoolKey,
    credential_tag,
    keeps_alive,
)
from runflow_worker.cache.credentials import URLCredentials
from runflow_worker.cache.errors import (
    FetchError,
    FetchInterrupted,
    FetchTimeout,
    FetchTooLarge,
    HTTPStatusError,
    TooManyRedirects,
    redact_url,
)
from runflow_worker.cache.hashing import HashingFileWriter
from runflow_worker.cache.progress import (
    Cancel,
    Progress,
    ProgressThrottle,
    continues_at,
    finish_from_file,
    resume_after_cuts,
    unsatisfied_total,
)
from runflow_worker.cache.transport import Guard, GuardedStream, connect_pinned, translate
from runflow_worker.cache.trust import CATrust
from runflow_worker.cache.urlpolicy import ResolvedTarget, URLPolicy

DEFAULT_MAX_BYTES = 50 * 2**30
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
USER_AGENT = "runflow-worker"
# Headers that must not follow a redirect to another origin.
_ORIGIN_BOUND_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})


@dataclass(frozen=True)
class FetchResult:
    """A body written to ``path``: its size in bytes, hex sha256, type and the URL it came from."""

    path: Path
    size: int
    sha256: str
    content_type: str | None
    final_url: str
    credential_sent: bool = False
    """Whether a credential header (``cache.credentials``) went with the request."""


def make_ssl_context(ca_bundle: CATrust | Path | str | None = None) -> ssl.SSLContext:
    """A verifying TLS context trusting the public roots (certifi) plus ``ca_bundle``: a PEM
    file, or a ``CATrust`` (files and hashed directories, ``cache.trust``)."""
    return CATrust.of(ca_bundle).ssl_context()


def _text(value: bytes) -> str:
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.decode("latin-1")


class ResponseHeaders(Mapping[str, str]):
    """A response's header fields by name, any case; a repeated field's values joined with
    ``", "`` (as ``httpx.Headers`` gives them); values decoded as ASCII, else UTF-8, else
    Latin-1.

    httpcore hands over the raw ``(name, value)`` pairs; ``httpx.Headers`` made of them
    normalised every field and asked for the whole set's encoding at each lookup, a good
    part of a small download's own time. Only a handful of fields are ever read.
    """

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        fields: dict[str, str] = {}
        for name, value in raw:
            key = name.decode("latin-1").lower()
            text = _text(value)
            fields[key] = f"{fields[key]}, {text}" if key in fields else text
        self._fields = fields

    def __getitem__(self, name: str) -> str:
        return self._fields[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._fields

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        """The field's value, or ``default``."""
        return self._fields.get(name.lower(), default)


class FetchResponse:
    """A response being received: ``status_code``, ``headers``, the ``url`` it came from and its
    body through ``iter_bytes`` / ``read``, or ``readinto`` (use one or the other)."""

    def __init__(
        self,
        response: httpcore.Response,
        url: str,
        guard: Guard,
        *,
        method: str = "GET",
        read_timeout_s: float | None = None,
    ) -> None:
        self._response = response
        self._guard = guard
        self._read_timeout_s = read_timeout_s
        self.url = url
        self.status_code: int = response.status
        self.credential_sent = False
        """Whether a credential header went with this request or a redirect before it."""
        self.headers = ResponseHeaders(response.headers)
        stream = response.extensions.get("network_stream")
        self._raw: GuardedStream | None = None
        if isinstance(stream, GuardedStream):
            stream.end_headers()
            # A body that is neither chunked nor compressed is the bytes on the wire up to
            # Content-Length (or to the end of the connection): readinto takes them from the
            # socket itself.
            if (method != "HEAD" and self.status_code not in (204, 304)
                    and "transfer-encoding" not in self.headers):
                self._raw = stream
        self.tls_session_reused = bool(stream.session_reused()) if isinstance(
            stream, GuardedStream) else False
        """Whether the connection resumed an earlier TLS session (no full handshake)."""
        self._raw_left = self.content_length
        self._parsed = False  # the body went (or started to go) through the HTTP parser
        self._chunks: Iterator[bytes] | None = None
        self._leftover = memoryview(b"")

    @property
    def content_type(self) -> str | None:
        """The ``Content-Type`` header, if any."""
        return self.headers.get("content-type")

    @property
    def content_length(self) -> int | None:
        """The ``Content-Length`` header as an int, or None when absent or malformed."""
        value = self.headers.get("content-length")
        if value is None or not value.strip().isdigit():
            return None
        return int(value)

    def iter_bytes(self) -> Iterator[bytes]:
        """Yield the body in pieces as they arrive; raise a ``FetchError`` on failure."""
        shown = redact_url(self.url)
        self._parsed = True
        iterator = iter(self._response.iter_stream())
        while True:
            try:
                chunk = next(iterator)
            except StopIteration:
                return
            except Exception as exc:
                if isinstance(exc, FetchError):
                    raise
                raise translate(exc, shown=shown, guard=self._guard, in_body=True) from exc
            self._guard.check()
            yield chunk

    def read(self, max_bytes: int) -> bytes:
        """Read the whole body; raise ``FetchTooLarge`` beyond ``max_bytes``."""
        parts: list[bytes] = []
        size = 0
        for chunk in self.iter_bytes():
            size += len(chunk)
            if size > max_bytes:
                raise FetchTooLarge(f"body of {redact_url(self.url)} exceeds {max_bytes} bytes")
            parts.append(chunk)
        return b"".join(parts)

    def readinto(self, view: memoryview) -> int:
        """Read the next body bytes into ``view``: as many as have arrived, up to its length
        (at least one; 0 once the body is over). Raise a ``FetchError`` on failure."""
        if self._raw is None:
            return self._readinto_from_chunks(view)
        if self._raw_left is not None and self._raw_left < len(view):
            view = view[: self._raw_left]
        try:
            got = self._raw.readinto(view, self._read_timeout_s) if view else 0
        except Exception as exc:
            raise translate(exc, shown=redact_url(self.url), guard=self._guard,
                            in_body=True) from exc
        self._guard.check()  # a shutdown by the watchdog also looks like the end of the stream
        if self._raw_left is not None:
            self._raw_left -= got
            if got == 0 and self._raw_left > 0:
                raise FetchInterrupted(f"connection to {redact_url(self.url)} dropped mid-body")
        return got

    def body_read_raw_to_end(self) -> bool:
        """Whether the whole Content-Length body came through ``readinto`` past the parser
        (or there was none), so the connection stands at the end of this response."""
        return self._raw is not None and self._raw_left == 0 and not self._parsed

    def _readinto_from_chunks(self, view: memoryview) -> int:
        if self._chunks is None:
            self._chunks = self.iter_bytes()
        while not self._leftover:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._leftover = memoryview(chunk)
        n = min(len(view), len(self._leftover))
        view[:n] = self._leftover[:n]
        self._leftover = self._leftover[n:]
        return n


class _Version:
    """The version of a file a download started on: its validator (a strong ETag, else
    Last-Modified) and size, both from the first full answer."""

    def __init__(self) -> None:
        self.validator: str | None = None
        self.total: int | None = None

    def remember(self, headers: Mapping[str, str], status: int) -> None:
        """Take the validator and size from a full (200) answer."""
        if status != 200:
            return
        etag = headers.get("etag")
        strong = etag if etag and not etag.startswith("W/") else None  # If-Range needs strong
        self.validator = strong or headers.get("last-modified")
        length = headers.get("content-length")
        self.total = int(length) if length and length.isdigit() else None


class _RestartFromZero(Exception):
    """The server cannot continue a partial download; start again without Range."""


class Fetcher:
    """Fetch caller-supplied URLs safely (see the module docstring).

    ``timeout_s``: connect and read inactivity timeout of each request. ``deadline_s``: overall
    limit of one ``open`` / ``fetch_to_file`` / ``post`` call, redirects and resumes included.
    ``max_bytes``: default body cap. ``resume_attempts``: Range resumes after cuts.
    ``direct_io``: ``fetch_to_file`` writes large bodies past the page cache (see
    ``cache.hashing``). ``ca_bundle``: extra trust (a PEM file or a ``CATrust``).
    ``credentials``: per-host headers for downloads (``cache.credentials``).
    ``max_idle_connections`` / ``idle_timeout_s``: the kept-alive connections (``cache.connpool``).
    """

    def __init__(
        self,
        policy: URLPolicy,
        *,
        ca_bundle: CATrust | Path | str | None = None,
        credentials: URLCredentials | None = None,
        timeout_s: float = 30.0,
        connect_timeout_s: float | None = None,
        deadline_s: float = 6 * 3600.0,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_redirects: int = 5,
        resume_attempts: int = 5,
        direct_io: bool = True,
        max_idle_connections: int = DEFAULT_MAX_IDLE,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
    ) -> None:
        self.policy = policy
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s if connect_timeout_s is not None else timeout_s
        self.deadline_s = deadline_s
        self.max_bytes = max_bytes
        self.max_redirects = max_redirects
        self.resume_attempts = resume_attempts
        self.direct_io = direct_io
        self._ssl_context = make_ssl_context(ca_bundle)
        self._ssl_context.set_alpn_protocols(["http/1.1"])
        self._idle = IdleConnections(max_idle=max_idle_connections, idle_timeout_s=idle_timeout_s)
        self.credentials = credentials or URLCredentials()

    @contextmanager
    def open(
        self,
        url: str,
        *,
        method: str = "GET",
        headers: Mapping[str, str] | None = None,
        content: bytes | None = None,
        start: int = 0,
        cancel: Cancel | None = None,
        deadline_s: float | None = None,
        follow_redirects: bool | None = None,
        authorize: bool = False,
    ) -> Iterator[FetchResponse]:
        """Send one request (following up to ``max_redirects`` redirects for GET/HEAD) and yield
        the response with its body unread. ``start`` > 0 asks for ``Range: bytes=start-``.
        ``authorize`` adds the credential configured for ``url``'s host, on the requests to
        that origin only (never after the chain has left it).

        Any status is yielded; raising on errors is up to the caller. Raises ``URLRefused``
        before connecting to a refused URL or redirect target.
        """
        method = method.upper()
        follow = method in ("GET", "HEAD") if follow_redirects is None else follow_redirects
        guard = Guard(cancel, time.monotonic() + (deadline_s or self.deadline_s))
        request_headers = dict(headers or {})
        credential = self.credentials.for_url(url) if authorize else None
        origin: tuple[str, int] | None = None
        sent = False
        current = url
        try:
            for _hop in range(self.max_redirects + 1):
                resolved = self.policy.check(current)
                guard.check()
                hop_origin = (resolved.target.host, resolved.target.port)
                origin = origin or hop_origin
                if hop_origin != origin:
                    credential = None  # left the origin: never sent again, even on a return
                hop_headers = request_headers
                pair = None
                if credential is not None:
                    pair = name, value = credential.header_pair()
                    hop_headers = {k: v for k, v in request_headers.items()
                                   if k.lower() != name.lower()}
                    hop_headers[name] = value
                    sent = True
                with self._send(resolved, method, hop_headers, content, start, guard,
                                pair) as resp:
                    resp.credential_sent = sent
                    location = resp.headers.get("location")
                    if not (follow and resp.status_code in REDIRECT_STATUSES and location):
                        yield resp
                        return
                nxt = urljoin(current, location)
                if urlsplit(nxt).netloc.lower() != urlsplit(current).netloc.lower():
                    request_headers = {
                        k: v for k, v in request_headers.items()
                        if k.lower() not in _ORIGIN_BOUND_HEADERS
                    }
                if resp.status_code == 303 and method != "HEAD":
                    method, content = "GET", None
                current = nxt
            raise TooManyRedirects(
                f"more than {self.max_redirects} redirects from {redact_url(url)}"
            )
        finally:
            guard.stop()

    @contextmanager
    def _send(
        self,
        resolved: ResolvedTarget,
        method: str,
        headers: Mapping[str, str],
        content: bytes | None,
        start: int,
        guard: Guard,
        credential: tuple[str, str] | None,
    ) -> Iterator[FetchResponse]:
        target = resolved.target
        shown = redact_url(target.url)
        wire_headers: list[tuple[bytes, bytes]] = [
            (b"Host", target.host_header.encode("ascii")),
            (b"User-Agent", USER_AGENT.encode()),
            # The bytes on the wire are the bytes hashed: no transfer compression.
            (b"Accept-Encoding", b"identity"),
        ]
        for key, value in headers.items():
            if key.lower() not in ("host", "range", "accept-encoding"):
                wire_headers.append((key.encode("latin-1"), value.encode("latin-1")))
        if start > 0:
            wire_headers.append((b"Range", f"bytes={start}-".encode()))
        if content and not any(k.lower() in (b"content-length", b"transfer-encoding")
                               for k, _ in wire_headers):
            # What httpcore's request() adds; handle_request, used directly, does not.
            wire_headers.append((b"Content-Length", str(len(content)).encode()))
        timeout_s = min(self.timeout_s, guard.remaining_s())
        timeouts = {"connect": timeout_s, "read": timeout_s, "write": timeout_s, "pool": timeout_s}
        wire_url = httpcore.URL(
            scheme=b"https",
            host=target.host.encode("ascii"),
            port=target.port,
            target=target.path.encode("ascii"),
        )
        request = httpcore.Request(method, wire_url, headers=wire_headers, content=content,
                                   extensions={"timeout": timeouts})
        tag = credential_tag(credential)
        keys = [PoolKey(target.host, target.port, str(address), id(self._ssl_context), tag)
                for address in resolved.addresses]
        taken = self._idle.take(keys)
        while True:
            if taken is not None:
                key, stream = taken
                stream.adopt(guard)
            else:
                key, stream = self._connect(resolved, guard, timeout_s, tag)
            connection = httpcore.HTTP11Connection(origin=wire_url.origin, stream=stream)
            try:
                response = connection.handle_request(request)
            except FetchError:
                stream.close()
                raise
            except Exception as exc:
                stream.close()  # handle_request closed it already, unless it failed early
                # A kept-alive connection the server closed just as it was reused: nothing
                # of an answer came, so a GET or HEAD goes again, once, on a new connection.
                if (taken is not None and stream.bytes_in == 0 and guard.fired is None
                        and method in ("GET", "HEAD") and content is None
                        and isinstance(exc, (httpcore.NetworkError,
                                             httpcore.RemoteProtocolError))):
                    taken = None
                    continue
                raise translate(exc, shown=shown, guard=guard, in_body=False) from exc
            break
        result = FetchResponse(response, target.url, guard, method=method,
                               read_timeout_s=timeout_s)
        try:
            yield result
        finally:
            self._finish(result, response, connection, stream, key, guard)

    def _connect(self, resolved: ResolvedTarget, guard: Guard, timeout_s: float,
                 tag: str | None) -> tuple[PoolKey, GuardedStream]:
        """A new TLS connection to one of the checked addresses (resuming a session kept for
        it), and its pool key."""
        target = resolved.target

        def key_for(address: str) -> PoolKey:
            return PoolKey(target.host, target.port, address, id(self._ssl_context), tag)

        address, stream = connect_pinned(
            resolved, guard, self._ssl_context, timeout_s=timeout_s,
            connect_timeout_s=self.connect_timeout_s,
            session_for=lambda address: self._idle.session(key_for(address)))
        return key_for(address), stream

    def _finish(self, result: FetchResponse, response: httpcore.Response,
                connection: httpcore.HTTP11Connection, stream: GuardedStream, key: PoolKey,
                guard: Guard) -> None:
        """Keep the connection for the next request if its exchange ended cleanly, else close
        it."""
        if result.body_read_raw_to_end() and keeps_alive(response) and stream.drained():
            # The body went past the HTTP parser (readinto): the parser still waits for it,
            # so the connection is kept without closing the response, which would close it.
            reusable = True
        else:
            try:
                response.close()  # the connection goes idle if the exchange is complete
            except (httpcore.NetworkError, httpcore.ProtocolError, OSError):
                pass  # closing a half-read response; the connection is dropped
            reusable = connection.is_idle() and stream.drained()
        if reusable and guard.fired is None and self._idle.max_idle > 0:
            stream.release()
            self._idle.put(key, stream)
        else:
            self._idle.remember_session(key, stream)
            stream.close()

    @property
    def idle_connections(self) -> int:
        """How many connections are kept idle for later requests."""
        return len(self._idle)

    def close(self) -> None:
        """Close the idle connections kept for later requests."""
        self._idle.close()

    def post(
        self,
        url: str,
        content: bytes,
        headers: Mapping[str, str] | None = None,
        *,
        cancel: Cancel | None = None,
        deadline_s: float | None = None,
    ) -> int:
        """POST ``content`` to ``url`` (redirects not followed) and return the status code."""
        with self.open(
            url, method="POST", headers=headers, content=content,
            cancel=cancel, deadline_s=deadline_s, follow_redirects=False,
        ) as resp:
            for _ in resp.iter_bytes():
                pass
            return resp.status_code

    def fetch_to_file(
        self,
        url: str,
        dest: Path,
        *,
        max_bytes: int | None = None,
        cancel: Cancel | None = None,
        progress: Progress | None = None,
        start_offset: int = 0,
        before_body: Callable[[int | None], None] | None = None,
        deadline_s: float | None = None,
        fsync: bool = True,
    ) -> FetchResult:
        """Download ``url`` into ``dest``, hashing in the same pass; return a FetchResult.

        ``start_offset`` > 0 keeps that many bytes already in ``dest`` and asks for the rest
        with ``Range`` (restarting from 0 if the server ignores it). A dropped connection is
        resumed the same way, up to ``resume_attempts`` times. ``before_body(bytes_to_come)``
        runs once the response headers are in, before the body is written (a disk-space
        check). ``progress(done_bytes, total_bytes_or_None)`` is called at most ten times a
        second. On failure ``dest`` keeps what arrived (for a later resume).
        """
        limit = max_bytes or self.max_bytes
        deadline_at = time.monotonic() + (deadline_s or self.deadline_s)
        throttle = ProgressThrottle(progress)

        version = _Version()

        def attempt(offset: int) -> FetchResult:
            while True:
                remaining_s = deadline_at - time.monotonic()
                if remaining_s <= 0:
                    raise FetchTimeout(f"overall deadline exceeded fetching {redact_url(url)}",
                                       reason="deadline")
                try:
                    return self._transfer(url, dest, offset, limit, cancel, throttle,
                                          before_body, remaining_s, fsync, version)
                except _RestartFromZero:
                    offset = 0  # the server ignored Range: not a cut, no attempt used

        return resume_after_cuts(attempt, dest, start_offset=start_offset,
                                 attempts=self.resume_attempts)

    def _transfer(
        self,
        url: str,
        dest: Path,
        offset: int,
        limit: int,
        cancel: Cancel | None,
        throttle: ProgressThrottle,
        before_body: Callable[[int | None], None] | None,
        deadline_s: float,
        fsync: bool,
        version: _Version,
    ) -> FetchResult:
        shown = redact_url(url)
        # A resume asks for the rest of the version it started on: a server whose file
        # changed in between answers 200 with the new one instead of splicing the two.
        headers = {"If-Range": version.validator} if offset > 0 and version.validator else {}
        with self.open(url, start=offset, cancel=cancel, deadline_s=deadline_s,
                       headers=headers, authorize=True) as resp:
            status = resp.status_code
            content_range = resp.headers.get("content-range")
            version.remember(resp.headers, status)
            if offset > 0 and status == 416 and unsatisfied_total(content_range) == offset:
                # Nothing left to send: the file already holds every byte (its writer was
                # killed before publishing). Its hash decides, not a second download.
                if offset > limit:
                    raise FetchTooLarge(f"{shown} is {offset} bytes, over the {limit}-byte limit")
                digest, size = finish_from_file(dest)
                throttle(size, size, final=True)
                return FetchResult(dest, size, digest, resp.content_type, resp.url,
                                   resp.credential_sent)
            if offset > 0 and status == 206:
                if not continues_at(content_range, offset, resp.content_length,
                                    total=version.total):
                    raise _RestartFromZero()
            elif status == 200:
                offset = 0  # Range ignored: the body is the whole file
            elif offset > 0 and (status == 416 or 200 <= status < 300):
                raise _RestartFromZero()  # 416, or a 2xx that continues nothing
            elif not 200 <= status < 300 or status == 206:
                raise HTTPStatusError(f"{shown} answered HTTP {status}", status_code=status)
            length = resp.content_length
            total = offset + length if length is not None else None
            if total is not None and total > limit:
                raise FetchTooLarge(f"{shown} is {total} bytes, over the {limit}-byte limit")
            if before_body is not None:
                before_body(length)
            writer = HashingFileWriter(dest, start_offset=offset, expected_bytes=length,
                                       direct_io=self.direct_io)
            try:
                while True:
                    # Straight into the writer's batch buffer: decrypted once, copied never.
                    space = writer.buffer()
                    n = resp.readinto(space[: limit - writer.size + 1])
                    if n == 0:
                        break
                    writer.commit(n)
                    if writer.size > limit:
                        raise FetchTooLarge(f"{shown} exceeds the {limit}-byte limit")
                    throttle(writer.size, total)
            except BaseException:
                writer.abort()
                raise
            digest, size = writer.close(fsync=fsync)
            throttle(size, total, final=True)
            return FetchResult(dest, size, digest, resp.content_type, resp.url,
                               resp.credential_sent)
