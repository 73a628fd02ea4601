"""The begin script sent ahead (``serve.beginahead``): its reply read later on the same
connection, the connection always given back clean, a Redis that lost the script or is
gone handled as a begin sent and answered at once would be."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from runflow_worker.run.contract import parse_message
from runflow_worker.run.record import running_record
from runflow_worker.serve import keys
from runflow_worker.serve.queue import Delivery, RedisUnavailable, RunQueue, connect
from runflow_worker.serve.recordstore import Begin, RecordStore
from tests.support import factories
from tests.support.queue import graph, record, submit

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def store(r: redis.Redis, redis_server: Any) -> Iterator[tuple[RecordStore, RunQueue]]:
    client = connect(redis_server.url)
    queue = RunQueue(client, "cpu", consumer="c1", lease_s=60.0)
    queue.ensure_group()
    yield RecordStore(client), queue
    client.close()


def pick_up(queue: RunQueue, r: redis.Redis, run_id: str) -> Delivery:
    submit(r, run_id)
    delivery = queue.read_new(block_ms=None)
    assert delivery is not None
    return delivery


def send(store: RecordStore, delivery: Delivery, run_id: str) -> Any:
    msg = parse_message(factories.message(graph(), run_id=run_id))
    return store.send_begin(delivery, run_id, 1, running=running_record(msg, started_at=1.0),
                            event_data={})


def in_use(store: RecordStore) -> int:
    pool = store.client.connection_pool
    return len(pool._in_use_connections)


def test_the_reply_is_read_later_and_the_connection_given_back(store, r) -> None:
    records, queue = store
    delivery = pick_up(queue, r, "ahead")
    pending = send(records, delivery, "ahead")
    assert in_use(records) == 1  # held until the reply is read
    assert pending.outcome() == (Begin.RUNNING, 1)
    assert record(r, "ahead")["status"] == "running"
    assert pending.outcome() == (Begin.RUNNING, 1)  # read once, repeated
    assert in_use(records) == 0
    pending.close()
    assert records.client.get(keys.run_record("ahead")) == r.get(keys.run_record("ahead"))


def test_a_reply_never_read_does_not_answer_the_next_command(store, r) -> None:
    records, queue = store
    delivery = pick_up(queue, r, "dropped")
    r.set("probe", "the probe's value")
    send(records, delivery, "dropped").close()
    assert in_use(records) == 0
    # The connection that carried the begin was closed, not handed on with its reply.
    assert records.client.get("probe") == "the probe's value"


def test_a_redis_that_lost_the_script_runs_it_after_loading_it(store, r) -> None:
    records, queue = store
    delivery = pick_up(queue, r, "flushed")
    r.script_flush()
    pending = send(records, delivery, "flushed")
    assert pending.outcome() == (Begin.RUNNING, 1)
    assert record(r, "flushed")["status"] == "running"
    assert in_use(records) == 0


def test_a_redis_gone_before_the_send_fails_the_begin_as_unavailable(tmp_path: Path) -> None:
    client = connect("redis://127.0.0.1:9/0")  # discard port: nothing listens
    try:
        delivery = Delivery(stream=keys.runs_stream("cpu"), entry_id="1-0", payload=None,
                            deliveries=1, reclaimed=False)
        pending = send(RecordStore(client), delivery, "nowhere")
        for _ in range(2):
            with pytest.raises(RedisUnavailable):
                pending.result()
        pending.close()
    finally:
        client.close()


def test_a_redis_gone_before_the_reply_fails_the_begin_as_unavailable(store, r,
                                                                       redis_server) -> None:
    records, queue = store
    delivery = pick_up(queue, r, "cut")
    pending = send(records, delivery, "cut")
    redis_server.stop()
    try:
        # The reply was on its way or already in the socket: either it is read, or the
        # connection's loss is the begin's failure; never a hang, never another's reply.
        try:
            outcome: Any = pending.outcome()
        except RedisUnavailable:
            outcome = "unavailable"
        assert outcome in ((Begin.RUNNING, 1), "unavailable")
        assert in_use(records) == 0
    finally:
        redis_server.start()
