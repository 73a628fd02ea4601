"""A run's progress and log events, sent to Redis from a background thread (fenced, batched).

The terminal ``status`` event is not sent here: it is written with the record
(``serve.recordstore``); ``EventPublisher.flush`` before that write keeps it last.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

from runflow_worker.serve.recordstore import RecordStore, event_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Binding:
    run_id: str
    attempt: int
    token: int


class EventPublisher:
    """Sends a run's progress and log events from a background thread, in order, batched.

    ``publish`` never blocks the pipeline (a full buffer drops the oldest progress event);
    ``flush`` waits for what is buffered, so the terminal status event always comes last.
    While Redis is unreachable events are dropped: they are informative, the record is not.
    """

    max_buffered = 10_000
    """Events kept while Redis is slow; beyond this the oldest are dropped."""
    max_batch = 200
    """Events per script call."""

    def __init__(self, store: RecordStore) -> None:
        self.store = store
        self.dropped = 0
        self._binding: _Binding | None = None
        self._buffer: deque[tuple[_Binding, str, str]] = deque()
        self._in_flight = False
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="runflow-events", daemon=True)
        self._thread.start()

    def bind(self, run_id: str, attempt: int, token: int) -> None:
        """Events published from now on belong to this pickup of ``run_id``."""
        with self._cond:
            self._binding = _Binding(run_id, attempt, token)

    def unbind(self) -> None:
        """Drop events published until the next ``bind``."""
        with self._cond:
            self._binding = None

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        """Queue one ``progress`` or ``log`` event of the bound run."""
        with self._cond:
            if self._binding is None or self._closed:
                return
            if len(self._buffer) >= self.max_buffered:
                self._buffer.popleft()
                self.dropped += 1
            self._buffer.append((self._binding, kind, event_json(data)))
            self._cond.notify_all()

    def flush(self, timeout_s: float) -> bool:
        """Wait until every queued event is sent (or dropped); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._buffer and not self._in_flight,
                                       timeout=timeout_s)

    def close(self, timeout_s: float = 2.0) -> None:
        """Flush, then stop the thread."""
        self.flush(timeout_s)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=timeout_s)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._buffer or self._closed)
                if not self._buffer:
                    return
                first = self._buffer[0][0]
                batch: list[tuple[str, str, str]] = []
                while self._buffer and self._buffer[0][0] == first and len(batch) < self.max_batch:
                    _, kind, data = self._buffer.popleft()
                    batch.append((kind, "", data))
                self._in_flight = True
            try:
                if not self.store.publish(first.run_id, first.attempt, first.token, batch):
                    log.info("events of run %s refused: a newer pickup holds it", first.run_id,
                             extra={"run_id": first.run_id, "event": "events_fenced"})
            except Exception as exc:  # noqa: BLE001 - the thread must outlive any failure
                self.dropped += len(batch)
                log.warning("dropped %d events of run %s: %s", len(batch), first.run_id, exc,
                            extra={"run_id": first.run_id, "event": "events_dropped"})
            finally:
                with self._cond:
                    self._in_flight = False
                    self._cond.notify_all()
