"""The client side of the queue: enqueue a run message, follow a run to its terminal record.

What ``runflow-worker submit`` uses, and the tests and benchmarks that queue runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from runflow_worker.run.contract import RunMessage, RunRecord
from runflow_worker.serve import keys

if TYPE_CHECKING:
    from runflow_worker.serve.recordstore import RecordStore

_last_store: list[RecordStore] = []
"""The record store the last enqueue used: one, since it holds its client (a cache keyed
by client would keep every client alive)."""


def enqueue_message(client: Any, message: RunMessage, gpu_class: str, *,
                    events_maxlen: int) -> str:
    """Write the ``queued`` record and event, then XADD the message; return the entry id.

    Raises ``recordstore.RunExists`` (nothing written) when the run id has a record."""
    from runflow_worker.run.record import queued_record
    from runflow_worker.serve.recordstore import RecordStore

    # The last client's store again: registering its scripts (a digest of each) at every
    # enqueue was ~0.07 ms of a submitter's call on a small VM.
    store = _last_store[0] if _last_store else None
    if store is None or store.client is not client or store.events_maxlen != events_maxlen:
        store = RecordStore(client, events_maxlen=events_maxlen)
        _last_store[:] = [store]
    return store.enqueue(message, queued_record(message), gpu_class,
                         event_data={"gpu_class": gpu_class})


def events_tail(client: Any) -> str:
    """The id of the events stream's last entry ("0-0" when empty): a cursor taken before
    the enqueue, so that no event of the run is missed."""
    from runflow_worker.serve.queue import redis_errors

    with redis_errors("reading the events stream"):
        last = client.xrevrange(keys.EVENTS_STREAM, count=1)
    return last[0][0] if last else "0-0"


def follow_run(client: Any, run_id: str, cursor: str, *,
               on_event: Callable[[dict[str, str]], None], block_ms: int = 1000) -> RunRecord:
    """Hand each of the run's events to ``on_event`` until its record is terminal; return
    the record. ``block_ms`` bounds each wait on the stream before the record is re-read."""
    from runflow_worker.serve.queue import redis_errors

    while True:
        with redis_errors("following the run"):
            reply = client.xread({keys.EVENTS_STREAM: cursor}, count=500, block=block_ms)
        check_record = not reply  # on a quiet stream too: events may have been trimmed
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                cursor = entry_id
                if fields.get("run_id") != run_id:
                    continue
                on_event(fields)
                if fields.get("type") == "status" and fields.get("status") in (
                        "succeeded", "failed", "canceled"):
                    check_record = True
        if not check_record:
            continue
        with redis_errors("reading the run record"):
            raw = client.get(keys.run_record(run_id))
        if raw:
            record = RunRecord.model_validate_json(raw)
            if record.status.terminal:
                return record
