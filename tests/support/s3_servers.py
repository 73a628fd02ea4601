"""S3 endpoints for tests: moto over real HTTP, and one that never answers.

``moto_s3`` is moto in server mode on loopback (boto3's transfer threads and retries run as
they do against a bucket). ``SilentServer`` accepts connections, reads what it is sent and
never answers: the stall of a real server gone silent (or of a network path that drops the
replies): no bytes come back, so boto3's progress callback never runs again and botocore
waits for its read timeout. Its ``close`` resets every connection and stops listening, so a
transfer still waiting ends quickly (connection refused on its retries) instead of
lingering until the client's timeouts.
"""

from __future__ import annotations

import socket
import struct
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest


class SilentServer:
    """A loopback TCP server that never replies; ``url`` is its ``http://`` address."""

    def __init__(self) -> None:
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(50)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.received = threading.Event()
        """Set once a request's first bytes arrived (a transfer is in flight)."""
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="silent-s3").start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._conns.append(conn)
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    def _drain(self, conn: socket.socket) -> None:
        """Read whatever the client sends, never write a byte back."""
        try:
            while conn.recv(65536):
                self.received.set()
        except OSError:
            pass

    def close(self) -> None:
        """Stop listening and reset every connection (waiting clients fail at once)."""
        with self._lock:
            self._closed = True
            conns, self._conns = self._conns, []
        self._listener.close()
        for conn in conns:
            try:
                # Linger 0: the close sends a reset, the client's read fails at once. The
                # shutdown first: a close alone does not release a socket that another
                # thread (``_drain``) is blocked reading, so nothing would be sent.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()


def aws_test_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy AWS credentials and region, so that boto3 signs requests without looking
    further (no profile, no instance metadata)."""
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@contextmanager
def moto_s3(bucket: str) -> Iterator[tuple[str, Any]]:
    """A moto S3 server with an empty ``bucket``: its URL and a boto3 client.

    moto keeps its buckets in process-wide state shared by every server of the process, so
    the state is reset on entry and on exit: no test sees another's objects.
    """
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"

    def reset() -> None:
        request = urllib.request.Request(f"{url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass

    try:
        reset()
        client = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
        client.create_bucket(Bucket=bucket)
        yield url, client
    finally:
        try:
            reset()
        finally:
            server.stop()
