"""Write a stream of pieces to a file while computing its sha256, in one pass.

``HashingFileWriter`` gathers what the reader hands it (or reads straight into, with
``buffer`` / ``commit``) in 1 MiB batches, which go through two threads in turn: one hashes
each batch, the next writes it. ``hashlib`` and ``os.pwrite`` release the GIL, so hashing and
disk writes overlap with the reader's socket reads and with each other instead of adding to
them; a few reused buffers bound the memory (8 MiB a file). The threads start with the
first full batch: a file that fits in one (an input image) is hashed and written at
``close`` by the caller, without them.

Large files (``DIRECT_IO_MIN_BYTES`` and up, when the caller allows it) are written with
``O_DIRECT``: from the aligned batch buffers straight to the disk, past the page cache. Copying
a multi-GiB model into the page cache costs CPU the download needs for TLS and hashing, and
leaves gigabytes of dirty pages for the final fsync; the model's first load reads it back
from disk instead, which a local SSD does faster than the network delivered it. A file
system that refuses ``O_DIRECT`` (tmpfs, some network file systems) gets ordinary writes.
"""
from __future__ import annotations

import errno
import hashlib
import mmap
import os
import queue
import threading
from pathlib import Path
from typing import BinaryIO

from runflow_worker.cache.errors import CacheError, from_os_error

# 1 MiB batches in 8 buffers measured fastest (bench/bench_fetch.py): a batch much larger
# than the CPU cache has left it by the time it is hashed or copied into the page cache,
# and fewer buffers let a slow disk write hold up the reader.
BATCH_BYTES = 1 << 20
_Batch = tuple[mmap.mmap | bytearray, int]
"""A buffer and how many of its bytes are the batch."""
SMALL_BYTES = 256 << 10
"""A file announced shorter than this gets a first buffer of its size (``_free_buffer``)."""
BUFFERS = 8
WRITEBACK_BYTES = 32 << 20
DIRECT_IO_MIN_BYTES = 64 << 20
# O_DIRECT needs file offsets, lengths and buffer addresses aligned to the device's logical
# block size; 4096 covers 512-byte and 4 KiB devices, and mmap buffers are page-aligned.
ALIGN = 4096
_READ_BYTES = 4 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file at ``path``."""
    with path.open("rb", buffering=0) as f:
        return sha256_of(f)


def sha256_of(f: BinaryIO) -> str:
    """Hex sha256 of what is left to read in the open file ``f``."""
    digest = hashlib.sha256()
    while chunk := f.read(_READ_BYTES):
        digest.update(chunk)
    return digest.hexdigest()


def _open_direct(path: Path) -> int:
    """A second, ``O_DIRECT`` descriptor on ``path``, or -1 where the file system refuses."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return -1
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError:
        return -1


class HashingFileWriter:
    """Append pieces to ``path`` from offset ``start_offset``, hashing the whole file.

    The first ``start_offset`` bytes already in the file are kept (a resumed download) and
    hashed first; anything after them is cut off. Use ``write`` for each piece, then ``close``
    (returns the hex digest and the size) or ``abort``. Not thread-safe: one reader thread.

    ``direct_io``: write with ``O_DIRECT`` where the file system supports it, from the start
    when ``expected_bytes`` (the bytes still to come, if known) is at least
    ``DIRECT_IO_MIN_BYTES``, else once the file has grown past that size.
    """

    def __init__(
        self,
        path: Path,
        *,
        start_offset: int = 0,
        batch_bytes: int = BATCH_BYTES,
        expected_bytes: int | None = None,
        direct_io: bool = False,
    ) -> None:
        if batch_bytes % ALIGN:
            raise ValueError(f"batch_bytes must be a multiple of {ALIGN}")
        self.path = path
        self.size = start_offset
        self._start_offset = start_offset
        self._writeback_from = start_offset
        self._batch_bytes = batch_bytes
        self._digest = hashlib.sha256()
        self._error: CacheError | None = None
        # Batches travel in a few reused buffers: one hash call and one write per batch keep
        # the writer thread's turns on the GIL rare, and reuse avoids a page fault per 4 KiB
        # that fresh multi-MiB buffers would cost. mmap memory is page-aligned, as O_DIRECT
        # requires. Made as they are first needed (up to ``BUFFERS``): a file of one batch
        # (an input image) makes one.
        self._free: queue.SimpleQueue[mmap.mmap | bytearray] = queue.SimpleQueue()
        self._buffers_made = 0
        self._full: queue.SimpleQueue[_Batch | bytes | None] = queue.SimpleQueue()
        self._buffer: mmap.mmap | bytearray | None = None
        self._view = memoryview(b"")
        self._used = 0
        self._capacity = batch_bytes
        self._pos = start_offset  # file offset of the next write (writer thread)
        self.direct_bytes = 0
        """Bytes written past the page cache (complete once ``close`` returns)."""
        self._fd = -1
        self._direct_fd = -1
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            if os.fstat(self._fd).st_size != start_offset:
                # Only when needed: on ext4, truncating a file and writing it anew makes
                # close() start writeback of everything (the auto_da_alloc heuristic).
                os.ftruncate(self._fd, start_offset)
        except OSError as exc:
            self._close_fds()
            raise from_os_error(exc, f"writing {path.name}") from exc
        # Direct from the first byte when the length says the file is large; otherwise
        # (unknown length) from the first aligned batch past DIRECT_IO_MIN_BYTES.
        self._direct_io = direct_io  # read by the reader thread: batches must be aligned
        self._direct_from = DIRECT_IO_MIN_BYTES if direct_io else None
        if direct_io and expected_bytes is not None and expected_bytes >= DIRECT_IO_MIN_BYTES:
            self._direct_from = 0
        self._small_bytes = 0
        """Size of a small first buffer (``_free_buffer``), 0: a batch's."""
        if (expected_bytes is not None and start_offset == 0
                and expected_bytes < min(SMALL_BYTES, batch_bytes)
                and (self._direct_from is None or self._direct_from > expected_bytes)):
            self._small_bytes = -(-(expected_bytes + 1) // ALIGN) * ALIGN
        self._hashed: queue.SimpleQueue[_Batch | bytes | None] = (
            queue.SimpleQueue())
        # The threads start with the first batch that leaves before ``close``: a file of one
        # batch or less (an input image) is hashed and written by the caller at ``close``,
        # which costs less than starting two threads and passing the batch between them.
        self._hasher: threading.Thread | None = None
        self._writer: threading.Thread | None = None

    def write(self, data: bytes) -> None:
        """Queue ``data`` for hashing and writing; raise if the writer thread has failed."""
        if self._error is not None:
            raise self._error
        if len(data) >= self._batch_bytes and not self._direct_io:
            self._flush_buffer()
            self._start_threads()
            self.size += len(data)
            self._full.put(data)  # large enough to go as it is
            return
        view = memoryview(data)
        while view:
            target = self.buffer()
            n = min(len(view), len(target))
            target[:n] = view[:n]
            self.commit(n)
            view = view[n:]

    def buffer(self) -> memoryview:
        """Free space in the current batch, to be filled in place and then ``commit``-ted
        (saves a copy when the bytes can be read straight into it)."""
        if self._error is not None:
            raise self._error
        if self._buffer is None:
            self._buffer = self._free_buffer()
            # A batch ends on an aligned file offset, so that the next one can go to disk
            # directly even after a resume from an odd offset (or where a small buffer ends).
            self._capacity = min(self._batch_bytes - self.size % ALIGN, len(self._buffer))
            self._view = memoryview(self._buffer)
        return self._view[self._used : self._capacity]

    def commit(self, n: int) -> None:
        """Take the first ``n`` bytes of the last ``buffer()`` as the file's next bytes."""
        self._used += n
        self.size += n
        if self._used == self._capacity:
            self._flush_buffer()

    def close(self, *, fsync: bool = True) -> tuple[str, int]:
        """Write everything, optionally fsync, close; return ``(hex sha256, size in bytes)``."""
        try:
            self._finish()
            if self._error is not None:
                raise self._error
            if fsync:
                try:
                    os.fsync(self._fd)
                except OSError as exc:
                    raise from_os_error(exc, f"writing {self.path.name}") from exc
            return self._digest.hexdigest(), self.size
        finally:
            self._close_fds()

    def abort(self) -> None:
        """Write what was received (so a later resume can use it), close, never raise."""
        self._finish()
        self._close_fds()

    def _flush_buffer(self) -> None:
        if self._buffer is not None:
            self._start_threads()
            self._full.put((self._buffer, self._used))
            self._buffer = None
            self._used = 0

    def _free_buffer(self) -> mmap.mmap | bytearray:
        """A buffer for the next batch: a free one, a new one while fewer than ``BUFFERS``
        exist, else the next one the writer frees (waits while all are in flight).

        The first of a file announced small (``SMALL_BYTES``) that is not to be written
        past the page cache is a ``bytearray`` just large enough (the announced length and
        one byte more, which tells a longer body): a map of a whole batch is two system
        calls and, unmapped in a process with threads, a TLB shootdown of every CPU."""
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        if self._buffers_made < BUFFERS:
            self._buffers_made += 1
            if self._buffers_made == 1 and self._small_bytes:
                return bytearray(self._small_bytes)
            return mmap.mmap(-1, self._batch_bytes)
        return self._free.get()

    def _start_threads(self) -> None:
        if self._hasher is None:
            self._hasher = threading.Thread(target=self._hash_loop, name="hasher", daemon=True)
            self._writer = threading.Thread(target=self._write_loop, name="writer",
                                            daemon=True)
            self._hasher.start()
            self._writer.start()

    def _finish(self) -> None:
        """Hash and write everything still held, then stop the threads."""
        if self._hasher is None or self._writer is None:
            self._finish_inline()
            return
        self._flush_buffer()
        if self._hasher.is_alive():
            self._full.put(None)
        self._hasher.join()
        self._writer.join()

    def _finish_inline(self) -> None:
        # What the two threads would do with the only batch, in the caller's thread.
        try:
            self._hash_prefix()
            if self._buffer is not None:
                data = memoryview(self._buffer)[: self._used]
                self._digest.update(data)
                self._write_at_end(data)
        except OSError as exc:
            self._fail(exc)
        if self._buffer is not None:
            self._free.put(self._buffer)
            self._buffer = None
            self._used = 0

    def _close_fds(self) -> None:
        for fd in (self._direct_fd, self._fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._direct_fd = -1

    # Two stages, each on its own thread: hashing is CPU work, a direct write is mostly a
    # wait for the disk, and one thread doing both in turn would leave the other idle.
    def _hash_loop(self) -> None:
        try:
            self._hash_prefix()
        except OSError as exc:
            self._fail(exc)
        while (item := self._full.get()) is not None:
            if self._error is None:  # after an error, keep draining so the reader never waits
                self._digest.update(_view_of(item))
            self._hashed.put(item)
        self._hashed.put(None)

    def _write_loop(self) -> None:
        while (item := self._hashed.get()) is not None:
            if self._error is None:
                try:
                    self._write_at_end(_view_of(item))
                    self._start_writeback()
                except OSError as exc:
                    self._fail(exc)
            if isinstance(item, tuple):
                self._free.put(item[0])

    def _fail(self, exc: OSError) -> None:
        if self._error is None:
            self._error = from_os_error(exc, f"writing {self.path.name}")

    def _write_at_end(self, data: memoryview) -> None:
        if self._direct_from is not None and self._pos >= self._direct_from:
            self._direct_from = None  # one attempt
            self._direct_fd = _open_direct(self.path)
        while data:
            # Direct writes take whole aligned blocks at aligned offsets: a last batch's
            # unaligned end goes through the page cache.
            aligned = len(data) - len(data) % ALIGN
            direct = self._direct_fd >= 0 and self._pos % ALIGN == 0 and aligned > 0
            try:
                if direct:
                    written = os.pwrite(self._direct_fd, data[:aligned], self._pos)
                else:
                    written = os.pwrite(self._fd, data, self._pos)
            except OSError as exc:
                if not (direct and exc.errno == errno.EINVAL):
                    raise
                # Some file systems accept O_DIRECT at open and refuse the write: go on
                # through the page cache.
                os.close(self._direct_fd)
                self._direct_fd = -1
                continue
            data = data[written:]
            self._pos += written
            if direct:
                self.direct_bytes += written

    def _start_writeback(self) -> None:
        # Every WRITEBACK_BYTES of buffered writes, ask the kernel to start writing the new
        # range to disk now. Otherwise all of it is written by the final fsync, after the
        # download, instead of during it. POSIX_FADV_DONTNEED starts that writeback without
        # waiting, and leaves the dirty pages cached (it only drops pages that are clean).
        if self._direct_fd >= 0:
            self._writeback_from = self._pos  # nothing dirty: direct writes skip the cache
            return
        end = self._pos
        if end - self._writeback_from < WRITEBACK_BYTES or not hasattr(os, "posix_fadvise"):
            return
        os.posix_fadvise(self._fd, self._writeback_from, end - self._writeback_from,
                         os.POSIX_FADV_DONTNEED)
        self._writeback_from = end

    def _hash_prefix(self) -> None:
        remaining = self._start_offset
        offset = 0
        while remaining > 0:
            chunk = os.pread(self._fd, min(_READ_BYTES, remaining), offset)
            if not chunk:
                raise OSError(errno.EIO, "file shorter than its resume offset")
            self._digest.update(chunk)
            offset += len(chunk)
            remaining -= len(chunk)


def _view_of(item: _Batch | bytes) -> memoryview:
    """The bytes of a queued batch: the used part of a buffer, or a piece queued as it is."""
    if isinstance(item, tuple):
        buffer, used = item
        return memoryview(buffer)[:used]
    return memoryview(item)
