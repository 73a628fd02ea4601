"""The SSRF table: every URL here is refused before any connection is made."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import pytest

from runflow_worker.cache.errors import FetchConnectError, URLRefused
from runflow_worker.cache.fetcher import Fetcher
from runflow_worker.cache.urlpolicy import URLPolicy
from tests.support.https_server import CountingListener, HTTPSServer, Mode

pytestmark = pytest.mark.timeout(60)


def _refused_urls(port: int) -> list[str]:
    return [
        "http://169.254.169.254/latest/meta-data/",
        "https://169.254.169.254/",
        f"https://[::ffff:127.0.0.1]:{port}/",
        f"https://2130706433:{port}/",
        f"https://0x7f.0.0.1:{port}/",
        f"https://017700000001:{port}/",
        f"https://127.1:{port}/",
        f"https://127.0.0.1:{port}/",
        f"https://[::1]:{port}/",
        "https://[fd00:ec2::254]/",
        f"https://[64:ff9b::7f00:1]:{port}/",
        f"https://[2002:7f00:1::]:{port}/",
        "https://100.64.0.1/",
        "https://0.0.0.0/",
        f"gopher://127.0.0.1:{port}/_FLUSHALL",
        "file:///etc/passwd",
        f"https://user:pass@127.0.0.1:{port}/",
        "https://user:pass@files.example/",
        f"http://127.0.0.1:{port}/",
    ]


@pytest.mark.parametrize("index", range(len(_refused_urls(1))))
def test_refused_before_any_connection(
    index: int, counting_listener: CountingListener, no_connections: list[object], tmp_path: Path
) -> None:
    url = _refused_urls(counting_listener.port)[index]
    fetcher = Fetcher(URLPolicy(resolver=lambda host, port: ["93.184.216.34"]))
    with pytest.raises(URLRefused) as info:
        fetcher.fetch_to_file(url, tmp_path / "out")
    assert info.value.reason == "url_refused"
    assert ":pass@" not in str(info.value)
    assert no_connections == []
    assert counting_listener.connections == 0
    assert counting_listener.bytes_received == 0
    assert not (tmp_path / "out").exists()


def test_host_resolving_to_a_private_address(no_connections: list[object]) -> None:
    fetcher = Fetcher(URLPolicy(resolver=lambda host, port: ["10.0.0.1"]))
    with pytest.raises(URLRefused, match="private"), fetcher.open("https://internal.example/"):
        pass
    assert no_connections == []


def test_open_and_post_are_checked_too(counting_listener: CountingListener) -> None:
    fetcher = Fetcher(URLPolicy())
    with pytest.raises(URLRefused):
        fetcher.post(f"https://127.0.0.1:{counting_listener.port}/hook", b"{}", {})
    with pytest.raises(URLRefused), fetcher.open(f"https://2130706433:{counting_listener.port}/"):
        pass
    assert counting_listener.connections == 0


def test_redirect_to_loopback_is_refused(
    https_server: HTTPSServer, counting_listener: CountingListener, ca_bundle: Path, tmp_path: Path
) -> None:
    https_server.add("/hop", mode=Mode.REDIRECT,
                     location=f"https://127.0.0.1:{counting_listener.port}/")
    policy = URLPolicy(["redirector.test"], resolver=lambda host, port: ["127.0.0.1"])
    fetcher = Fetcher(policy, ca_bundle=ca_bundle, timeout_s=5)
    with pytest.raises(URLRefused, match="loopback"):
        fetcher.fetch_to_file(https_server.url("/hop", host="redirector.test"), tmp_path / "out")
    assert https_server.routes["/hop"].hits == 1  # the allowed host was asked
    assert counting_listener.connections == 0  # the redirect target never was


@pytest.mark.parametrize("location", ["http://files.test/x", "file:///etc/passwd",
                                      "https://169.254.169.254/latest/meta-data/"])
def test_redirect_to_other_refused_urls(
    https_server: HTTPSServer, fetcher: Fetcher, tmp_path: Path, location: str
) -> None:
    https_server.add("/hop", mode=Mode.REDIRECT, location=location)
    with pytest.raises(URLRefused):
        fetcher.fetch_to_file(https_server.url("/hop"), tmp_path / "out")


def test_dns_rebinding_connects_to_the_checked_address(
    tls_ca: object, ca_bundle: Path, tmp_path: Path
) -> None:
    """First answer: an allowed address serving the file; any later answer: 127.0.0.1, where a
    listener on the same port counts connections. The fetch must use the first answer only."""
    answers = iter([["127.0.0.2"]])
    calls: list[str] = []

    def rebinding_resolver(host: str, port: int) -> list[str]:
        calls.append(host)
        return next(answers, ["127.0.0.1"])

    with HTTPSServer(bind="127.0.0.2", ca=tls_ca, hostnames=["rebind.test"]) as server:  # type: ignore[arg-type]
        server.add("/file", b"the real content")
        try:
            trap = CountingListener("127.0.0.1", server.port)
        except OSError:
            pytest.skip("port taken on 127.0.0.1")
        with trap:
            fetcher = Fetcher(URLPolicy(["127.0.0.2/32"], resolver=rebinding_resolver),
                              ca_bundle=ca_bundle, timeout_s=5)
            result = fetcher.fetch_to_file(server.url("/file", host="rebind.test"),
                                           tmp_path / "out")
        assert (tmp_path / "out").read_bytes() == b"the real content"
        assert result.final_url.startswith("https://rebind.test:")
        assert calls == ["rebind.test"]  # resolved once, never again
        assert trap.connections == 0
        # Host header and SNI carried the name, not the address.
        assert server.requests_for("/file")[0].headers["Host"] == f"rebind.test:{server.port}"


def test_dns_rebinding_public_then_loopback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The resolver says 93.184.216.34 first and 127.0.0.1 afterwards: the one connection
    attempt goes to 93.184.216.34 (intercepted here, nothing leaves the machine)."""
    answers = iter([["93.184.216.34"]])
    attempts: list[tuple[str, int]] = []

    def resolver(host: str, port: int) -> list[str]:
        return next(answers, ["127.0.0.1"])

    def fake_connect(self: socket.socket, address: tuple[str, int]) -> None:
        attempts.append(address)
        raise ConnectionRefusedError("intercepted by the test")

    monkeypatch.setattr(socket.socket, "connect", fake_connect)
    fetcher = Fetcher(URLPolicy(resolver=resolver), timeout_s=5)
    with pytest.raises(FetchConnectError):
        fetcher.fetch_to_file("https://rebind.example/model.bin", tmp_path / "out")
    assert attempts == [("93.184.216.34", 443)]
    assert ipaddress.ip_address(attempts[0][0]).is_global


def test_too_many_redirects(https_server: HTTPSServer, fetcher: Fetcher, tmp_path: Path) -> None:
    from runflow_worker.cache.errors import TooManyRedirects

    for i in range(7):
        https_server.add(f"/r{i}", mode=Mode.REDIRECT, location=f"/r{i + 1}")
    https_server.add("/r7", b"end")
    with pytest.raises(TooManyRedirects):
        fetcher.fetch_to_file(https_server.url("/r0"), tmp_path / "out")
    https_server.add("/s0", mode=Mode.REDIRECT, location="/r3")  # 5 hops: allowed
    assert fetcher.fetch_to_file(https_server.url("/s0"), tmp_path / "out").size == 3
