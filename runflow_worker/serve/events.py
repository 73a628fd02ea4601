"""A run's progress and log events, written to Redis in batches, fenced, in order.

The pipeline's events are buffered (``EventPublisher.publish`` never blocks it). A
background thread writes them in batches: a batch leaves once its oldest event has waited
``batch_delay_s`` (or it is full). Whatever is still buffered when the run ends is handed
to the run's last write (``EventPublisher.finish``), whose script appends it just before
the run's status event (``serve.recordstore``): a warm run shorter than the delay costs no
round trip for its events, and the terminal status event is always the run's last.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from runflow_worker.serve.recordstore import Event, RecordStore, event_json

log = logging.getLogger(__name__)

BATCH_DELAY_S = 0.05
"""How long the first event of a batch waits for others before the batch is written: bounds
how late a progress event shows (and the writes to 20 a second while events keep coming)."""


@dataclass(frozen=True)
class _Binding:
    run_id: str
    attempt: int
    token: int


@dataclass(frozen=True)
class _Buffered:
    binding: _Binding
    event: Event
    at_s: float
    """When it was published (monotonic)."""


class EventPublisher:
    """Buffers a run's progress and log events and writes them in order, in batches.

    ``publish`` never blocks the pipeline (a full buffer drops the oldest event). The
    background thread writes a batch once its oldest event is ``batch_delay_s`` old or
    ``max_batch`` events wait; ``finish`` (the run ended) waits only for a batch already on
    its way and returns the rest, for the run's last write to carry. While Redis is
    unreachable the thread's batches are dropped: events are informative, the record is not.
    """

    max_buffered = 10_000
    """Events kept while Redis is slow; beyond this the oldest are dropped."""
    max_batch = 200
    """Events per script call."""

    def __init__(self, store: RecordStore, *, batch_delay_s: float = BATCH_DELAY_S) -> None:
        self.store = store
        self.batch_delay_s = batch_delay_s
        self.dropped = 0
        self._binding: _Binding | None = None
        self._buffer: deque[_Buffered] = deque()
        self._sending: _Binding | None = None
        """The pickup whose batch is being written (None: no write in flight)."""
        self._flushing = 0
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
            self._buffer.append(_Buffered(self._binding, (kind, "", event_json(data)),
                                          time.monotonic()))
            # The thread needs waking only to start timing a batch, or to send a full one;
            # otherwise it is already waiting for the oldest event's due time.
            if len(self._buffer) == 1 or len(self._buffer) >= self.max_batch:
                self._cond.notify_all()

    def finish(self, timeout_s: float) -> list[Event]:
        """End the bound pickup: its events not written yet, oldest first, for its last write.

        Unbinds, then waits (at most ``timeout_s``) only while a batch of this pickup is
        being written, or more than a batch is left (the thread is writing it), so the
        events returned come after everything written; never waits for a batch's delay.
        """
        with self._cond:
            binding, self._binding = self._binding, None
            if binding is None:
                return []
            self._cond.wait_for(lambda: self._sending != binding and sum(
                1 for b in self._buffer if b.binding == binding) <= self.max_batch,
                timeout=timeout_s)
            rest = [b.event for b in self._buffer if b.binding == binding]
            if rest:
                self._buffer = deque(b for b in self._buffer if b.binding != binding)
            return rest

    def flush(self, timeout_s: float) -> bool:
        """Write every buffered event now and wait until they are written (or dropped);
        False on timeout."""
        with self._cond:
            self._flushing += 1
            self._cond.notify_all()
            try:
                return self._cond.wait_for(
                    lambda: not self._buffer and self._sending is None, timeout=timeout_s)
            finally:
                self._flushing -= 1

    def close(self, timeout_s: float = 2.0) -> None:
        """Flush, then stop the thread."""
        self.flush(timeout_s)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=timeout_s)

    def _next_batch(self) -> tuple[_Binding, list[Event]] | None:
        """Wait (holding the condition) until a batch is due; take it. None: closed."""
        while True:
            if not self._buffer:
                if self._closed:
                    return None
                self._cond.wait()
                continue
            wait_s = self._buffer[0].at_s + self.batch_delay_s - time.monotonic()
            if (wait_s <= 0 or self._closed or self._flushing
                    or len(self._buffer) >= self.max_batch):
                break
            self._cond.wait(wait_s)
        first = self._buffer[0].binding
        batch: list[Event] = []
        while self._buffer and self._buffer[0].binding == first and len(batch) < self.max_batch:
            batch.append(self._buffer.popleft().event)
        self._sending = first
        return first, batch

    def _run(self) -> None:
        while True:
            with self._cond:
                taken = self._next_batch()
            if taken is None:
                return
            first, batch = taken
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
                    self._sending = None
                    self._cond.notify_all()
