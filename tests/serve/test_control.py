"""``serve.control.LeaseKeeper``: ticks while a pickup is watched, none after, a lost lease
ends them; back-to-back watches shorter than a tick never wake its thread. A fake queue
stands in for Redis (the lease tests of this folder cover the real script)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from runflow_worker.errors import QueueError
from runflow_worker.serve.control import LeaseKeeper, ServeControl, ShutdownState
from runflow_worker.serve.queue import Delivery, LeaseTick
from tests.support.waiting import wait_for

DELIVERY = Delivery("runflow:runs:cpu", "1-0", "{}", deliveries=1, reclaimed=False)


class FakeQueue:
    """Records each tick; answers with ``held``, ``canceled`` (or raises ``error``)."""

    def __init__(self) -> None:
        self.ticks: list[tuple[str, int, bool]] = []
        self.held = True
        self.canceled = False
        self.error: QueueError | None = None
        self._lock = threading.Lock()

    def lease_tick(self, delivery: Delivery, run_id: str, token: int, *,
                   renew: bool) -> LeaseTick:
        with self._lock:
            self.ticks.append((run_id, token, renew))
        if self.error is not None:
            raise self.error
        return LeaseTick(held=self.held, canceled=self.canceled)

    def of(self, run_id: str) -> int:
        """Ticks of ``run_id`` so far."""
        with self._lock:
            return sum(1 for t in self.ticks if t[0] == run_id)


@pytest.fixture
def queue() -> FakeQueue:
    return FakeQueue()


@pytest.fixture
def keeper(queue: FakeQueue) -> Iterator[Any]:
    made: list[LeaseKeeper] = []

    def build(*, lease_s: float) -> LeaseKeeper:
        k = LeaseKeeper(queue, lease_s=lease_s)  # type: ignore[arg-type]
        made.append(k)
        return k

    yield build
    for k in made:
        k.close()


def control() -> ServeControl:
    return ServeControl(ShutdownState(), publisher=None)  # type: ignore[arg-type]


@pytest.mark.timeout(30)
def test_a_watched_pickup_is_renewed_and_its_cancel_flag_seen(keeper, queue: FakeQueue) -> None:
    k = keeper(lease_s=0.04)  # a tick every 10 ms, a renewal at each
    ctl = control()
    k.watch(DELIVERY, "run-1", 3, ctl)
    wait_for(lambda: k.renewals >= 2, 10, "renewals")
    assert not ctl.canceled
    queue.canceled = True
    wait_for(lambda: ctl.canceled, 10, "the cancel flag to be seen")
    assert {t[:2] for t in queue.ticks} == {("run-1", 3)}


@pytest.mark.timeout(30)
def test_a_pickup_whose_begin_is_on_its_way_is_kept_once_its_token_comes(
        keeper, queue: FakeQueue) -> None:
    # The begin sent ahead (serve.beginahead): the first tick reads the token itself, so a
    # run whose first steps outlast a tick (a slow download) keeps its lease meanwhile.
    k = keeper(lease_s=0.04)
    asked = threading.Event()

    def token() -> int:
        asked.set()
        return 7

    ctl = control()
    k.watch(DELIVERY, "ahead", token, ctl)
    wait_for(lambda: k.renewals >= 2, 10, "renewals")
    assert asked.is_set() and {t[:2] for t in queue.ticks} == {("ahead", 7)}
    queue.canceled = True
    wait_for(lambda: ctl.canceled, 10, "the cancel flag to be seen")


@pytest.mark.timeout(30)
def test_a_pickup_that_was_not_begun_is_not_kept(keeper, queue: FakeQueue) -> None:
    k = keeper(lease_s=0.04)
    asked = threading.Event()

    def no_token() -> None:
        asked.set()  # the begin said skip, canceled, or failed

    k.watch(DELIVERY, "skipped", no_token, control())
    wait_for(asked.is_set, 10, "the first tick")
    k.unwatch()
    k.watch(DELIVERY, "next", 2, control())  # the thread idled: woken by the next watch
    wait_for(lambda: queue.of("next") >= 1, 10, "a tick of the next pickup")
    assert queue.of("skipped") == 0


@pytest.mark.timeout(30)
def test_no_tick_of_a_pickup_starts_after_its_unwatch(keeper, queue: FakeQueue) -> None:
    k = keeper(lease_s=0.04)
    k.watch(DELIVERY, "first", 1, control())
    wait_for(lambda: queue.of("first") >= 2, 10, "ticks of the first pickup")
    k.unwatch()
    at_unwatch = queue.of("first")
    k.watch(DELIVERY, "second", 2, control())
    wait_for(lambda: queue.of("second") >= 3, 10, "ticks of the second pickup")
    assert queue.of("first") <= at_unwatch + 1  # at most the one under way at the unwatch


@pytest.mark.timeout(30)
def test_a_lost_lease_ends_the_ticks_and_the_next_watch_is_kept(keeper,
                                                                queue: FakeQueue) -> None:
    k = keeper(lease_s=0.04)
    queue.held = False
    lost = control()
    k.watch(DELIVERY, "lost", 1, lost)
    wait_for(lambda: lost.lease_lost, 10, "the lost lease to be seen")
    assert queue.of("lost") == 1
    queue.held = True
    k.unwatch()
    k.watch(DELIVERY, "next", 2, control())  # the thread idles after a lost lease: woken
    wait_for(lambda: queue.of("next") >= 2, 10, "ticks of the next pickup")
    assert queue.of("lost") == 1


@pytest.mark.timeout(30)
def test_failing_ticks_go_on_until_redis_answers(keeper, queue: FakeQueue) -> None:
    k = keeper(lease_s=0.04)
    queue.error = QueueError("Redis unavailable")
    k.watch(DELIVERY, "run-1", 1, control())
    wait_for(lambda: queue.of("run-1") >= 3, 10, "ticks retried")
    queue.error = None
    wait_for(lambda: k.renewals >= 1, 10, "a renewal once Redis answers")


@pytest.mark.timeout(30)
def test_back_to_back_watches_shorter_than_a_tick_never_wake_the_thread(
        keeper, queue: FakeQueue) -> None:
    k = keeper(lease_s=3600.0)  # a tick every quarter second: none comes in this test
    k.watch(DELIVERY, "first", 1, control())  # the idle thread is woken once
    wait_for(lambda: not k._idle and k._current is not None, 10, "the thread to keep it")
    notified: list[int] = []
    real_notify = k._cond.notify_all
    k._cond.notify_all = lambda: (notified.append(1), real_notify())  # type: ignore[method-assign]
    with k._cond:
        assert not k._idle  # waiting for the first pickup's tick, not idle
        for n in range(50):
            k.unwatch()
            k.watch(DELIVERY, f"run-{n}", n + 2, control())
    assert notified == [] and queue.ticks == []
