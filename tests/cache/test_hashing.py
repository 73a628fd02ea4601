"""HashingFileWriter: hashing and writing in one pass, through the page cache or past it."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from runflow_worker.cache import hashing
from runflow_worker.cache.hashing import ALIGN, DIRECT_IO_MIN_BYTES, HashingFileWriter
from tests.support.bodies import make_body, sha256_hex

pytestmark = pytest.mark.timeout(60)

BODY = make_body(3 * 2**20 + 4321)


def _supports_direct_io(directory: Path) -> bool:
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    probe = directory / "direct-probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | flag, 0o600)
    except OSError:
        return False
    os.close(fd)
    probe.unlink()
    return True


@pytest.fixture
def direct_dir(tmp_path: Path) -> Path:
    if not _supports_direct_io(tmp_path):
        pytest.skip("the test directory's file system refuses O_DIRECT")
    return tmp_path


def _write_in_pieces(writer: HashingFileWriter, data: bytes, piece: int = 7777) -> None:
    for start in range(0, len(data), piece):
        writer.write(data[start : start + piece])


def test_small_pieces_and_resume(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"keep" + b"drop")
    writer = HashingFileWriter(path, start_offset=4)
    for _ in range(5000):
        writer.write(b"ab")
    digest, size = writer.close()
    expected = b"keep" + b"ab" * 5000
    assert path.read_bytes() == expected
    assert (digest, size) == (sha256_hex(expected), len(expected))


def test_a_file_of_one_batch_costs_one_buffer_and_no_thread(tmp_path: Path) -> None:
    # An input image: hashed and written by the caller at close.
    path = tmp_path / "small"
    writer = HashingFileWriter(path)
    _write_in_pieces(writer, BODY[:50_000])
    assert writer.close(fsync=False) == (sha256_hex(BODY[:50_000]), 50_000)
    assert path.read_bytes() == BODY[:50_000]
    assert writer._buffers_made == 1 and writer._hasher is None


def test_buffers_are_made_as_needed_up_to_the_bound(tmp_path: Path) -> None:
    path = tmp_path / "big"
    writer = HashingFileWriter(path, batch_bytes=64 * ALIGN)
    _write_in_pieces(writer, BODY)
    assert writer.close(fsync=False) == (sha256_hex(BODY), len(BODY))
    assert path.read_bytes() == BODY
    assert 1 < writer._buffers_made <= hashing.BUFFERS


def test_large_file_goes_past_the_page_cache(direct_dir: Path) -> None:
    path = direct_dir / "blob"
    writer = HashingFileWriter(path, expected_bytes=DIRECT_IO_MIN_BYTES, direct_io=True)
    _write_in_pieces(writer, BODY)
    digest, size = writer.close()
    assert path.read_bytes() == BODY
    assert (digest, size) == (sha256_hex(BODY), len(BODY))
    # Everything but the file's unaligned last bytes went past the page cache.
    assert writer.direct_bytes == len(BODY) - len(BODY) % ALIGN


def test_direct_resume_from_an_odd_offset(direct_dir: Path) -> None:
    path = direct_dir / "blob"
    path.write_bytes(BODY[:1001])
    writer = HashingFileWriter(path, start_offset=1001, expected_bytes=DIRECT_IO_MIN_BYTES,
                               direct_io=True)
    _write_in_pieces(writer, BODY[1001:])
    digest, size = writer.close()
    assert path.read_bytes() == BODY
    assert (digest, size) == (sha256_hex(BODY), len(BODY))
    # The first batch, from the odd offset, ends on an aligned one (1 MiB): all after it
    # but the unaligned end of the file could go direct.
    assert writer.direct_bytes == len(BODY) - len(BODY) % ALIGN - 2**20


def test_unknown_length_switches_to_direct_once_large(
    direct_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hashing, "DIRECT_IO_MIN_BYTES", 2**20)
    path = direct_dir / "blob"
    writer = HashingFileWriter(path, direct_io=True)
    _write_in_pieces(writer, BODY)
    digest, _ = writer.close()
    assert digest == sha256_hex(BODY)
    assert path.read_bytes() == BODY
    assert 0 < writer.direct_bytes <= len(BODY) - 2**20


def test_small_or_disabled_stays_in_the_page_cache(direct_dir: Path) -> None:
    for kwargs in ({"expected_bytes": len(BODY), "direct_io": True},
                   {"expected_bytes": DIRECT_IO_MIN_BYTES, "direct_io": False}):
        path = direct_dir / "blob"
        writer = HashingFileWriter(path, **kwargs)  # type: ignore[arg-type]
        _write_in_pieces(writer, BODY)
        assert writer.close()[0] == sha256_hex(BODY)
        assert writer.direct_bytes == 0
        path.unlink()


def test_file_system_refusing_o_direct_at_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hashing, "_open_direct", lambda path: -1)
    path = tmp_path / "blob"
    writer = HashingFileWriter(path, expected_bytes=DIRECT_IO_MIN_BYTES, direct_io=True)
    _write_in_pieces(writer, BODY)
    assert writer.close() == (sha256_hex(BODY), len(BODY))
    assert path.read_bytes() == BODY
    assert writer.direct_bytes == 0


def test_file_system_refusing_direct_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Some file systems take O_DIRECT at open and fail the write with EINVAL.
    direct_fds: set[int] = set()
    real_open_direct = hashing._open_direct
    real_pwrite = os.pwrite

    def open_direct(path: Path) -> int:
        fd = real_open_direct(path)
        if fd < 0:
            fd = os.open(path, os.O_WRONLY)  # stands in where O_DIRECT is refused outright
        direct_fds.add(fd)
        return fd

    def pwrite(fd: int, data: object, offset: int) -> int:
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(hashing, "_open_direct", open_direct)
    monkeypatch.setattr(hashing.os, "pwrite", pwrite)
    path = tmp_path / "blob"
    writer = HashingFileWriter(path, expected_bytes=DIRECT_IO_MIN_BYTES, direct_io=True)
    _write_in_pieces(writer, BODY)
    assert writer.close() == (sha256_hex(BODY), len(BODY))
    assert path.read_bytes() == BODY
    assert direct_fds and writer.direct_bytes == 0


def test_write_error_is_raised_and_the_reader_never_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def pwrite(fd: int, data: object, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hashing.os, "pwrite", pwrite)
    writer = HashingFileWriter(tmp_path / "blob")
    with pytest.raises(Exception, match="(?i)space|disk"):
        _write_in_pieces(writer, BODY * 4)  # more batches than buffers
        writer.close()
    writer.abort()


def test_reading_straight_into_the_buffer(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    writer = HashingFileWriter(path)
    offset = 0
    while offset < len(BODY):
        space = writer.buffer()
        n = min(len(space), 5000, len(BODY) - offset)
        space[:n] = BODY[offset : offset + n]
        writer.commit(n)
        offset += n
    assert writer.close() == (sha256_hex(BODY), len(BODY))
    assert path.read_bytes() == BODY


@pytest.mark.parametrize("sent", [100, 4096, 5000, 3 << 20])
def test_a_file_announced_small_gets_a_buffer_of_its_size(tmp_path: Path, sent: int) -> None:
    body = make_body(sent)
    writer = HashingFileWriter(tmp_path / "f", expected_bytes=100, batch_bytes=1 << 20)
    first = writer.buffer()
    assert len(first) == ALIGN  # the 100 announced bytes and one more, page-rounded
    writer.write(body)  # a server may send more than it said: all of it is kept
    digest, size = writer.close(fsync=False)
    assert (digest, size) == (sha256_hex(body), sent)
    assert (tmp_path / "f").read_bytes() == body


def test_a_file_to_go_past_the_page_cache_keeps_its_aligned_buffer(direct_dir: Path) -> None:
    writer = HashingFileWriter(direct_dir / "f", expected_bytes=DIRECT_IO_MIN_BYTES,
                               direct_io=True)
    assert len(writer.buffer()) == hashing.BATCH_BYTES
    writer.abort()
