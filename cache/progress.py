"""Helpers of the download loops: rate-limited progress and cancel checks, resume after cuts.

A transfer moves thousands of pieces a second; calling a progress callback (which may publish
an event) or a cancel check (which may ask Redis) for each would cost more than the transfer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from cache.errors import FetchCanceled, FetchInterrupted

T = TypeVar("T")

Progress = Callable[[int, int | None], None]
Cancel = Callable[[], bool]

PROGRESS_INTERVAL_S = 0.1
CANCEL_INTERVAL_S = 0.1


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
