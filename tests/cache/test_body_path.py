"""The download body path: bytes read from the TLS socket straight into the writer's buffers.

``fetch_to_file`` takes an identity body from the socket itself once ``httpcore`` has parsed
the headers; these answers are the ones where that could go wrong.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from runflow_worker.cache.errors import FetchInterrupted
from runflow_worker.cache.fetcher import Fetcher
from runflow_worker.cache.transport import Guard, GuardedStream
from tests.support.bodies import make_body, sha256_hex
from tests.support.https_server import HTTPSServer, Mode

pytestmark = pytest.mark.timeout(60)

BODY = make_body(300_000 + 7)


def _head(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_early_hints_before_the_response(
    https_server: HTTPSServer, fetcher: Fetcher, tmp_path: Path
) -> None:
    raw = (_head("HTTP/1.1 103 Early Hints", "Link: </style.css>; rel=preload")
           + _head("HTTP/1.1 200 OK", f"Content-Length: {len(BODY)}") + BODY)
    https_server.add("/hinted", raw, mode=Mode.RAW)
    result = fetcher.fetch_to_file(https_server.url("/hinted"), tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == BODY
    assert result.sha256 == sha256_hex(BODY)


def test_headers_and_body_in_tiny_records(
    https_server: HTTPSServer, fetcher: Fetcher, tmp_path: Path
) -> None:
    raw = _head("HTTP/1.1 200 OK", f"Content-Length: {len(BODY)}") + BODY
    https_server.add("/tiny", raw, mode=Mode.RAW, raw_pieces=True, drip_bytes=3)
    result = fetcher.fetch_to_file(https_server.url("/tiny"), tmp_path / "out")
    assert result.sha256 == sha256_hex(BODY)
    assert result.size == len(BODY)


def test_chunked_body_is_decoded(
    https_server: HTTPSServer, fetcher: Fetcher, tmp_path: Path
) -> None:
    pieces = [BODY[:1000], BODY[1000:250_000], BODY[250_000:]]
    framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    raw = _head("HTTP/1.1 200 OK", "Transfer-Encoding: chunked") + framed
    https_server.add("/chunked", raw, mode=Mode.RAW)
    result = fetcher.fetch_to_file(https_server.url("/chunked"), tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == BODY
    assert result.sha256 == sha256_hex(BODY)


def test_bytes_past_content_length_are_not_taken(
    https_server: HTTPSServer, fetcher: Fetcher, tmp_path: Path
) -> None:
    raw = _head("HTTP/1.1 200 OK", "Content-Length: 1000") + BODY[:5000]
    https_server.add("/long", raw, mode=Mode.RAW)
    result = fetcher.fetch_to_file(https_server.url("/long"), tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == BODY[:1000]
    assert result.size == 1000


def test_body_delimited_by_close(
    https_server: HTTPSServer, fetcher: Fetcher, tmp_path: Path
) -> None:
    raw = _head("HTTP/1.0 200 OK", "Content-Type: application/octet-stream") + BODY
    https_server.add("/close", raw, mode=Mode.RAW)
    result = fetcher.fetch_to_file(https_server.url("/close"), tmp_path / "out")
    assert result.sha256 == sha256_hex(BODY)


def test_body_shorter_than_content_length_is_a_cut(
    https_server: HTTPSServer, fetcher: Fetcher, tmp_path: Path
) -> None:
    raw = _head("HTTP/1.1 200 OK", f"Content-Length: {len(BODY)}") + BODY[:1000]
    https_server.add("/short", raw, mode=Mode.RAW)
    with pytest.raises(FetchInterrupted):
        fetcher.fetch_to_file(https_server.url("/short"), tmp_path / "out")
    # The first try and every resume (each answered 200 with the same short body).
    assert https_server.routes["/short"].hits == fetcher.resume_attempts + 1


@pytest.mark.parametrize("length", [True, False])
def test_headers_ending_with_bare_line_feeds(
    length: bool, https_server: HTTPSServer, fetcher: Fetcher, tmp_path: Path
) -> None:
    # h11 takes a bare LF as a line end; the header phase must stop where h11 does, or h11
    # keeps the body's first bytes and the file silently lacks them.
    head = "HTTP/1.1 200 OK\nContent-Type: application/octet-stream\n"
    head += f"Content-Length: {len(BODY)}\n" if length else "Connection: close\n"
    https_server.add("/lf", head.encode() + b"\n" + BODY, mode=Mode.RAW)
    result = fetcher.fetch_to_file(https_server.url("/lf"), tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == BODY
    assert result.sha256 == sha256_hex(BODY)


@pytest.mark.parametrize("split", [1, 2, 3, 4, 5, 17])
def test_header_phase_stops_at_the_blank_line_wherever_reads_split(split: int) -> None:
    hints, response, body = (_head("HTTP/1.1 103 Early Hints"), _head("HTTP/1.1 200 OK", "A: b"),
                             b"body\r\n\r\nrest")
    wire = hints + response + body
    block_ends = (len(hints), len(hints) + len(response))
    ours, theirs = socket.socketpair()
    guard = Guard(None, deadline_at=float("inf"))
    try:
        stream = GuardedStream(ours, guard)
        taken = 0
        for start in range(0, len(wire), split):
            theirs.sendall(wire[start : start + split])
            if taken < block_ends[-1]:
                data = stream.read(65536, timeout=5)
                # No read reaches past the end of a header block.
                assert not any(taken < end < taken + len(data) for end in block_ends)
                taken += len(data)
        while taken < block_ends[-1]:
            data = stream.read(65536, timeout=5)
            assert data and not any(taken < end < taken + len(data) for end in block_ends)
            taken += len(data)
        assert taken == block_ends[-1]
        stream.end_headers()
        theirs.close()
        view = memoryview(bytearray(100))
        received = b""
        while n := stream.readinto(view, timeout=5):
            received += view[:n].tobytes()
        assert received == body
        stream.close()
    finally:
        guard.stop()
        theirs.close()
