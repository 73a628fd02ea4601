"""Idle HTTPS connections of the fetcher, kept for the next request to the same place.

A connection is handed back here only after its response was read to its end on a
keep-alive HTTP/1.1 exchange (``Fetcher`` decides that), and taken again only by a request
whose key matches exactly:

- the host name (SNI, certificate, ``Host``) and port;
- the address the connection goes to, which must be one the URL policy returned for *this*
  request (the caller builds one key per checked address): a name that now resolves
  elsewhere, or to an address no longer allowed, never gets an old connection;
- the TLS settings (the fetcher's context) and the credential header set the request carries
  (a digest, never the value), so a request with another credential, or none, opens its own.

A redirect to another origin has another key, so it never rides on a connection of the
first. The pool holds at most ``max_idle`` connections (the oldest goes first) and closes one
idle for more than ``idle_timeout_s`` (whenever it is used: no timer thread). Before handing
one out it checks the socket is quiet: an idle HTTP/1.1 connection with something to read is
one the server closed (or one that misbehaves), and is closed instead.

TLS sessions of closed or pooled connections are kept per key too, so a new connection to
the same place can resume (``ssl`` ``session=``), skipping the certificate exchange.

Hand-written because ``httpcore``'s pool picks connections by origin alone and opens them
through one network backend: the per-address pin and credential keys have no place there.
"""

from __future__ import annotations

import hashlib
import ssl
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import httpcore

from runflow_worker.cache.transport import GuardedStream

DEFAULT_MAX_IDLE = 8
# Shorter than most servers' keep-alive timeouts, so a connection is rarely taken just as its
# server gives up on it; the readable check and the one retry cover servers that close sooner.
DEFAULT_IDLE_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class PoolKey:
    """Where a connection goes and what it carries (see the module docstring)."""

    host: str
    port: int
    address: str
    tls: int
    """``id`` of the TLS context the connection was made with."""
    credential: str | None
    """Digest of the credential header (name and value), or None without one."""


def keeps_alive(response: httpcore.Response) -> bool:
    """Whether the server keeps the connection open after this response (HTTP/1.1 without
    ``Connection: close``)."""
    if response.extensions.get("http_version") != b"HTTP/1.1":
        return False
    for name, value in response.headers:
        if name.lower() == b"connection" and b"close" in (
                token.strip() for token in value.lower().split(b",")):
            return False
    return True


def credential_tag(header: tuple[str, str] | None) -> str | None:
    """A digest standing for a credential header in a key, so no key holds the secret."""
    if header is None:
        return None
    name, value = header
    return hashlib.sha256(f"{name.lower()}\0{value}".encode()).hexdigest()


class IdleConnections:
    """A bounded, thread-safe set of idle connections and resumable TLS sessions by key."""

    def __init__(self, *, max_idle: int = DEFAULT_MAX_IDLE,
                 idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S) -> None:
        self.max_idle = max_idle
        self.idle_timeout_s = idle_timeout_s
        self._lock = threading.Lock()
        # (key, stream) by a unique ticket, oldest first; the float is when it went idle.
        self._idle: OrderedDict[int, tuple[PoolKey, GuardedStream, float]] = OrderedDict()
        self._sessions: OrderedDict[PoolKey, ssl.SSLSession] = OrderedDict()
        self._ticket = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._idle)

    def take(self, keys: list[PoolKey]) -> tuple[PoolKey, GuardedStream] | None:
        """The most recently used idle, still quiet connection for any of ``keys``, or None.

        Connections found expired or readable on the way are closed.
        """
        wanted = set(keys)
        stale: list[GuardedStream] = []
        found: tuple[PoolKey, GuardedStream] | None = None
        now = time.monotonic()
        with self._lock:
            for ticket, (key, stream, idle_since) in reversed(list(self._idle.items())):
                if now - idle_since > self.idle_timeout_s:
                    del self._idle[ticket]
                    stale.append(stream)
                    continue
                if key not in wanted or found is not None:
                    continue
                del self._idle[ticket]
                if stream.ready():  # the server closed it (or sent what nobody asked for)
                    stale.append(stream)
                    continue
                found = (key, stream)
        for stream in stale:
            stream.close()
        return found

    def put(self, key: PoolKey, stream: GuardedStream) -> None:
        """Keep ``stream`` (its response fully read, keep-alive) for a later request."""
        self.remember_session(key, stream)
        evicted: list[GuardedStream] = []
        now = time.monotonic()
        with self._lock:
            for ticket, (_, old, idle_since) in list(self._idle.items()):
                if now - idle_since > self.idle_timeout_s:
                    del self._idle[ticket]
                    evicted.append(old)
            self._ticket += 1
            self._idle[self._ticket] = (key, stream, now)
            while len(self._idle) > self.max_idle:
                _, (_, old, _) = self._idle.popitem(last=False)
                evicted.append(old)
        for old in evicted:
            old.close()

    def remember_session(self, key: PoolKey, stream: GuardedStream) -> None:
        """Keep the TLS session of ``stream`` for a later connection with the same key (once
        per connection: reading it out of ``ssl`` costs about as much as a small request)."""
        if stream.session_kept:
            return
        session = stream.tls_session()
        if session is None:
            return
        stream.session_kept = True
        with self._lock:
            self._sessions[key] = session
            self._sessions.move_to_end(key)
            while len(self._sessions) > max(self.max_idle, 1) * 4:
                self._sessions.popitem(last=False)

    def session(self, key: PoolKey) -> ssl.SSLSession | None:
        """The last TLS session seen for ``key``, to resume; None if there is none."""
        with self._lock:
            return self._sessions.get(key)

    def close(self) -> None:
        """Close every idle connection and forget the sessions."""
        with self._lock:
            streams = [stream for _, stream, _ in self._idle.values()]
            self._idle.clear()
            self._sessions.clear()
        for stream in streams:
            stream.close()
