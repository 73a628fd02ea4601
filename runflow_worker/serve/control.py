"""What the serve daemon tells a running pipeline: stop now (and why), and where events go.

``ServeControl.stop_reason()`` is polled by the pipeline every ~50 ms, so it only reads
flags. The flags are set elsewhere: ``cancel``/``lease lost`` by ``LeaseKeeper`` (a
background thread that renews the run's lease and reads its cancel flag a few times a
second), ``shutdown`` by the daemon's signal handlers through ``ShutdownState``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from runflow_worker.errors import QueueError, RunReleased
from runflow_worker.run.failures import StopReason
from runflow_worker.serve.events import EventPublisher
from runflow_worker.serve.queue import Delivery, RunQueue
from runflow_worker.serve.shutdown import ShutdownState

log = logging.getLogger(__name__)

CANCEL_POLL_S = 0.25
"""How often a running run's cancel flag is read (cancellation lands within ~0.3 s)."""


class ServeControl:
    """The ``RunControl`` of one pickup in the serve daemon."""

    def __init__(self, shutdown: ShutdownState, publisher: EventPublisher) -> None:
        self.shutdown = shutdown
        self.publisher = publisher
        self.canceled = False
        self.lease_lost = False
        self.unbegun = False
        """The begin's reply said the run is not to run here (or could not be read): what
        the pipeline started before asking (an environment's start) stops."""
        self.admission: Callable[[], None] | None = None
        """What ``admit`` does the first time (the daemon's: read the begin's reply, keep
        the lease, bind the events); None: nothing to wait for."""
        self.admitted = False
        self._refusal: RunReleased | None = None

    def admit(self) -> None:
        """Return once the run is begun; ``RunReleased`` when it must not run here. The
        first call runs ``admission``; later ones repeat its outcome."""
        if self.admitted:
            return
        if self._refusal is not None:
            raise self._refusal
        if self.admission is not None:
            try:
                self.admission()
            except RunReleased as exc:
                self._refusal = exc
                self.unbegun = True
                raise
        self.admitted = True

    def stop_reason(self) -> StopReason | None:
        """Why the run must stop now, or None (flags only: called every ~50 ms).

        ``StopReason.RELEASE``: stop, and let the daemon release the run (a stop's grace
        ran out; on a lost lease the daemon writes nothing at all; a run not begun ends as
        its begin said).
        """
        if self.shutdown.hard or self.lease_lost or self.unbegun:
            return StopReason.RELEASE
        if self.canceled:
            return StopReason.CANCELED
        deadline = self.shutdown.deadline
        if deadline is not None and time.monotonic() >= deadline:
            return StopReason.RELEASE
        return None

    def emit(self, kind: str, data: dict[str, Any]) -> None:
        """Queue a ``progress`` or ``log`` event (sent by the publisher thread)."""
        self.publisher.publish(kind, data)


@dataclass(eq=False)
class _Watch:
    """One pickup whose lease is kept (each watch is a new object, compared by identity).
    Once made, only the keeper's thread changes it."""

    delivery: Delivery
    run_id: str
    token: int | Callable[[], int | None]
    """The pickup's fencing token, or what gives it once the begin's reply is read (None:
    the run was not begun, nothing to keep)."""
    control: ServeControl
    since_s: float
    """When the watch began (monotonic)."""
    due_s: float
    """When its next tick is due (monotonic)."""
    last_renew_s: float
    failing: bool = False
    """The last tick failed (logged once per streak)."""
    ended: bool = False
    """Its lease was lost: no more ticks."""


class LeaseKeeper:
    """Background thread that keeps the current run's lease and watches its cancel flag.

    Every ``CANCEL_POLL_S`` (or faster for short leases) one fenced script renews the lease
    when due (every quarter lease, so the entry's idle time never passes a third of it) and
    reports the cancel flag; the first tick comes one period after the pickup. A refused
    tick means another worker picked the run up: the control's ``lease_lost`` makes the
    pipeline stop, and nothing more is written.

    ``watch`` and ``unwatch`` only set the current pickup: between ticks the thread sleeps
    until the next tick is due, then looks at what it has to keep, so back-to-back runs
    shorter than a tick never wake it. Only a thread left idle (it found nothing to keep)
    is woken, by the next ``watch``.
    """

    def __init__(self, queue: RunQueue, *, lease_s: float, renew: bool = True) -> None:
        self.queue = queue
        self.renew = renew
        self.renew_every_s = lease_s / 4
        self.tick_s = min(CANCEL_POLL_S, self.renew_every_s)
        self.renewals = 0
        self._cond = threading.Condition()
        self._current: _Watch | None = None
        self._idle = False
        """The thread waits without a deadline (it found nothing to keep): wake it."""
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="runflow-lease", daemon=True)
        self._thread.start()

    def watch(self, delivery: Delivery, run_id: str, token: int | Callable[[], int | None],
              control: ServeControl) -> None:
        """Start keeping the lease of this pickup (its first tick one period from now).

        ``token`` may be a function giving it (the begin sent ahead, ``serve.beginahead``):
        the first tick calls it, so the lease is kept and the cancel flag read also while
        a run's first steps (a slow input download) run before the run asks for the reply.
        """
        now = time.monotonic()
        with self._cond:
            self._current = _Watch(delivery, run_id, token, control, since_s=now,
                                   due_s=now + self.tick_s, last_renew_s=now)
            if self._idle:
                self._cond.notify_all()

    def unwatch(self) -> None:
        """Stop keeping the current lease (the run is over): the thread begins no tick of it
        once this returns (one it had begun already ends as it would have)."""
        with self._cond:
            self._current = None

    def close(self) -> None:
        """Stop the thread."""
        with self._cond:
            self._closed = True
            self._current = None
            self._cond.notify_all()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._cond:
                watch = self._due_watch()
            if watch is None:
                return
            self._tick(watch)

    def _due_watch(self) -> _Watch | None:
        """Wait (holding the condition) until the current watch's tick is due; None once
        closed."""
        while not self._closed:
            watch = self._current
            if watch is None or watch.ended:
                self._idle = True
                self._cond.wait()
                self._idle = False
                continue
            wait_s = watch.due_s - time.monotonic()
            if wait_s <= 0:
                return watch
            self._cond.wait(wait_s)
        return None

    def _tick(self, watch: _Watch) -> None:
        """One fenced tick: renew the lease when due, read the cancel flag."""
        if not isinstance(watch.token, int):
            token = watch.token()  # the begin's reply (read here if the run has not yet)
            if token is None:
                watch.ended = True  # not begun: the run ends without its lease, at once
                watch.control.unbegun = True
                return
            watch.token = token
        now = time.monotonic()
        renew = self.renew and now - watch.last_renew_s >= self.renew_every_s - self.tick_s / 2
        try:
            tick = self.queue.lease_tick(watch.delivery, watch.run_id, watch.token, renew=renew)
        except QueueError as exc:
            if not watch.failing:
                log.warning("lease tick of run %s failed: %s", watch.run_id, exc,
                            extra={"run_id": watch.run_id, "event": "lease_tick_failed"})
            watch.failing = True
            watch.due_s = time.monotonic() + self.tick_s
            return
        watch.failing = False
        if renew:
            watch.last_renew_s = now
            self.renewals += 1
        if not tick.held:
            log.warning("run %s was taken over by another worker; stopping it",
                        watch.run_id, extra={"run_id": watch.run_id, "event": "lease_lost"})
            watch.control.lease_lost = True
            watch.ended = True
            return
        if tick.canceled and not watch.control.canceled:
            log.info("run %s canceled", watch.run_id, extra={"run_id": watch.run_id,
                                                             "event": "cancel_seen"})
            watch.control.canceled = True
        watch.due_s = time.monotonic() + self.tick_s
