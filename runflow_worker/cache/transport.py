"""The fetcher's connection layer: connections only to checked addresses, guarded.

- ``PinnedBackend`` (an ``httpcore`` network backend) connects only to the addresses the URL
  policy returned for the one origin it was made for, never resolving the name again;
- ``Guard`` holds one request's cancel callable and deadline; the watchdog thread (one for
  all guards) shuts the socket down when either fires, which wakes a read blocked on a
  silent server;
- ``GuardedStream`` wraps each connection. While response headers are read it hands
  ``httpcore`` nothing past the end of a header block, so the body's bytes stay in the stream
  and ``readinto`` can decrypt them straight into the caller's buffer (the fast path of
  ``Fetcher.fetch_to_file``); ``read`` serves everything else through ``httpcore``. A stream
  kept alive between requests (``cache.connpool``) leaves one request's guard on
  ``release`` and joins the next one's on ``adopt``.
"""

from __future__ import annotations

import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable

import httpcore

from runflow_worker.cache.errors import (
    FetchCanceled,
    FetchConnectError,
    FetchError,
    FetchInterrupted,
    FetchTimeout,
    redact_url,
)
from runflow_worker.cache.progress import Cancel
from runflow_worker.cache.urlpolicy import ResolvedTarget

WATCH_INTERVAL_S = 0.1
# The blank line that ends a header block, as h11 finds it (``h11._receivebuffer``): a bare
# LF ends lines too. Stopping anywhere else would hand h11 body bytes it keeps to itself.
_HEADER_END = re.compile(b"\n\r?\n")
_HEADER_END_MAX = 3

class Guard:
    """Cancel and deadline of one request; the watchdog shuts the socket down when either
    fires."""

    def __init__(self, cancel: Cancel | None, deadline_at: float) -> None:
        self._cancel = cancel
        self.deadline_at = deadline_at
        self.fired: str | None = None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._stopped = False
        _WATCHDOG.add(self)

    def remaining_s(self) -> float:
        """Seconds until the deadline (never below a small positive floor)."""
        return max(0.001, self.deadline_at - time.monotonic())

    def watch(self, sock: socket.socket | None) -> None:
        """Remember the connection's socket, to shut it down if the guard fires."""
        with self._lock:
            self._sock = sock
        if self.fired:
            self._shutdown()

    def check(self) -> None:
        """Raise the guard's error if cancel or the deadline has fired."""
        if self.fired is None and time.monotonic() >= self.deadline_at:
            self.fired = "deadline"
        if self.fired is not None:
            raise self.error()

    def error(self) -> FetchError:
        """The error for the way the guard fired."""
        if self.fired == "cancel":
            return FetchCanceled("transfer canceled")
        return FetchTimeout("overall deadline exceeded", reason="deadline")

    def stop(self) -> None:
        """End the watch: once this returns, the guard never shuts a socket down."""
        with self._lock:
            self._stopped = True
        _WATCHDOG.remove(self)

    def tick(self) -> bool:
        """One look at cancel and the deadline (the watchdog's); True once the guard is done
        with (fired or stopped)."""
        if self._stopped:
            return True
        if self._cancel is not None:
            try:
                canceled = bool(self._cancel())
            except Exception:  # noqa: BLE001 - a failing cancel check must not kill the transfer
                canceled = False
            if canceled:
                self.fired = "cancel"
        if self.fired is None and time.monotonic() >= self.deadline_at:
            self.fired = "deadline"
        if self.fired is not None:
            self._shutdown()
            return True
        return False

    def _shutdown(self) -> None:
        with self._lock:
            if self._stopped or self._sock is None:
                return
            try:
                # socket.socket.shutdown, not SSLSocket.shutdown: the latter drops the SSL
                # object under the reading thread's feet. A shut-down socket wakes a blocked
                # recv at once.
                socket.socket.shutdown(self._sock, socket.SHUT_RDWR)
            except OSError:
                pass


class _Watchdog:
    """One thread for every live guard of the process: it looks at each about ten times a
    second while there are guards, and waits without waking while there are none.

    One shared thread, rather than one per request, because starting a thread costs a
    request on the run path about as much as its kept-alive connection does (and cancel
    callables are flag reads, cheap to call one after another).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._guards: set[Guard] = set()
        self._thread: threading.Thread | None = None

    def add(self, guard: Guard) -> None:
        """Watch ``guard`` until it is done."""
        with self._cond:
            self._guards.add(guard)
            # is_alive: a forked child has the object but not the thread.
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="fetch-watchdog",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()

    def remove(self, guard: Guard) -> None:
        """Stop watching ``guard``."""
        with self._cond:
            self._guards.discard(guard)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._guards:
                    self._cond.wait()
            time.sleep(WATCH_INTERVAL_S)
            with self._cond:
                guards = list(self._guards)
            done = [guard for guard in guards if guard.tick()]
            if done:
                with self._cond:
                    self._guards.difference_update(done)


_WATCHDOG = _Watchdog()


class GuardedStream(httpcore.NetworkStream):
    """A connected socket (plain or TLS) registered with a guard (see the module docstring)."""

    def __init__(self, sock: socket.socket, guard: Guard) -> None:
        self._sock = sock
        self._guard = guard
        self._ssl_sock = sock if isinstance(sock, ssl.SSLSocket) else None
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)
        self._pending = b""  # received, not yet handed out
        self._in_headers = True
        self._tail = b""  # the last bytes handed out in the header phase
        self.bytes_in = 0
        """Bytes received since the connection was made or last adopted by a request."""
        self.session_kept = False
        """Whether a pool has kept this connection's TLS session already."""
        guard.watch(sock)

    def adopt(self, guard: Guard) -> None:
        """Serve a new request on this kept-alive connection, under that request's guard."""
        self._guard = guard
        self._in_headers = True
        self._tail = b""
        self.bytes_in = 0
        guard.watch(self._sock)

    def release(self) -> None:
        """Leave the current request's guard: the connection goes idle in a pool."""
        self._guard.watch(None)

    def drained(self) -> bool:
        """Whether nothing received is left unread (a pooled connection must be at a
        message boundary)."""
        return not self._pending and not (self._ssl_sock is not None and self._ssl_sock.pending())

    def tls_session(self) -> ssl.SSLSession | None:
        """The TLS session, to resume on a later connection; None on a plain socket."""
        if self._ssl_sock is None:
            return None
        try:
            return self._ssl_sock.session
        except (OSError, ValueError):
            return None

    def session_reused(self) -> bool:
        """Whether the TLS handshake resumed an earlier session."""
        return self._ssl_sock is not None and self._ssl_sock.session_reused

    def end_headers(self) -> None:
        """The final response's headers are in: hand out data as it comes from now on."""
        self._in_headers = False

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self._pending:
            data, self._pending = self._pending[:max_bytes], self._pending[max_bytes:]
        else:
            data = self._read_batch(max_bytes, timeout)
            self.bytes_in += len(data)
        if self._in_headers and data:
            data = self._stop_at_header_end(data)
        return data

    def readinto(self, view: memoryview, timeout: float | None) -> int:
        """Read into ``view`` what has arrived: wait up to ``timeout`` for the first bytes, then
        take whatever else is ready without waiting, up to ``len(view)``; 0 at end of stream.

        Raises ``httpcore.ReadTimeout`` / ``httpcore.ReadError`` like ``read``.
        """
        if self._pending:
            n = min(len(view), len(self._pending))
            view[:n] = self._pending[:n]
            self._pending = self._pending[n:]
            return n
        sock = self._sock
        try:
            sock.settimeout(timeout)
            got = sock.recv_into(view)
            if got == 0:
                return 0
            self.bytes_in += got
            # TLS hands out one record (16 KiB at most) per read. Taking the records already
            # here in the same call, without waiting, keeps the caller's rounds per MiB few.
            sock.settimeout(0.0)
            try:
                while got < len(view):
                    n = sock.recv_into(view[got:])
                    if n == 0:
                        break
                    got += n
                    self.bytes_in += n
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                pass  # nothing more has arrived (or TLS must write first): the next call waits
            return got
        except TimeoutError as exc:  # socket.timeout is TimeoutError since 3.10
            raise httpcore.ReadTimeout(exc) from exc
        except OSError as exc:
            raise httpcore.ReadError(exc) from exc

    def ready(self) -> bool:
        """Whether a read would return data at once (already decrypted, or on the socket)."""
        if self._pending:
            return True
        if self._ssl_sock is not None and self._ssl_sock.pending():
            return True
        # A zero-timeout poll leaves the socket's mode (and timeout) alone.
        return bool(self._poll.poll(0))

    def _read_batch(self, max_bytes: int, timeout: float | None) -> bytes:
        try:
            self._sock.settimeout(timeout)
            data = self._sock.recv(max_bytes)
        except TimeoutError as exc:
            raise httpcore.ReadTimeout(exc) from exc
        except OSError as exc:
            raise httpcore.ReadError(exc) from exc
        if not data or len(data) >= max_bytes or self._ssl_sock is None:
            return data
        # TLS returns at most one 16 KiB record per read, and each read costs a round through
        # the HTTP parser. Taking the records that have already arrived along makes those
        # rounds several times fewer on large bodies.
        parts = [data]
        size = len(data)
        try:
            while size < max_bytes and self.ready():
                more = self._sock.recv(max_bytes - size)
                if not more:
                    break
                parts.append(more)
                size += len(more)
        except OSError:
            pass  # the next read reports it
        return b"".join(parts)

    def _stop_at_header_end(self, data: bytes) -> bytes:
        # A response's header block ends at the first blank line; what follows (body, or the
        # next block after a 1xx response) waits in _pending for the next read.
        seen = self._tail + data
        found = _HEADER_END.search(seen)
        if found is None:
            self._tail = seen[-(_HEADER_END_MAX - 1) :]
            return data
        end = found.end() - len(self._tail)
        self._pending = data[end:] + self._pending
        self._tail = b""
        return data[:end]

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        try:
            self._sock.settimeout(timeout)
            self._sock.sendall(buffer)
        except TimeoutError as exc:
            raise httpcore.WriteTimeout(exc) from exc
        except OSError as exc:
            raise httpcore.WriteError(exc) from exc

    def close(self) -> None:
        self._guard.watch(None)
        self._sock.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
        session: ssl.SSLSession | None = None,
    ) -> GuardedStream:
        """Wrap the connection in TLS (resuming ``session`` when the server agrees)."""
        self._sock.settimeout(timeout)
        # The handshake runs after the TLS socket, which takes over the descriptor, is known
        # to the guard: a cancel during a slow handshake shuts it down at once.
        tls = ssl_context.wrap_socket(self._sock, server_hostname=server_hostname,
                                      do_handshake_on_connect=False, session=session)
        self._guard.watch(tls)
        try:
            tls.do_handshake()
        except TimeoutError as exc:
            tls.close()
            raise httpcore.ConnectTimeout(exc) from exc
        except OSError as exc:  # ssl.SSLError included: translate() reads it as the cause
            tls.close()
            raise httpcore.ConnectError(exc) from exc
        return GuardedStream(tls, self._guard)

    def get_extra_info(self, info: str) -> object:
        if info == "socket":
            return self._sock
        if info == "ssl_object":
            return self._ssl_sock  # what httpcore asks for the negotiated ALPN protocol
        if info == "client_addr":
            return self._sock.getsockname()
        if info == "server_addr":
            return self._sock.getpeername()
        if info == "is_readable":
            return self.ready()
        return None


class PinnedBackend(httpcore.NetworkBackend):
    """Connects only to the addresses the policy checked for the one origin it was made for.

    It connects the socket itself (rather than through ``httpcore.SyncBackend``) so that the
    guard knows the socket from the start: a cancel during a slow TCP connect shuts it down
    at once instead of waiting for the connect timeout.
    """

    def __init__(self, resolved: ResolvedTarget, guard: Guard, connect_timeout_s: float) -> None:
        self._resolved = resolved
        self._guard = guard
        self._connect_timeout_s = connect_timeout_s
        self.connected_address: str | None = None
        """The checked address the last ``connect_tcp`` reached."""

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[tuple[int, int, int]] | None = None,
    ) -> httpcore.NetworkStream:
        target = self._resolved.target
        if host != target.host or port != target.port:
            raise httpcore.ConnectError("connection to an unchecked origin refused")
        error: Exception = httpcore.ConnectError("no address to connect to")
        for address in self._resolved.addresses:
            self._guard.check()
            family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            self._guard.watch(sock)
            try:
                sock.settimeout(min(self._connect_timeout_s, self._guard.remaining_s()))
                if local_address is not None:
                    sock.bind((local_address, 0))
                for option in socket_options or ():
                    sock.setsockopt(*option)
                sock.connect((str(address), port))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except TimeoutError as exc:
                sock.close()
                error = httpcore.ConnectTimeout(f"connect timed out: {exc}")
                continue
            except OSError as exc:
                sock.close()
                self._guard.check()  # shut down by the watchdog: canceled, not refused
                error = httpcore.ConnectError(f"connect failed: {exc}")
                continue
            self.connected_address = str(address)
            return GuardedStream(sock, self._guard)
        self._guard.watch(None)
        raise error

    def connect_unix_socket(self, *args: object, **kwargs: object) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("unix sockets are not allowed")


def connect_pinned(
    resolved: ResolvedTarget,
    guard: Guard,
    ssl_context: ssl.SSLContext,
    *,
    timeout_s: float,
    connect_timeout_s: float,
    session_for: Callable[[str], ssl.SSLSession | None],
) -> tuple[str, GuardedStream]:
    """A new TLS connection to the first of the checked addresses that answers, offering the
    TLS session ``session_for(address)`` returns; the address and the stream. Raises the
    package's errors."""
    target = resolved.target
    backend = PinnedBackend(resolved, guard, connect_timeout_s)
    try:
        plain = backend.connect_tcp(target.host, target.port, timeout=timeout_s)
        address = backend.connected_address
        assert address is not None and isinstance(plain, GuardedStream)
        stream = plain.start_tls(ssl_context, server_hostname=target.host, timeout=timeout_s,
                                 session=session_for(address))
    except FetchError:
        raise
    except Exception as exc:
        raise translate(exc, shown=redact_url(target.url), guard=guard, in_body=False) from exc
    return address, stream


def translate(exc: Exception, *, shown: str, guard: Guard, in_body: bool) -> FetchError:
    """Map an httpcore exception to the package's errors."""
    if guard.fired is not None:
        return guard.error()
    if isinstance(exc, httpcore.TimeoutException):
        what = "connecting to" if isinstance(exc, httpcore.ConnectTimeout) else "reading"
        return FetchTimeout(f"timed out {what} {shown}")
    if isinstance(exc, httpcore.ConnectError):
        cause = exc.__context__ or exc.__cause__
        if isinstance(cause, ssl.SSLError):
            detail = getattr(cause, "verify_message", None) or getattr(cause, "reason", None)
            return FetchConnectError(
                f"TLS handshake with {shown} failed: {detail or 'ssl error'}", reason="tls_failed"
            )
        return FetchConnectError(f"cannot connect to {shown}")
    if in_body and isinstance(exc, (httpcore.ReadError, httpcore.RemoteProtocolError)):
        return FetchInterrupted(f"connection to {shown} dropped mid-body")
    if isinstance(exc, (httpcore.NetworkError, httpcore.ProtocolError)):
        return FetchConnectError(f"connection to {shown} failed ({type(exc).__name__})")
    return FetchError(f"request to {shown} failed ({type(exc).__name__})")


