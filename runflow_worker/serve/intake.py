"""What the serve loop takes next: the entry the last terminal write read ahead, an expired
entry when a reclaim is due, or a new one.

Reclaims come first when due (every half lease, capped at 30 s), then the read of a new
entry, which blocks at most ``MAX_BLOCK_S`` (a stop request is seen that soon) and wakes at
once for a new entry. ``--burst`` reads without blocking, then reclaims.

Reading ahead: when runs are queued, the terminal write's script (``serve.recordstore``)
may also read the stream's next new entry, saving the read's round trip. ``Intake``
allows it only when that read is what the loop would send next anyway (it goes on after
this run, no stop was asked, no reclaim is due first), so the order of takes stays the
loop's; an entry read ahead that no run takes (the loop ends) is given back.
"""

from __future__ import annotations

import time

from runflow_worker.errors import QueueError
from runflow_worker.serve.queue import Delivery, RunQueue

MAX_BLOCK_S = 1.0
"""Longest XREADGROUP BLOCK: bounds how long an idle worker takes to notice a stop request.
A new entry wakes the read at once, so this adds no latency to runs."""


class Intake:
    """The serve loop's source of deliveries (one per worker)."""

    def __init__(self, queue: RunQueue, *, lease_s: float, idle_exit_s: float) -> None:
        self.queue = queue
        self.idle_exit_s = idle_exit_s
        self.reclaim_every_s = min(lease_s / 2, 30.0)
        self.next_reclaim_s = 0.0
        """When the next reclaim is due (monotonic; 0: at the first take)."""
        self.read_ahead: Delivery | None = None
        """The next entry, read by the last terminal write's script."""
        self.reads_on = False
        """Set by the loop for each run: it takes another delivery after this run (no
        ``--max-runs`` limit reached). ``Worker.perform_run`` called alone never reads
        ahead."""
        self.burst = False

    def next_delivery(self, *, burst: bool, idle_since: float) -> Delivery | None:
        """The next delivery: the entry read ahead, an expired entry when a reclaim is due,
        else a new entry.

        Burst mode reads without waiting and then reclaims; otherwise the read blocks (at
        most ``MAX_BLOCK_S``, the time to the next reclaim, or the rest of the idle window).
        """
        if self.read_ahead is not None:
            delivery, self.read_ahead = self.read_ahead, None
            return delivery
        if burst:
            return self.queue.read_new(block_ms=None) or self.queue.reclaim_expired()
        now = time.monotonic()
        if now >= self.next_reclaim_s:
            reclaimed = self.queue.reclaim_expired()
            # Found one: look again right after this run (there may be more).
            self.next_reclaim_s = now if reclaimed else now + self.reclaim_every_s
            if reclaimed is not None:
                return reclaimed
        wait_s = min(MAX_BLOCK_S, max(0.0, self.next_reclaim_s - now))
        if self.idle_exit_s:
            wait_s = min(wait_s, max(0.0, idle_since + self.idle_exit_s - now))
        delivery = self.queue.read_new(block_ms=max(1, int(wait_s * 1000)))
        if (delivery is None and self.idle_exit_s
                and time.monotonic() - idle_since >= self.idle_exit_s):
            # About to exit "with nothing queued": a run released back by a stopping worker
            # (or left by a dead one) is queued too, though only a reclaim sees it.
            delivery = self.queue.reclaim_expired()
        return delivery

    def may_read_ahead(self, *, stopping: bool) -> bool:
        """Whether the run's terminal write may also read the next new entry: only when the
        loop would send that read next (it goes on, no stop asked, no reclaim due first)."""
        if not self.reads_on or stopping:
            return False
        return self.burst or time.monotonic() < self.next_reclaim_s

    def give_back(self, delivery: Delivery) -> None:
        """Return an entry that was read but will not be started (a stop came, or the loop
        ends with it read ahead): pending for any worker's next reclaim at once."""
        try:
            self.queue.give_back(delivery)
        except QueueError:
            pass  # it is reclaimed after the lease

    def give_back_read_ahead(self) -> None:
        """Return the entry read ahead, if any (the loop is ending)."""
        if self.read_ahead is not None:
            delivery, self.read_ahead = self.read_ahead, None
            self.give_back(delivery)
