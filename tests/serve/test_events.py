"""``serve.events.EventPublisher``: events in order, batched, the rest handed to the run's
last write; a fake store stands in for Redis (the serve tests cover the real scripts)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from runflow_worker.serve.events import EventPublisher
from tests.support.waiting import wait_for

LONG_S = 3600.0
"""A batch delay no test reaches: events wait for the run's end."""


class FakeStore:
    """Records the batches written; ``gate`` (when set) holds each write until it opens."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, int, int, list[tuple[str, str, str]]]] = []
        self.order: list[str] = []
        self.entered = threading.Event()
        self.gate: threading.Event | None = None

    def publish(self, run_id: str, attempt: int, token: int,
                events: list[tuple[str, str, str]]) -> bool:
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        self.batches.append((run_id, attempt, token, list(events)))
        self.order.append("written")
        return True

    def written(self) -> list[int]:
        """The ``n`` of every event written, in order."""
        return [json.loads(e[2])["n"] for b in self.batches for e in b[3]]


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def make(store: FakeStore) -> Iterator[Any]:
    made: list[EventPublisher] = []

    def build(*, batch_delay_s: float) -> EventPublisher:
        publisher = EventPublisher(store, batch_delay_s=batch_delay_s)  # type: ignore[arg-type]
        made.append(publisher)
        return publisher

    yield build
    for publisher in made:
        publisher.close(timeout_s=5)


def numbers(events: list[tuple[str, str, str]]) -> list[int]:
    return [json.loads(e[2])["n"] for e in events]


@pytest.mark.timeout(30)
def test_the_events_of_a_short_run_go_with_its_last_write(make, store: FakeStore) -> None:
    publisher = make(batch_delay_s=LONG_S)
    publisher.bind("run-1", 2, 7)
    for n in range(3):
        publisher.publish("progress", {"n": n})
    rest = publisher.finish(timeout_s=5)
    assert rest == [("progress", "", '{"n":0}'), ("progress", "", '{"n":1}'),
                    ("progress", "", '{"n":2}')]
    assert store.batches == []  # no round trip of their own
    publisher.publish("progress", {"n": 9})  # unbound now: dropped
    assert publisher.finish(timeout_s=5) == []


@pytest.mark.timeout(30)
def test_a_full_batch_is_written_at_once(make, store: FakeStore) -> None:
    publisher = make(batch_delay_s=LONG_S)
    publisher.max_batch = 3
    publisher.bind("run-1", 1, 5)
    for n in range(3):
        publisher.publish("progress", {"n": n})
    wait_for(lambda: store.batches, 10, "the full batch to be written")
    publisher.publish("log", {"n": 3})
    rest = publisher.finish(timeout_s=5)
    assert store.batches[0][:3] == ("run-1", 1, 5) and store.written() == [0, 1, 2]
    assert numbers(rest) == [3] and rest[0][0] == "log"


@pytest.mark.timeout(30)
def test_events_are_written_once_their_delay_is_over(make, store: FakeStore) -> None:
    publisher = make(batch_delay_s=0.0)
    publisher.bind("run-1", 1, 1)
    publisher.publish("progress", {"n": 0})
    wait_for(lambda: store.written() == [0], 10, "the batch to be written")
    assert publisher.finish(timeout_s=5) == []


@pytest.mark.timeout(30)
def test_finish_waits_for_a_batch_on_its_way_and_keeps_the_order(make,
                                                                  store: FakeStore) -> None:
    publisher = make(batch_delay_s=0.0)
    store.gate = threading.Event()
    publisher.bind("run-1", 1, 1)
    publisher.publish("progress", {"n": 0})
    assert store.entered.wait(10)  # the first batch is being written, held at the gate
    publisher.publish("progress", {"n": 1})
    rest: list[tuple[str, str, str]] = []

    def finish() -> None:
        rest.extend(publisher.finish(timeout_s=10))
        store.order.append("finished")

    finisher = threading.Thread(target=finish)
    finisher.start()
    store.gate.set()
    finisher.join(10)
    # Whatever was written came before what the last write carries, all in order.
    assert store.written() + numbers(rest) == [0, 1]
    assert store.order[-1] == "finished" and store.order.count("written") >= 1


@pytest.mark.timeout(30)
def test_flush_writes_the_buffer_now(make, store: FakeStore) -> None:
    publisher = make(batch_delay_s=LONG_S)
    publisher.bind("run-1", 1, 1)
    publisher.publish("progress", {"n": 0})
    publisher.publish("progress", {"n": 1})
    assert publisher.flush(timeout_s=10)
    assert store.written() == [0, 1] and len(store.batches) == 1


@pytest.mark.timeout(30)
def test_finish_takes_only_its_own_pickups_events(make, store: FakeStore) -> None:
    publisher = make(batch_delay_s=LONG_S)
    publisher.bind("old", 1, 1)
    publisher.publish("progress", {"n": 0})
    publisher.bind("new", 1, 2)  # the old pickup never finished (its events stay queued)
    publisher.publish("progress", {"n": 1})
    assert numbers(publisher.finish(timeout_s=5)) == [1]
    assert publisher.flush(timeout_s=10)
    assert [(b[0], b[2]) for b in store.batches] == [("old", 1)] and store.written() == [0]
