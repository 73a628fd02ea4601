"""Shared fixtures (every test folder has them, through tests/conftest.py): a local TLS
server and a CA, fetchers trusting it, stores, S3 (moto), a connection recorder, an
environment without the machine's RUNFLOW_* variables, a runner supervisor."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme

from runflow_worker.cache.blobs import BlobStore
from runflow_worker.cache.fetcher import Fetcher
from runflow_worker.cache.sources import Sources
from runflow_worker.cache.urlpolicy import URLPolicy
from runflow_worker.runtime.supervisor import RunnerSupervisor
from tests.support.https_server import CountingListener, HTTPSServer
from tests.support.s3_servers import aws_test_credentials

LOOPBACK_ALLOW = ("127.0.0.1/32",)
"""The URL policy's allow list of the test fetchers: the test servers' loopback address."""
TEST_HOSTNAMES = ("files.test", "redirector.test", "rebind.test")
"""Names the test server's certificate carries besides 127.0.0.1 (resolved by the tests)."""


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    """One certificate authority for every test server of the session."""
    return trustme.CA()


@pytest.fixture
def https_server(tls_ca: trustme.CA) -> Iterator[HTTPSServer]:
    """A running HTTPS server on 127.0.0.1 whose certificate also names TEST_HOSTNAMES."""
    with HTTPSServer(ca=tls_ca, hostnames=TEST_HOSTNAMES) as server:
        yield server


@pytest.fixture
def ca_bundle(tls_ca: trustme.CA, tmp_path: Path) -> Path:
    """The test CA as a PEM file."""
    path = tmp_path / "test-ca.pem"
    tls_ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def fetcher(ca_bundle: Path) -> Fetcher:
    """A fetcher that may reach 127.0.0.1 (explicitly allowed) and trusts the test CA."""
    return Fetcher(URLPolicy(LOOPBACK_ALLOW), ca_bundle=ca_bundle, timeout_s=10)


@pytest.fixture
def counting_listener() -> Iterator[CountingListener]:
    """A loopback TCP listener that counts connections (it must see none for refused URLs)."""
    with CountingListener() as listener:
        yield listener


@pytest.fixture
def make_store(tmp_path: Path, fetcher: Fetcher) -> Callable[..., BlobStore]:
    """Factory of stores rooted at ``tmp_path/cache/blobs`` fetching through ``fetcher``."""

    def make(**kwargs: object) -> BlobStore:
        sources = kwargs.pop("sources", None) or Sources(fetcher=fetcher)
        return BlobStore(tmp_path / "cache" / "blobs", sources=sources, **kwargs)  # type: ignore[arg-type]

    return make


@pytest.fixture
def no_runflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No RUNFLOW_* variable of the machine running the tests leaks into the test."""
    for name in list(os.environ):
        if name.startswith("RUNFLOW_"):
            monkeypatch.delenv(name)


@pytest.fixture
def no_connections(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Record (and forbid) every outgoing TCP connection attempt made through ``socket``."""
    attempts: list[object] = []

    def refuse_create_connection(address: object, *args: object, **kwargs: object) -> None:
        attempts.append(address)
        raise ConnectionRefusedError("test: connection attempted")

    real_connect = socket.socket.connect

    def refuse_connect(self: socket.socket, address: object) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise ConnectionRefusedError("test: connection attempted")
        real_connect(self, address)

    monkeypatch.setattr(socket, "create_connection", refuse_create_connection)
    monkeypatch.setattr(socket.socket, "connect", refuse_connect)
    return attempts


@pytest.fixture
def moto_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An S3 endpoint (moto in server mode on loopback); yields its URL."""
    from moto.server import ThreadedMotoServer

    aws_test_credentials(monkeypatch)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()



@pytest.fixture
def sup() -> Iterator[RunnerSupervisor]:
    """A runner supervisor, closed (its child stopped) at teardown."""
    supervisor = RunnerSupervisor()
    yield supervisor
    supervisor.close()
