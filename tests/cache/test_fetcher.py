"""Fetcher against the local TLS server: good, cut, Range-ignoring, slow and failing answers."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from runflow_worker.cache.errors import (
    FetchCanceled,
    FetchConnectError,
    FetchTimeout,
    FetchTooLarge,
    HTTPStatusError,
)
from runflow_worker.cache.fetcher import Fetcher
from runflow_worker.cache.urlpolicy import URLPolicy
from tests.support.bodies import make_body, sha256_hex
from tests.support.fixtures import LOOPBACK_ALLOW
from tests.support.https_server import HTTPSServer, Mode

pytestmark = pytest.mark.timeout(60)

BODY = make_body(3 * 2**20 + 123)


def test_good_download(https_server: HTTPSServer, fetcher: Fetcher, tmp_path: Path) -> None:
    https_server.add("/model.bin", BODY, content_type="application/x-test")
    seen: list[tuple[int, int | None]] = []
    result = fetcher.fetch_to_file(https_server.url("/model.bin"), tmp_path / "out",
                                   progress=lambda d, t: seen.append((d, t)))
    assert (tmp_path / "out").read_bytes() == BODY
    assert result.sha256 == sha256_hex(BODY)
    assert result.size == len(BODY)
    assert result.content_type == "application/x-test"
    assert seen[-1] == (len(BODY), len(BODY))
    headers = https_server.requests_for("/model.bin")[0].headers
    assert headers["Host"] == f"127.0.0.1:{https_server.port}"
    assert headers["Accept-Encoding"] == "identity"


def test_cut_connection_resumes_with_range(
    https_server: HTTPSServer, fetcher: Fetcher, tmp_path: Path
) -> None:
    route = https_server.add("/cut.bin", BODY, mode=Mode.TRUNCATE_ONCE, cut_at=2 * 2**20)
    result = fetcher.fetch_to_file(https_server.url("/cut.bin"), tmp_path / "out")
    assert result.sha256 == sha256_hex(BODY)
    assert route.range_headers[0] is None
    assert route.range_headers[1] is not None and route.range_headers[1].startswith("bytes=")
    assert int(route.range_headers[1][6:-1]) > 0


@pytest.mark.parametrize("answer", [
    lambda start, size: (206, f"bytes {start}-{start + 999}/{size}", start),  # stops short
    lambda start, size: (206, f"bytes {start - 10}-{size - 1}/{size}", start),  # elsewhere
    lambda start, size: (206, None, start),  # no Content-Range at all
    lambda start, size: (203, None, 0),  # a 2xx that is no continuation
], ids=["short", "elsewhere", "no-range", "203"])
def test_a_resume_answer_that_continues_nothing_restarts_from_zero(
    answer, https_server: HTTPSServer, fetcher: Fetcher, tmp_path: Path
) -> None:
    # Caller files have no digest to catch a wrong splice: the resume itself must be right.
    route = https_server.add("/cut.bin", BODY, mode=Mode.TRUNCATE_ONCE, cut_at=2 * 2**20)
    route.partial_answer = answer
    result = fetcher.fetch_to_file(https_server.url("/cut.bin"), tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == BODY and result.sha256 == sha256_hex(BODY)
    assert route.range_headers[-1] is None  # the last request asked for the whole file


def test_a_file_replaced_between_a_cut_and_the_resume_is_not_spliced(
    https_server: HTTPSServer, fetcher: Fetcher, tmp_path: Path
) -> None:
    # A caller's file has no digest to catch a splice: the resume asks for the rest of the
    # version it started on (If-Range), and gets the whole new version instead.
    new = bytes(reversed(BODY))  # same size, other bytes
    route = https_server.add("/v.bin", BODY, mode=Mode.TRUNCATE_ONCE, cut_at=2 * 2**20,
                             with_etag=True)
    route.next_version = new
    fetcher.fetch_to_file(https_server.url("/v.bin"), tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == new
    resumed = https_server.requests_for("/v.bin")[1].headers
    assert resumed["Range"].startswith("bytes=") and resumed["If-Range"].startswith('"')


def test_a_complete_file_is_still_held_to_the_size_limit(
    https_server: HTTPSServer, fetcher: Fetcher, tmp_path: Path
) -> None:
    https_server.add("/whole.bin", BODY)
    dest = tmp_path / "out"
    dest.write_bytes(BODY)  # every byte already there: the server answers 416
    with pytest.raises(FetchTooLarge):
        fetcher.fetch_to_file(https_server.url("/whole.bin"), dest, start_offset=len(BODY),
                              max_bytes=len(BODY) - 1)
    assert fetcher.fetch_to_file(https_server.url("/whole.bin"), dest,
                                 start_offset=len(BODY)).sha256 == sha256_hex(BODY)


def test_range_ignored_restarts_from_zero(
    https_server: HTTPSServer, fetcher: Fetcher, tmp_path: Path
) -> None:
    route = https_server.add("/cut.bin", BODY, mode=Mode.TRUNCATE_ONCE, cut_at=2 * 2**20,
                             ignore_range=True)
    result = fetcher.fetch_to_file(https_server.url("/cut.bin"), tmp_path / "out")
    assert result.sha256 == sha256_hex(BODY)
    assert result.size == len(BODY)
    assert len(route.range_headers) == 2 and route.range_headers[1] is not None


def test_start_offset_keeps_the_prefix(
    https_server: HTTPSServer, fetcher: Fetcher, tmp_path: Path
) -> None:
    https_server.add("/f", BODY)
    out = tmp_path / "out"
    out.write_bytes(BODY[:1000] + b"garbage beyond the offset")
    result = fetcher.fetch_to_file(https_server.url("/f"), out, start_offset=1000)
    assert result.sha256 == sha256_hex(BODY)
    assert https_server.routes["/f"].range_headers == ["bytes=1000-"]


def test_read_timeout(https_server: HTTPSServer, ca_bundle: Path, tmp_path: Path) -> None:
    https_server.add("/stall", BODY, mode=Mode.STALL, cut_at=1000)
    fetcher = Fetcher(URLPolicy(LOOPBACK_ALLOW), ca_bundle=ca_bundle, timeout_s=0.5,
                      resume_attempts=0)
    with pytest.raises(FetchTimeout):
        fetcher.fetch_to_file(https_server.url("/stall"), tmp_path / "out")


def test_overall_deadline(https_server: HTTPSServer, ca_bundle: Path, tmp_path: Path) -> None:
    https_server.add("/drip", BODY, mode=Mode.DRIP, drip_bytes=10, drip_interval_s=0.02)
    fetcher = Fetcher(URLPolicy(LOOPBACK_ALLOW), ca_bundle=ca_bundle, timeout_s=5,
                      deadline_s=0.5)
    started = time.monotonic()
    with pytest.raises(FetchTimeout) as info:
        fetcher.fetch_to_file(https_server.url("/drip"), tmp_path / "out")
    assert info.value.reason == "deadline"
    assert time.monotonic() - started < 3


def test_cancel_interrupts_a_blocked_read(
    https_server: HTTPSServer, fetcher: Fetcher, tmp_path: Path
) -> None:
    https_server.add("/stall", BODY, mode=Mode.STALL, cut_at=4096)
    got_bytes = threading.Event()
    cancel = threading.Event()

    def progress(done: int, total: int | None) -> None:
        if done > 0:
            got_bytes.set()
            cancel.set()  # the read that follows blocks: the server has gone quiet

    started = time.monotonic()
    with pytest.raises(FetchCanceled):
        fetcher.fetch_to_file(https_server.url("/stall"), tmp_path / "out",
                              progress=progress, cancel=cancel.is_set)
    assert got_bytes.is_set()
    assert time.monotonic() - started < 2


def test_too_large_by_header_reads_no_body(
    https_server: HTTPSServer, fetcher: Fetcher, tmp_path: Path
) -> None:
    https_server.add("/big", BODY)
    with pytest.raises(FetchTooLarge):
        fetcher.fetch_to_file(https_server.url("/big"), tmp_path / "out", max_bytes=1000)
    assert not (tmp_path / "out").exists()


def test_http_status_error_redacts_the_query(
    https_server: HTTPSServer, fetcher: Fetcher, tmp_path: Path
) -> None:
    https_server.add("/gone", b"nope", mode=Mode.STATUS, status=404)
    url = https_server.url("/gone") + "?X-Amz-Signature=topsecret&X-Amz-Credential=AKIA"
    with pytest.raises(HTTPStatusError) as info:
        fetcher.fetch_to_file(url, tmp_path / "out")
    assert info.value.status_code == 404
    assert "topsecret" not in str(info.value) and "AKIA" not in str(info.value)
    assert "/gone?..." in str(info.value)


def test_untrusted_certificate(https_server: HTTPSServer, tmp_path: Path) -> None:
    https_server.add("/f", b"x")
    fetcher = Fetcher(URLPolicy(LOOPBACK_ALLOW), timeout_s=5)  # public roots only
    with pytest.raises(FetchConnectError) as info:
        fetcher.fetch_to_file(https_server.url("/f"), tmp_path / "out")
    assert info.value.reason == "tls_failed"


def test_certificate_is_checked_against_the_host_name(
    https_server: HTTPSServer, ca_bundle: Path, tmp_path: Path
) -> None:
    """The connection goes to 127.0.0.1, but the certificate must match the URL's name."""
    https_server.add("/f", b"x")
    policy = URLPolicy(["127.0.0.1/32", "not-in-cert.test"], resolver=lambda h, p: ["127.0.0.1"])
    fetcher = Fetcher(policy, ca_bundle=ca_bundle, timeout_s=5)
    with pytest.raises(FetchConnectError) as info:
        fetcher.fetch_to_file(https_server.url("/f", host="not-in-cert.test"), tmp_path / "out")
    assert info.value.reason == "tls_failed"
    policy_ok = URLPolicy(["files.test"], resolver=lambda h, p: ["127.0.0.1"])
    ok = Fetcher(policy_ok, ca_bundle=ca_bundle, timeout_s=5)
    assert ok.fetch_to_file(https_server.url("/f", host="files.test"), tmp_path / "o").size == 1


def test_post_and_open(https_server: HTTPSServer, fetcher: Fetcher) -> None:
    https_server.add("/hook", b"ok")
    status = fetcher.post(https_server.url("/hook"), b'{"a": 1}',
                          {"Content-Type": "application/json", "webhook-id": "msg_1"})
    assert status == 200
    request = https_server.requests_for("/hook")[0]
    assert request.method == "POST"
    assert request.body == b'{"a": 1}'
    assert request.headers["webhook-id"] == "msg_1"
    with fetcher.open(https_server.url("/hook"), start=1) as resp:
        assert resp.status_code == 206
        assert resp.headers["content-range"] == "bytes 1-1/2"
        assert b"".join(resp.iter_bytes()) == b"k"


def test_post_does_not_follow_redirects(https_server: HTTPSServer, fetcher: Fetcher) -> None:
    https_server.add("/moved", mode=Mode.REDIRECT, status=307, location="/elsewhere")
    assert fetcher.post(https_server.url("/moved"), b"{}") == 307
    assert https_server.requests_for("/elsewhere") == []


def test_redirect_drops_credentials_for_another_origin(
    https_server: HTTPSServer, ca_bundle: Path, tmp_path: Path
) -> None:
    https_server.add("/final", b"done")
    https_server.add("/hop", mode=Mode.REDIRECT,
                     location=https_server.url("/final", host="files.test"))
    policy = URLPolicy(["127.0.0.1/32", "files.test"], resolver=lambda h, p: ["127.0.0.1"])
    fetcher = Fetcher(policy, ca_bundle=ca_bundle, timeout_s=5)
    with fetcher.open(https_server.url("/hop"), headers={"Authorization": "Bearer x"}) as resp:
        assert resp.read(100) == b"done"
        assert resp.url == https_server.url("/final", host="files.test")
    assert "Authorization" in https_server.requests_for("/hop")[0].headers
    assert "Authorization" not in https_server.requests_for("/final")[0].headers


def _cancel_on_third_poll() -> Callable[[], bool]:
    """A cancel check that says yes on its third call (the watchdog polls ten times a second)."""
    calls = iter(range(3))
    return lambda: next(calls, None) is None


@pytest.mark.parametrize("backlog", [0, 8], ids=["tcp-connect", "tls-handshake"])
def test_cancel_interrupts_a_slow_connect_or_handshake(
    ca_bundle: Path, tmp_path: Path, backlog: int
) -> None:
    # A listener that never accepts. With backlog 0 and one connection already queued, the
    # kernel drops further SYNs, so a connect hangs; with room in the backlog the connect
    # completes and the TLS handshake waits for a ServerHello that never comes.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(backlog)
    port = listener.getsockname()[1]
    queued = socket.create_connection(("127.0.0.1", port), timeout=5)
    fetcher = Fetcher(URLPolicy(LOOPBACK_ALLOW), ca_bundle=ca_bundle, timeout_s=30)
    started = time.monotonic()
    try:
        with pytest.raises(FetchCanceled):
            fetcher.fetch_to_file(f"https://127.0.0.1:{port}/x", tmp_path / "out",
                                  cancel=_cancel_on_third_poll())
        assert time.monotonic() - started < 5  # not the 30 s connect / read timeout
    finally:
        queued.close()
        listener.close()


def test_response_headers_any_case_repeats_joined_values_decoded() -> None:
    """A response's fields by name in any case, a repeated one's values joined as
    ``httpx.Headers`` joins them, values read as ASCII, else UTF-8, else Latin-1."""
    from runflow_worker.cache.fetcher import ResponseHeaders

    headers = ResponseHeaders([(b"Content-Type", b"image/png"), (b"Vary", b"Accept"),
                               (b"vary", b"Origin"), (b"Location", "/ü".encode()),
                               (b"X-Latin", b"caf\xe9")])
    assert headers["content-type"] == headers["CONTENT-TYPE"] == "image/png"
    assert headers.get("Vary") == "Accept, Origin"
    assert headers["location"] == "/ü" and headers["x-latin"] == "café"
    assert "transfer-encoding" not in headers and "Content-Type" in headers
    assert headers.get("etag") is None and headers.get("etag", "x") == "x"
    assert len(headers) == 4 and set(headers) == {"content-type", "vary", "location",
                                                  "x-latin"}
    with pytest.raises(KeyError):
        headers["etag"]
