"""The run control a driver gives the pipeline (``run.pipeline.RunControl``), for tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from runflow_worker.run.failures import StopReason


class RecordingControl:
    """Records every event the pipeline emits and stops the run when told.

    ``cancel`` (an event) asks the run to stop for ``reason`` (canceled unless a test sets
    another); ``cancel_when`` (a predicate over an event's data) sets it from the emitting
    thread, noting the moment in ``canceled_at``. ``events`` holds ``(kind, data)`` pairs.
    """

    def __init__(self, cancel_when: Callable[[dict[str, Any]], bool] | None = None) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.cancel = threading.Event()
        self.reason = StopReason.CANCELED
        self.cancel_when = cancel_when
        self.canceled_at: float | None = None

    def stop_reason(self) -> StopReason | None:
        """``reason`` once ``cancel`` is set, else None."""
        return self.reason if self.cancel.is_set() else None

    def admit(self) -> None:
        """Nothing to wait for (no queue)."""

    def emit(self, kind: str, data: dict[str, Any]) -> None:
        """Record the event; set ``cancel`` if ``cancel_when`` holds for its data."""
        self.events.append((kind, data))
        if self.cancel_when is not None and not self.cancel.is_set() and self.cancel_when(data):
            self.canceled_at = time.monotonic()
            self.cancel.set()
