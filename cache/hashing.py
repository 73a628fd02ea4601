"""Write a stream of pieces to a file while computing its sha256, in one pass.

``HashingFileWriter`` copies the pieces the reader hands it into 1 MiB batches and passes
them to a background thread that hashes and writes each batch. ``hashlib`` and ``os.write``
release the GIL, so hashing and disk writes overlap with the reader's socket reads instead of
adding to them; a few reused buffers bound the memory.
"""

from __future__ import annotations

import errno
import hashlib
import os
import queue
import threading
from pathlib import Path

from cache.errors import CacheError, from_os_error

# 1 MiB batches measured fastest: a batch much larger than the CPU cache has left it by the
# time the writer thread copies it into the page cache, which roughly doubles that copy.
BATCH_BYTES = 1 << 20
BUFFERS = 4
WRITEBACK_BYTES = 32 << 20
_READ_BYTES = 4 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file at ``path``."""
    digest = hashlib.sha256()
    with path.open("rb", buffering=0) as f:
        while chunk := f.read(_READ_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class HashingFileWriter:
    """Append pieces to ``path`` from offset ``start_offset``, hashing the whole file.

    The first ``start_offset`` bytes already in the file are kept (a resumed download) and
    hashed first; anything after them is cut off. Use ``write`` for each piece, then ``close``
    (returns the hex digest and the size) or ``abort``. Not thread-safe: one reader thread.
    """

    def __init__(
        self, path: Path, *, start_offset: int = 0, batch_bytes: int = BATCH_BYTES
    ) -> None:
        self.path = path
        self.size = start_offset
        self._start_offset = start_offset
        self._writeback_from = start_offset
        self._batch_bytes = batch_bytes
        self._digest = hashlib.sha256()
        self._error: CacheError | None = None
        # Batches travel in a few reused buffers: one hash call and one write per batch keep
        # the writer thread's turns on the GIL rare, and reuse avoids a page fault per 4 KiB
        # that fresh multi-MiB buffers would cost.
        self._free: queue.Queue[bytearray] = queue.Queue()
        self._full: queue.Queue[tuple[bytearray, int] | bytes | None] = queue.Queue()
        for _ in range(BUFFERS):
            self._free.put(bytearray(batch_bytes))
        self._buffer: bytearray | None = None
        self._used = 0
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            if os.fstat(self._fd).st_size != start_offset:
                # Only when needed: on ext4, truncating a file and writing it anew makes
                # close() start writeback of everything (the auto_da_alloc heuristic).
                os.ftruncate(self._fd, start_offset)
            os.lseek(self._fd, start_offset, os.SEEK_SET)
        except OSError as exc:
            raise from_os_error(exc, f"writing {path.name}") from exc
        self._thread = threading.Thread(target=self._run, name="hash-writer", daemon=True)
        self._thread.start()

    def write(self, data: bytes) -> None:
        """Queue ``data`` for hashing and writing; raise if the writer thread has failed."""
        if self._error is not None:
            raise self._error
        size = len(data)
        self.size += size
        if size >= self._batch_bytes:
            self._flush_buffer()
            self._full.put(data)  # large enough to go as it is
            return
        if self._buffer is not None and self._used + size > self._batch_bytes:
            self._flush_buffer()
        if self._buffer is None:
            self._buffer = self._free.get()  # waits while every buffer is in flight
        self._buffer[self._used : self._used + size] = data
        self._used += size

    def close(self, *, fsync: bool = True) -> tuple[str, int]:
        """Write everything, optionally fsync, close; return ``(hex sha256, size in bytes)``."""
        try:
            self._flush_buffer()
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
            self._close_fd()

    def abort(self) -> None:
        """Write what was received (so a later resume can use it), close, never raise."""
        self._flush_buffer()
        self._finish()
        self._close_fd()

    def _flush_buffer(self) -> None:
        if self._buffer is not None:
            self._full.put((self._buffer, self._used))
            self._buffer = None
            self._used = 0

    def _finish(self) -> None:
        if self._thread.is_alive():
            self._full.put(None)
            self._thread.join()

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _run(self) -> None:
        try:
            self._hash_prefix()
        except OSError as exc:
            self._error = from_os_error(exc, f"writing {self.path.name}")
        while (item := self._full.get()) is not None:
            if isinstance(item, tuple):
                buffer, used = item
                data = memoryview(buffer)[:used]
            else:
                buffer, data = None, memoryview(item)
            if self._error is None:  # after an error, keep draining so the reader never waits
                try:
                    self._digest.update(data)
                    while data:
                        data = data[os.write(self._fd, data) :]
                    self._start_writeback()
                except OSError as exc:
                    self._error = from_os_error(exc, f"writing {self.path.name}")
            if buffer is not None:
                self._free.put(buffer)

    def _start_writeback(self) -> None:
        # Every WRITEBACK_BYTES, ask the kernel to start writing the new range to disk now.
        # Otherwise all of it is written by the final fsync, after the download, instead of
        # during it. POSIX_FADV_DONTNEED starts that writeback without waiting, and leaves
        # the dirty pages cached (it only drops pages that are already clean).
        end = os.lseek(self._fd, 0, os.SEEK_CUR)
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
