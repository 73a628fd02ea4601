"""A local HTTPS server for tests and benchmarks: loopback only, certificates from ``trustme``.

It serves registered routes from a thread and misbehaves on request, so fetch code can be
tested against the failures real servers produce::

    with HTTPSServer() as server:
        server.add("/model.bin", data)                              # a good file
        server.add("/cut.bin", data, mode=Mode.TRUNCATE_ONCE, cut_at=1000)
        server.add("/norange.bin", data, mode=Mode.IGNORE_RANGE)
        server.add("/moved", mode=Mode.REDIRECT, location="https://127.0.0.1:9/")
        url = server.url("/model.bin")
        ca_file = server.write_ca_bundle(tmp_path / "ca.pem")

Modes (``Mode``):

- ``GOOD``: 200 with the body; honours ``Range: bytes=N-`` with 206.
- ``TRUNCATE_ONCE``: the first GET announces the full length, sends ``cut_at`` bytes and drops
  the connection; later requests behave like ``GOOD`` (so a Range resume works).
- ``IGNORE_RANGE``: always 200 with the whole body, whatever ``Range`` says (the
  ``ignore_range=True`` option does the same on top of another mode).
- ``STALL``: sends headers and ``cut_at`` bytes, then waits until ``release()`` (or the server
  closes) before sending the rest: a server that goes quiet mid-body.
- ``DRIP``: sends the body ``drip_bytes`` at a time, pausing ``drip_interval_s`` between
  pieces: a server that is alive but too slow.
- ``REDIRECT``: answers ``status`` (default 302) with ``Location: location``.
- any mode with ``authorization=...``: 401 unless the request's ``Authorization`` is that.
- any mode with ``unanswered=N``: the first N requests get no answer, their connection closed.

``connections`` counts the connections accepted (a kept-alive one once, however many
requests it carries); ``drop_connections()`` shuts the open ones down.
- ``STATUS``: answers ``status`` with the body.
- ``RAW``: sends the body as the whole response (status line, headers and all, as it is),
  ``drip_bytes`` at a time if ``raw_pieces`` is set (each piece its own TLS record), then
  closes the connection: for responses no well-behaved handler would produce.

``CountingListener`` is a plain TCP listener that only counts connections and bytes: point a
refused URL at it to prove nothing was ever sent.
"""

from __future__ import annotations

import enum
import hashlib
import http.server
import socket
import socketserver
import ssl
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import trustme

READ_CHUNK_BYTES = 1 << 20


class Mode(enum.Enum):
    """How a route answers."""

    GOOD = "good"
    TRUNCATE_ONCE = "truncate_once"
    IGNORE_RANGE = "ignore_range"
    STALL = "stall"
    DRIP = "drip"
    REDIRECT = "redirect"
    STATUS = "status"
    RAW = "raw"


@dataclass
class Route:
    """One served path and how it behaves; counters are updated by the server."""

    body: bytes | Path = b""
    mode: Mode = Mode.GOOD
    status: int = 200
    location: str | None = None
    cut_at: int = 0
    drip_bytes: int = 1
    drip_interval_s: float = 0.05
    content_type: str = "application/octet-stream"
    ignore_range: bool = False
    """Answer 200 with the whole body whatever ``Range`` says (combines with any mode)."""
    partial_answer: Callable[[int, int], tuple[int, str | None, int]] | None = None
    """For a ``Range`` request from ``start`` of ``size`` bytes: ``(status, Content-Range,
    first byte sent)``; the body is sent from that byte to the end."""
    with_etag: bool = False
    """Send a strong ``ETag`` (the body's hash) and honour ``If-Range`` with it."""
    next_version: bytes | None = None
    """From the second request on, serve these bytes instead (the file was replaced)."""
    raw_pieces: bool = False
    """``RAW`` mode: send the response ``drip_bytes`` at a time, without pauses."""
    authorization: str | None = None
    """Answer 401 to a request whose ``Authorization`` header is not exactly this (a gated
    file); with it, the mode decides."""
    redirect_after_hits: int | None = None
    """Answer the first N requests as the mode says, every later one with a redirect to
    ``location`` (a server that answers one client's request differently from the next)."""
    unanswered: int = 0
    """Close the connection without a word of answer to the first N requests (a server that
    dropped a kept-alive connection just as the client reused it)."""
    hits: int = 0
    range_headers: list[str | None] = field(default_factory=list)
    gate: threading.Event = field(default_factory=threading.Event)
    stalled: threading.Event = field(default_factory=threading.Event)
    """Set when a ``STALL`` route has sent ``cut_at`` bytes and gone quiet."""

    @property
    def etag(self) -> str | None:
        """The body's ETag when ``with_etag``."""
        if not self.with_etag:
            return None
        data = self.body if isinstance(self.body, bytes) else self.body.read_bytes()
        return '"' + hashlib.sha256(data).hexdigest()[:16] + '"'

    @property
    def size(self) -> int:
        """Length of the body in bytes."""
        return self.body.stat().st_size if isinstance(self.body, Path) else len(self.body)

    def release(self) -> None:
        """Let a ``STALL`` route send the rest of its body."""
        self.gate.set()

    def sha256(self) -> str:
        """Hex sha256 of the body."""
        if isinstance(self.body, bytes):
            return hashlib.sha256(self.body).hexdigest()
        digest = hashlib.sha256()
        with self.body.open("rb") as f:
            while chunk := f.read(READ_CHUNK_BYTES):
                digest.update(chunk)
        return digest.hexdigest()


@dataclass
class RecordedRequest:
    """What the server saw of one request."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


def _parse_range(value: str | None, size: int) -> int | None:
    """Start offset of a ``bytes=N-`` header, or None when absent or not of that form
    (``N`` may be ``size`` or more: the caller answers 416)."""
    if not value or not value.startswith("bytes="):
        return None
    start, dash, end = value[len("bytes=") :].partition("-")
    if not dash or end or not start.isdigit():
        return None
    return int(start)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _TLSHTTPServer

    def setup(self) -> None:
        # The TLS handshake runs here, in the connection's own thread, so one slow or broken
        # client cannot hold up the accept loop.
        self.request = self.server.ssl_context.wrap_socket(self.request, server_side=True)
        # The TLS socket took the descriptor over: it is the one to shut down from now on.
        with self.server.owner._lock:
            self.server.owner._open.add(self.request)
        super().setup()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server.owner._lock:
                self.server.owner._open.discard(self.request)

    def log_message(self, format: str, *args: object) -> None:
        pass

    def handle(self) -> None:
        try:
            super().handle()
        except (ConnectionError, ssl.SSLError, TimeoutError):
            pass

    def do_GET(self) -> None:
        self._serve(send_body=True)

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def do_POST(self) -> None:
        self._serve(send_body=True)

    def do_PUT(self) -> None:
        self._serve(send_body=True)

    def _serve(self, *, send_body: bool) -> None:
        owner = self.server.owner
        length = int(self.headers.get("Content-Length") or 0)
        body_in = self.rfile.read(length) if length else b""
        path = self.path.split("?", 1)[0]
        owner._record(RecordedRequest(self.command, self.path, dict(self.headers), body_in))
        route = owner.routes.get(path)
        if route is None:
            self._simple(404, b"not found")
            return
        with owner._lock:
            route.hits += 1
            first_hit = route.hits == 1
            if not first_hit and route.next_version is not None:
                route.body, route.next_version = route.next_version, None
            redirect_now = (route.redirect_after_hits is not None
                            and route.hits > route.redirect_after_hits)
            route.range_headers.append(self.headers.get("Range"))
        if route.hits <= getattr(route, "unanswered", 0):
            self.close_connection = True
            return
        required = getattr(route, "authorization", None)  # routes of tests' own kinds too
        if required is not None and self.headers.get("Authorization") != required:
            self._simple(401, b"token required")
            return
        if route.mode is Mode.REDIRECT or redirect_now:
            self.send_response(route.status if route.status != 200 else 302)
            self.send_header("Location", route.location or "/")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if route.mode is Mode.RAW:
            data = route.body if isinstance(route.body, bytes) else route.body.read_bytes()
            step = route.drip_bytes if route.raw_pieces else max(1, len(data))
            for offset in range(0, len(data), step):
                self.wfile.write(data[offset : offset + step])
                self.wfile.flush()
            self.close_connection = True
            return
        if route.mode is Mode.STATUS:
            self._simple(route.status, route.body if isinstance(route.body, bytes) else b"")
            return
        size = route.size
        start = None
        if route.mode is not Mode.IGNORE_RANGE and not route.ignore_range:
            start = _parse_range(self.headers.get("Range"), size)
        if_range = self.headers.get("If-Range")
        if start is not None and if_range is not None and if_range != route.etag:
            start = None  # another version than the client started on: all of this one
        if start is not None and start >= size:
            self.send_response(416)  # as real servers answer a range past the end
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if start is None:
            self.send_response(200)
            start = 0
        elif route.partial_answer is not None:
            # A server that answers a resume with something other than the rest.
            status, content_range, start = route.partial_answer(start, size)
            self.send_response(status)
            if content_range:
                self.send_header("Content-Range", content_range)
        else:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.send_header("Content-Type", route.content_type)
        self.send_header("Content-Length", str(size - start))
        self.send_header("Accept-Ranges", "bytes")
        if route.etag is not None:
            self.send_header("ETag", route.etag)
        self.end_headers()
        if not send_body:
            return
        limit = size
        if route.mode is Mode.TRUNCATE_ONCE and first_hit:
            limit = max(start, min(route.cut_at, size))
        self._send_body(route, start, limit, stall=route.mode is Mode.STALL)
        if limit < size:
            # Drop the connection mid-body, as a cut network would.
            self.close_connection = True
            self.request.shutdown(socket.SHUT_RDWR)

    def _send_body(self, route: Route, start: int, limit: int, *, stall: bool) -> None:
        owner = self.server.owner
        for offset, chunk in _chunks(route.body, start, limit, route):
            if owner._closing.is_set():
                return
            if stall and offset >= route.cut_at and not route.gate.is_set():
                # Go quiet until the test releases the route or the server stops.
                self.wfile.flush()
                route.stalled.set()
                while not route.gate.wait(0.05):
                    if owner._closing.is_set():
                        return
            self.wfile.write(chunk)
            if route.mode is Mode.DRIP:
                self.wfile.flush()
                owner._closing.wait(route.drip_interval_s)

    def _simple(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _chunks(body: bytes | Path, start: int, limit: int, route: Route) -> Iterable[tuple[int, bytes]]:
    """Yield ``(offset, bytes)`` pieces of ``body[start:limit]``; no piece straddles ``cut_at``."""
    step = route.drip_bytes if route.mode is Mode.DRIP else READ_CHUNK_BYTES
    f = body.open("rb") if isinstance(body, Path) else None
    try:
        offset = start
        while offset < limit:
            end = min(limit, offset + step)
            if offset < route.cut_at < end:
                end = route.cut_at
            if f is None:
                piece = memoryview(body)[offset:end]  # type: ignore[arg-type]
            else:
                f.seek(offset)
                piece = f.read(end - offset)
                if not piece:
                    return
            yield offset, piece
            offset += len(piece)
    finally:
        if f is not None:
            f.close()


class _TLSHTTPServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], owner: HTTPSServer, ctx: ssl.SSLContext):
        self.owner = owner
        self.ssl_context = ctx
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.address_family = family
        super().__init__(address, _Handler)

    def handle_error(self, request: object, client_address: object) -> None:
        # Clients that reject the certificate or hang up early are part of the tests.
        pass

    def get_request(self) -> tuple[socket.socket, object]:
        conn, addr = super().get_request()
        # As real file servers do (nginx, S3): without it the reply's small writes wait on
        # the client's delayed ACK, 40 ms a request, and timings measure that instead.
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.owner._lock:
            self.owner.connections += 1
            self.owner._open.add(conn)
        return conn, addr

    def shutdown_request(self, request: socket.socket) -> None:
        with self.owner._lock:
            self.owner._open.discard(request)
        super().shutdown_request(request)


class HTTPSServer:
    """A threaded HTTPS server on loopback with a ``trustme`` certificate.

    ``hostnames`` go into the certificate (tests map extra names to 127.0.0.1 with an injected
    resolver). ``ca`` lets several servers share one authority.
    """

    def __init__(
        self,
        *,
        bind: str = "127.0.0.1",
        port: int = 0,
        hostnames: Iterable[str] = (),
        ca: trustme.CA | None = None,
    ) -> None:
        self.ca = ca or trustme.CA()
        names = ["localhost", "127.0.0.1", "::1", *hostnames]
        if bind not in names:
            names.append(bind)
        self._cert = self.ca.issue_cert(*names)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._cert.configure_cert(ctx)
        self.routes: dict[str, Route] = {}
        self.requests: list[RecordedRequest] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closing = threading.Event()
        self._httpd = _TLSHTTPServer((bind, port), self, ctx)
        self.host = bind
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def start(self) -> HTTPSServer:
        """Start serving in a background thread."""
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving, release stalled routes and drop open connections."""
        self._closing.set()
        for route in self.routes.values():
            route.release()
        self._httpd.shutdown()
        self.drop_connections()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def drop_connections(self) -> None:
        """Shut down every open connection (kept-alive ones included), as a server that
        closes idle connections does; the server goes on accepting new ones."""
        with self._lock:
            conns = list(self._open)
        for conn in conns:
            try:
                # socket.socket's shutdown, not SSLSocket's: that one drops the TLS state
                # under the feet of the connection's own thread.
                socket.socket.shutdown(conn, socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, path: str, body: bytes | Path = b"", **options: object) -> Route:
        """Register ``path`` (e.g. ``/a.bin``) with a body and Route options; return the Route."""
        route = Route(body=body, **options)  # type: ignore[arg-type]
        self.routes[path] = route
        return route

    def url(self, path: str, *, host: str | None = None) -> str:
        """``https://<host>:<port><path>``; ``host`` defaults to the bound address."""
        name = host or self.host
        if ":" in name:
            name = f"[{name}]"
        return f"https://{name}:{self.port}{path}"

    def write_ca_bundle(self, path: Path) -> Path:
        """Write the CA certificate (PEM) to ``path`` and return it."""
        self.ca.cert_pem.write_to_path(str(path))
        return path

    def requests_for(self, path: str) -> list[RecordedRequest]:
        """Requests recorded for ``path`` (query strings ignored)."""
        with self._lock:
            return [r for r in self.requests if r.path.split("?", 1)[0] == path]

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)


class CountingListener:
    """A TCP listener that accepts connections and counts them and the bytes they send."""

    def __init__(self, bind: str = "127.0.0.1", port: int = 0) -> None:
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((bind, port))
        self._sock.listen(16)
        self._sock.settimeout(0.05)
        self.host = bind
        self.port: int = self._sock.getsockname()[1]
        self.connections = 0
        self.bytes_received = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    def _drain(self, conn: socket.socket) -> None:
        conn.settimeout(0.5)
        with conn:
            while not self._stop.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                with self._lock:
                    self.bytes_received += len(data)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()
