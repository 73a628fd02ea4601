"""Kept-alive input connections: reused for the same host, address, TLS settings and
credential only, after a response read to its end; stale ones replaced; the pool bounded."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpcore
import pytest

from runflow_worker.cache.connpool import keeps_alive
from runflow_worker.cache.credentials import URLCredentials
from runflow_worker.cache.errors import FetchConnectError
from runflow_worker.cache.fetcher import Fetcher
from runflow_worker.cache.urlpolicy import URLPolicy
from tests.support.bodies import make_body, sha256_hex
from tests.support.https_server import HTTPSServer, Mode

pytestmark = pytest.mark.timeout(30)

NAME = "files.test"  # in the server's certificate; the test resolver maps it to loopback
SECRET = "k-s3cret"
BODY = make_body(70_000)


def _fetcher(ca_bundle: Path, resolver: Callable[[str, int], list[str]] | None = None,
             **kwargs: object) -> Fetcher:
    policy = URLPolicy(["127.0.0.0/8", NAME, "redirector.test"],
                       resolver=resolver or (lambda host, port: ["127.0.0.1"]))
    return Fetcher(policy, ca_bundle=ca_bundle, timeout_s=10, **kwargs)  # type: ignore[arg-type]


def _get(fetcher: Fetcher, url: str, dest: Path) -> None:
    result = fetcher.fetch_to_file(url, dest, fsync=False)
    assert result.sha256 == sha256_hex(BODY)


def _warm_fetcher(https_server: HTTPSServer, ca_bundle: Path, dest: Path,
                  **kwargs: object) -> Fetcher:
    """A fetcher (``kwargs`` as ``_fetcher``'s) that fetched ``/a.bin`` (``BODY``, served
    from here on) to ``dest``: one connection made, idle in its pool."""
    https_server.add("/a.bin", BODY)
    fetcher = _fetcher(ca_bundle, **kwargs)
    _get(fetcher, https_server.url("/a.bin"), dest)
    return fetcher


def test_two_fetches_from_one_host_share_one_connection(
    https_server: HTTPSServer, ca_bundle: Path, tmp_path: Path
) -> None:
    https_server.add("/a.bin", BODY)
    https_server.add("/b.bin", BODY)
    fetcher = _fetcher(ca_bundle)
    _get(fetcher, https_server.url("/a.bin"), tmp_path / "a")
    _get(fetcher, https_server.url("/b.bin"), tmp_path / "b")
    with fetcher.open(https_server.url("/a.bin")) as resp:  # through the parser this time
        assert resp.read(1 << 20) == BODY
    _get(fetcher, https_server.url("/a.bin"), tmp_path / "c")
    assert https_server.connections == 1
    assert [r.path for r in https_server.requests] == ["/a.bin", "/b.bin", "/a.bin", "/a.bin"]
    fetcher.close()


def test_another_host_address_or_credential_gets_its_own_connection(
    https_server: HTTPSServer, ca_bundle: Path, tmp_path: Path
) -> None:
    fetcher = _warm_fetcher(https_server, ca_bundle, tmp_path / "a")
    _get(fetcher, https_server.url("/a.bin", host=NAME), tmp_path / "b")  # same address
    assert https_server.connections == 2
    _get(fetcher, https_server.url("/a.bin", host=NAME), tmp_path / "c")
    assert https_server.connections == 2
    fetcher.close()

    # The same name, now resolving to another (allowed) address: a new connection there.
    with HTTPSServer(bind="0.0.0.0", ca=https_server.ca, hostnames=[NAME]) as wide:
        wide.add("/a.bin", BODY)
        answers = iter([["127.0.0.1"], ["127.0.0.2"], ["127.0.0.2"]])
        moving = _fetcher(ca_bundle, resolver=lambda host, port: next(answers))
        for name in ("x", "y", "z"):
            _get(moving, wide.url("/a.bin", host=NAME), tmp_path / name)
        assert wide.connections == 2
        moving.close()

    # A credential for the host: requests with it and without it never share a connection.
    https_server.add("/gated.bin", BODY, authorization=f"Bearer {SECRET}")
    creds = URLCredentials.parse(f"{NAME}=env:TOKEN", {"TOKEN": SECRET})
    carrying = _fetcher(ca_bundle, credentials=creds)
    before = https_server.connections
    _get(carrying, https_server.url("/gated.bin", host=NAME), tmp_path / "g1")
    with carrying.open(https_server.url("/a.bin", host=NAME)) as resp:  # no credential
        assert resp.read(1 << 20) == BODY
    _get(carrying, https_server.url("/gated.bin", host=NAME), tmp_path / "g2")
    assert https_server.connections == before + 2
    carrying.close()


def test_a_redirect_to_another_host_opens_its_own_connection(
    https_server: HTTPSServer, ca_bundle: Path, tmp_path: Path
) -> None:
    https_server.add("/a.bin", BODY)
    https_server.add("/moved", mode=Mode.REDIRECT, location=https_server.url("/a.bin"))
    fetcher = _fetcher(ca_bundle)
    _get(fetcher, https_server.url("/moved", host="redirector.test"), tmp_path / "a")
    assert https_server.connections == 2
    hosts = [r.headers["Host"].split(":")[0] for r in https_server.requests]
    assert hosts == ["redirector.test", "127.0.0.1"]
    fetcher.close()


def test_a_connection_the_server_closed_is_replaced(
    https_server: HTTPSServer, ca_bundle: Path, tmp_path: Path
) -> None:
    fetcher = _warm_fetcher(https_server, ca_bundle, tmp_path / "a")
    https_server.drop_connections()  # the idle one, as a server's keep-alive timeout does
    _get(fetcher, https_server.url("/a.bin"), tmp_path / "b")
    assert https_server.connections == 2
    fetcher.close()


def test_a_get_unanswered_on_a_reused_connection_goes_again_on_a_new_one(
    https_server: HTTPSServer, ca_bundle: Path, tmp_path: Path
) -> None:
    flaky = https_server.add("/flaky.bin", BODY, unanswered=1)
    fetcher = _warm_fetcher(https_server, ca_bundle, tmp_path / "a")
    _get(fetcher, https_server.url("/flaky.bin"), tmp_path / "b")
    assert flaky.hits == 2
    assert https_server.connections == 2
    fetcher.close()

    # On a new connection nothing is retried: the failure is the server's answer.
    again = https_server.add("/flaky2.bin", BODY, unanswered=1)
    fresh = _fetcher(ca_bundle)
    with pytest.raises(FetchConnectError):
        fresh.fetch_to_file(https_server.url("/flaky2.bin"), tmp_path / "c", fsync=False)
    assert again.hits == 1
    fresh.close()


def test_an_unfinished_response_never_returns_its_connection(
    https_server: HTTPSServer, ca_bundle: Path
) -> None:
    https_server.add("/a.bin", BODY)
    fetcher = _fetcher(ca_bundle)
    with fetcher.open(https_server.url("/a.bin")) as resp:
        assert resp.status_code == 200  # body left unread
    assert fetcher.idle_connections == 0
    with fetcher.open(https_server.url("/a.bin")) as resp:
        assert resp.read(1 << 20) == BODY
    assert https_server.connections == 2
    assert fetcher.idle_connections == 1
    fetcher.close()


def test_the_pool_is_bounded(https_server: HTTPSServer, ca_bundle: Path, tmp_path: Path) -> None:
    https_server.add("/a.bin", BODY)
    fetcher = _fetcher(ca_bundle, max_idle_connections=2)
    hosts = ["127.0.0.1", NAME, "redirector.test"]
    for host in hosts:
        _get(fetcher, https_server.url("/a.bin", host=host), tmp_path / host)
    assert fetcher.idle_connections == 2
    assert https_server.connections == 3
    _get(fetcher, https_server.url("/a.bin", host=hosts[2]), tmp_path / "again")  # kept
    assert https_server.connections == 3
    _get(fetcher, https_server.url("/a.bin", host=hosts[0]), tmp_path / "first")  # evicted
    assert https_server.connections == 4
    assert fetcher.idle_connections == 2
    fetcher.close()
    assert fetcher.idle_connections == 0


def test_a_new_connection_resumes_the_tls_session(
    https_server: HTTPSServer, ca_bundle: Path, tmp_path: Path
) -> None:
    fetcher = _warm_fetcher(https_server, ca_bundle, tmp_path / "a")
    https_server.drop_connections()
    with fetcher.open(https_server.url("/a.bin")) as resp:
        assert resp.read(1 << 20) == BODY
        assert resp.tls_session_reused is True
    fetcher.close()


@pytest.mark.parametrize(("version", "connection", "kept"), [
    (b"HTTP/1.1", None, True),
    (b"HTTP/1.1", b"keep-alive", True),
    (b"HTTP/1.1", b"Keep-Alive, Close", False),
    (b"HTTP/1.1", b"close", False),
    (b"HTTP/1.0", None, False),
])
def test_only_a_keep_alive_answer_keeps_its_connection(
    version: bytes, connection: bytes | None, kept: bool
) -> None:
    headers = [(b"Content-Length", b"0")] + ([(b"Connection", connection)] if connection else [])
    response = httpcore.Response(200, headers=headers, extensions={"http_version": version})
    assert keeps_alive(response) is kept


def test_a_connection_idle_past_the_timeout_is_not_reused(
    https_server: HTTPSServer, ca_bundle: Path, tmp_path: Path
) -> None:
    # Every idle connection is already too old.
    fetcher = _warm_fetcher(https_server, ca_bundle, tmp_path / "a", idle_timeout_s=0.0)
    _get(fetcher, https_server.url("/a.bin"), tmp_path / "b")
    assert https_server.connections == 2
    assert fetcher.idle_connections == 1  # the old one closed when the new one came in
    fetcher.close()
