"""Stop requests from signals: ``ShutdownState`` (warm, then cold).

A module of its own, importing nothing of the daemon: ``serve`` installs its signal handlers
before anything slow (the ComfyUI child's spawn, then Redis, the daemon's imports), so a
SIGTERM while the worker starts is a stop request, not a kill.
"""

from __future__ import annotations

import signal
import time
from typing import Any

STOP_POLL_S = 0.05
"""Granularity of backoff sleeps that a stop request cuts short (error paths only)."""


class ShutdownState:
    """Stop requests from signals: warm (finish within the grace period) or cold (now)."""

    def __init__(self) -> None:
        self.requested = False
        """No new run may start."""
        self.hard = False
        """Cold stop: interrupt the current run now and release it."""
        self.deadline: float | None = None
        """Monotonic time after which the current run is interrupted and released."""

    # Only plain attribute writes here: these run inside signal handlers, where taking a
    # lock (threading.Event.set does) can deadlock against the interrupted main thread.

    def request_warm(self, grace_s: float) -> None:
        """Take no new run; give the current one ``grace_s`` to finish."""
        if not self.requested:
            self.deadline = time.monotonic() + grace_s
            self.requested = True

    def request_cold(self) -> None:
        """Stop at once."""
        self.deadline = time.monotonic()
        self.hard = True
        self.requested = True

    def sleep(self, seconds: float, *, until_cold: bool = False) -> None:
        """Sleep up to ``seconds``, cut short by any stop request (or only a cold one)."""
        end = time.monotonic() + seconds
        while (remaining := end - time.monotonic()) > 0:
            if self.hard or (self.requested and not until_cold):
                return
            time.sleep(min(remaining, STOP_POLL_S))

    def install_signal_handlers(self, grace_s: float) -> dict[int, Any]:
        """SIGTERM: warm stop, then cold on a second one; SIGINT: cold. Returns the previous
        handlers. Main thread only (Python delivers signals there)."""

        def on_sigterm(signum: int, frame: object) -> None:
            # Flags only: no logging or I/O inside a signal handler.
            if self.requested:
                self.request_cold()
            else:
                self.request_warm(grace_s)

        return {signal.SIGTERM: signal.signal(signal.SIGTERM, on_sigterm),
                signal.SIGINT: signal.signal(signal.SIGINT, lambda s, f: self.request_cold())}

    def grace_left_s(self) -> float:
        """Seconds of grace left (0 after a cold stop, infinity when no stop was asked)."""
        if self.hard:
            return 0.0
        if self.deadline is None:
            return float("inf")
        return max(0.0, self.deadline - time.monotonic())
