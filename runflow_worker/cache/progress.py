"""Helpers of the download loops: rate-limited progress and cancel checks, resume after cuts.

Resuming: ``continues_at`` judges a partial answer (HTTP 206, an S3 ranged GET) by its
``Content-Range``; ``finish_from_file`` completes a download whose file already holds every
byte (a worker killed between the last byte and publishing).

A transfer moves thousands of pieces a second; calling a progress callback (which may publish
an event) or a cancel check (which may ask Redis) for each would cost more than the transfer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol, TypeVar

import filelock

from runflow_worker.cache.errors import FetchCanceled, FetchInterrupted
from runflow_worker.cache.hashing import sha256_file

T = TypeVar("T")

Progress = Callable[[int, int | None], None]
Cancel = Callable[[], bool]

PROGRESS_INTERVAL_S = 0.1
CANCEL_INTERVAL_S = 0.1
LOCK_POLL_S = 0.2


class Lock(Protocol):
    """What the waits here need of a lock (``filelock.FileLock`` fits)."""

    def acquire(self, timeout: float = ...) -> object:
        """Take the lock or raise ``filelock.Timeout`` after ``timeout`` seconds."""
        ...

    def release(self) -> None:
        """Give the lock back."""
        ...


class ProgressThrottle:
    """Call ``progress(done, total)`` at most every ``interval_s``, and always when ``final``."""

    def __init__(self, progress: Progress | None, interval_s: float = PROGRESS_INTERVAL_S) -> None:
        self._progress = progress
        self._interval_s = interval_s
        self._last = float("-inf")

    def __call__(self, done: int, total: int | None, *, final: bool = False) -> None:
        """Report ``done`` of ``total`` bytes if enough time has passed (or ``final``)."""
        if self._progress is None:
            return
        now = time.monotonic()
        if final or now - self._last >= self._interval_s:
            self._last = now
            self._progress(done, total)


class CancelCheck:
    """Ask ``cancel()`` at most every ``interval_s``; ``raise_if_canceled`` raises FetchCanceled."""

    def __init__(self, cancel: Cancel | None, interval_s: float = CANCEL_INTERVAL_S) -> None:
        self._cancel = cancel
        self._interval_s = interval_s
        self._last = float("-inf")
        self.canceled = False

    def raise_if_canceled(self) -> None:
        """Raise ``FetchCanceled`` if cancel said so (now or at an earlier check)."""
        if self._cancel is None:
            return
        now = time.monotonic()
        if not self.canceled and now - self._last >= self._interval_s:
            self._last = now
            self.canceled = bool(self._cancel())
        if self.canceled:
            raise FetchCanceled("transfer canceled")


def acquire_or_cancel(lock: Lock, cancel: Cancel | None,
                      canceled: Callable[[], BaseException]) -> None:
    """Take ``lock``; while waiting, ask ``cancel()`` every ``LOCK_POLL_S`` and raise
    ``canceled()`` when it says so. The wait may last another worker's whole download or
    build: a blocking acquire would leave the run deaf to its cancel and timeout."""
    while True:
        try:
            lock.acquire(timeout=LOCK_POLL_S)
            return
        except filelock.Timeout:
            if cancel is not None and cancel():
                raise canceled() from None


@contextmanager
def held_or_cancel(lock: Lock, cancel: Cancel | None,
                   canceled: Callable[[], BaseException]) -> Iterator[None]:
    """Hold ``lock`` for the block, taken by ``acquire_or_cancel``."""
    acquire_or_cancel(lock, cancel, canceled)
    try:
        yield
    finally:
        lock.release()


def resume_after_cuts(transfer: Callable[[int], T], dest: Path, *, start_offset: int,
                      attempts: int) -> T:
    """Call ``transfer(offset)`` until it completes, resuming after cuts.

    A ``FetchInterrupted`` (connection dropped mid-body) is answered with another call from
    the bytes ``dest`` already holds, up to ``attempts`` times; then it is raised.
    """
    offset = start_offset
    while True:
        try:
            return transfer(offset)
        except FetchInterrupted:
            if attempts <= 0:
                raise
            attempts -= 1
            offset = dest.stat().st_size if dest.exists() else 0


def _content_range(value: str | None) -> tuple[int | None, int | None, int | None] | None:
    """``(first, last, total)`` of ``bytes first-last/total`` (``bytes */total``: no range;
    ``/*``: no total), or None when ``value`` is not such a header."""
    if not value or not value.startswith("bytes "):
        return None
    span, _, total_text = value[len("bytes "):].strip().partition("/")
    total = int(total_text) if total_text.isdigit() else None
    if total is None and total_text != "*":
        return None
    if span == "*":
        return None, None, total
    first, _, last = span.partition("-")
    if not (first.isdigit() and last.isdigit()) or int(last) < int(first):
        return None
    return int(first), int(last), total


def continues_at(content_range: str | None, offset: int, length: int | None, *,
                 total: int | None = None) -> bool:
    """Whether a partial answer continues a file at ``offset`` to its end.

    ``bytes offset-last/size``, with ``last`` the file's last byte when the size is known,
    and a body of ``last - offset + 1`` bytes when its length is known: a range that starts
    elsewhere, stops short of the end, or disagrees with the body is no continuation. With
    ``total`` (the size the download started with), a file of another size is none either.
    """
    parsed = _content_range(content_range)
    if parsed is None or parsed[0] != offset:
        return False
    _, last, size = parsed
    assert last is not None
    if size is not None and last != size - 1:
        return False
    if total is not None and (size if size is not None else last + 1) != total:
        return False
    return length is None or length == last - offset + 1


def unsatisfied_total(content_range: str | None) -> int | None:
    """The file's size from a refusal's ``Content-Range: bytes */total``, else None."""
    parsed = _content_range(content_range)
    return parsed[2] if parsed is not None and parsed[0] is None else None


def finish_from_file(dest: Path) -> tuple[str, int]:
    """``(hex sha256, size)`` of a download whose file already holds every byte."""
    return sha256_file(dest), dest.stat().st_size
