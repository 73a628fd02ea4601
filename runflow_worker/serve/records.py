"""Run records and events, written so that every run ends with exactly one terminal record.

Fencing: each pickup of a run increments ``runflow:fence:<run_id>`` and keeps the value as
its *token*. Every later write of that pickup (the running record, progress events, the
terminal record, the ack) is a Lua script that first checks the counter still holds the
token, so a worker that lost its lease (killed, frozen, partitioned) can no longer write
anything once another worker has picked the run up. A counter that is missing (Redis lost
its data) is re-established by the first writer.

Atomicity: the terminal record, its ``status`` event, the dead-letter copy or the OOM
re-enqueue, and the XACK are one script, so a crash or a cancellation can never leave a
record without its event or an acked entry without its record. A record that is already
terminal is never overwritten: the entry is acked and the write dropped.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis
from pydantic import BaseModel

from runflow_worker.errors import ErrorCode, RunFailure, WorkerError
from runflow_worker.run.contract import (
    RunMessage,
    RunRecord,
    RunStatus,
    record_for,
)
from runflow_worker.serve import keys
from runflow_worker.serve.queue import Delivery, redis_errors

log = logging.getLogger(__name__)

_TERMINAL_LUA = "(s == 'succeeded' or s == 'failed' or s == 'canceled')"

# KEYS: record, fence, cancel, events, stream
# ARGV: group, entry_id, attempt, mode ('run'|'claim'), running_record, run_id,
#       event_data, events_maxlen, fence_ttl_s
_BEGIN_LUA = f"""
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, rec = pcall(cjson.decode, cur)
  if ok and type(rec) == 'table' then
    local s = rec['status']
    local verdict = nil
    if {_TERMINAL_LUA} then
      verdict = 'terminal'
    elseif tonumber(rec['attempt']) and tonumber(rec['attempt']) > tonumber(ARGV[3]) then
      verdict = 'superseded'
    end
    if verdict then
      redis.pcall('XACK', KEYS[5], ARGV[1], ARGV[2])
      redis.pcall('XDEL', KEYS[5], ARGV[2])
      return {{verdict, 0}}
    end
  end
end
local token = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[9])
if ARGV[4] == 'claim' then return {{'claimed', token}} end
if redis.call('EXISTS', KEYS[3]) == 1 then return {{'canceled', token}} end
redis.call('SET', KEYS[1], ARGV[5])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[8], '*', 'run_id', ARGV[6],
           'attempt', ARGV[3], 'type', 'status', 'status', 'running', 'data', ARGV[7])
return {{'running', token}}
"""

# KEYS: record, fence, stream, events, aux stream (dead letters / promotion target),
#       callbacks due set, callback job
# ARGV: 1 token, 2 group, 3 entry_id, 4 run_id, 5 event attempt, 6 record, 7 status,
#       8 event_data, 9 events_maxlen, 10 fence_ttl_s, 11 mode ('final'|'dead'|'promote'),
#       12 aux run payload, 13 dead reason, 14 deliveries, 15 callback job id ('' = none),
#       16 callback url, 17 callback payload, 18 callback due (epoch ms)
_FINALISE_LUA = f"""
local f = redis.call('GET', KEYS[2])
if f and f ~= ARGV[1] then return 0 end
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, rec = pcall(cjson.decode, cur)
  if ok and type(rec) == 'table' then
    local s = rec['status']
    if {_TERMINAL_LUA} then
      redis.pcall('XACK', KEYS[3], ARGV[2], ARGV[3])
      redis.pcall('XDEL', KEYS[3], ARGV[3])
      return 2
    end
  end
end
if ARGV[11] == 'dead' then
  redis.call('XADD', KEYS[5], '*', '{keys.RUN_FIELD}', ARGV[12],
             '{keys.DEAD_REASON_FIELD}', ARGV[13], '{keys.SOURCE_STREAM_FIELD}', KEYS[3],
             '{keys.SOURCE_ID_FIELD}', ARGV[3], '{keys.DELIVERIES_FIELD}', ARGV[14])
elseif ARGV[11] == 'promote' then
  redis.call('XADD', KEYS[5], '*', '{keys.RUN_FIELD}', ARGV[12])
end
redis.call('SET', KEYS[1], ARGV[6])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[9], '*', 'run_id', ARGV[4],
           'attempt', ARGV[5], 'type', 'status', 'status', ARGV[7], 'data', ARGV[8])
if ARGV[15] ~= '' then
  redis.call('HSET', KEYS[7], 'url', ARGV[16], 'payload', ARGV[17], 'run_id', ARGV[4],
             'tries', 0)
  redis.call('ZADD', KEYS[6], ARGV[18], ARGV[15])
end
redis.pcall('XACK', KEYS[3], ARGV[2], ARGV[3])
redis.pcall('XDEL', KEYS[3], ARGV[3])
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[10])
return 1
"""

# KEYS: fence, events. ARGV: token, events_maxlen, run_id, attempt, (type, status, data)*
_PUBLISH_LUA = """
local f = redis.call('GET', KEYS[1])
if f and f ~= ARGV[1] then return -1 end
local n = 0
for i = 5, #ARGV, 3 do
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'run_id', ARGV[3],
             'attempt', ARGV[4], 'type', ARGV[i], 'status', ARGV[i + 1], 'data', ARGV[i + 2])
  n = n + 1
end
return n
"""


class Begin(StrEnum):
    """What a pickup found."""

    RUNNING = "running"
    """The run is ours: the ``running`` record and event are written."""
    CANCELED = "canceled"
    """The cancel flag is set: finalise ``canceled`` without running."""
    CLAIMED = "claimed"
    """The run is ours, nothing written (dead-letter and rejection paths)."""
    TERMINAL = "terminal"
    """The record is already terminal: the entry was acked, skip it."""
    SUPERSEDED = "superseded"
    """A later attempt of the run exists: the entry was acked, skip it."""


class Finalised(StrEnum):
    """What a terminal write did."""

    WRITTEN = "written"
    FENCED = "fenced"
    """Another pickup holds the run: nothing written."""
    ALREADY_TERMINAL = "already_terminal"
    """The record was terminal already: acked, nothing else written."""


@dataclass(frozen=True)
class DeadLetter:
    """Copy the entry to the dead-letter stream in the same step as the terminal write."""

    reason: str


def worker_lost(deliveries: int, max_deliveries: int, *,
                rejection: RunFailure | None = None) -> RunFailure:
    """The ``WORKER_LOST`` error of a run whose entry was delivered more than
    ``max_deliveries`` times (SPEC §2); ``deliveries`` counts this delivery too.

    ``rejection``: why the message does not parse either (its code and message are kept in
    the error's ``details``: the earlier holders died, the message is also at fault).
    """
    details: dict[str, Any] = {"deliveries": deliveries - 1}
    if rejection is not None:
        details["rejection"] = {"code": rejection.code.value, "message": rejection.message}
    return RunFailure(
        ErrorCode.WORKER_LOST,
        f"the worker running this run was lost {deliveries - 1} times "
        f"(limit {max_deliveries} deliveries); moved to the dead-letter stream",
        details=details)


class NotSerialisable(WorkerError):
    """A record or message that pydantic's JSON serialiser refuses: nested deeper than its
    limit, which is lower than the parser's (``json.loads``), so a message that parsed can
    still be refused here. The serialiser's error is the ``__cause__``."""


def model_json(model: BaseModel) -> str:
    """``model.model_dump_json()``; ``NotSerialisable`` when the serialiser refuses it.

    Records and the OOM re-enqueue are serialised once, when written; a message too deep
    for that is found then rather than by serialising every message on delivery.
    """
    try:
        return model.model_dump_json()
    except (ValueError, RecursionError) as exc:  # PydanticSerializationError is a ValueError
        raise NotSerialisable(f"{type(model).__name__} cannot be serialised: {exc}") from exc


@dataclass(frozen=True)
class CallbackJob:
    """A callback to queue with the terminal record: its id (the ``webhook-id``), URL, body
    and when it is first due (epoch ms)."""

    job_id: str
    url: str
    payload: str
    due_ms: int


@dataclass(frozen=True)
class Promotion:
    """Re-enqueue the run (next attempt) on another stream instead of a terminal write."""

    stream: str
    message_json: str


def event_json(data: dict[str, Any]) -> str:
    """The ``data`` field of an event."""
    return json.dumps(data, separators=(",", ":"), default=str)


def status_event(run_id: str, attempt: int, status: str, data: dict[str, Any]) -> dict[str, Any]:
    """The fields of a ``status`` event entry."""
    return {"run_id": run_id, "attempt": attempt, "type": "status", "status": status,
            "data": event_json(data)}


def promotion_for(message: RunMessage, record: RunRecord, stream: str
                  ) -> tuple[Promotion, RunRecord]:
    """The OOM re-enqueue of ``message`` (next attempt, this attempt's billing carried) on
    ``stream``, and the ``queued`` record written instead of a terminal one.

    ``NotSerialisable`` when the message is nested too deeply to be re-enqueued.
    """
    # The whole billing (the sum too): the next attempt's records start from it (SPEC §7:
    # billing.gpu_seconds is the sum over attempts).
    nxt = message.model_copy(update={"attempt": message.attempt + 1,
                                     "billing": record.billing.model_copy(deep=True)})
    queued = record_for(nxt, RunStatus.QUEUED, billing=record.billing, warnings=record.warnings)
    return Promotion(stream, model_json(nxt)), queued


class RecordStore:
    """Fenced, atomic writes of run records and events."""

    def __init__(self, client: redis.Redis, *, group: str = keys.CONSUMER_GROUP,
                 events_maxlen: int = 100_000) -> None:
        self.client = client
        self.group = group
        self.events_maxlen = events_maxlen
        self._begin = client.register_script(_BEGIN_LUA)
        self._finalise = client.register_script(_FINALISE_LUA)
        self._publish = client.register_script(_PUBLISH_LUA)

    def read(self, run_id: str) -> RunRecord | None:
        """The record of ``run_id``, or None."""
        with redis_errors("reading a run record"):
            raw = self.client.get(keys.run_record(run_id))
        return RunRecord.model_validate_json(raw) if raw else None

    def begin_attempt(self, delivery: Delivery, run_id: str, attempt: int, *,
                      running: RunRecord | None, event_data: dict[str, Any]
                      ) -> tuple[Begin, int]:
        """Take the run's next fencing token and (with ``running``) mark it running.

        Returns the outcome and the token (0 when the entry was skipped).
        ``NotSerialisable`` (nothing written) when ``running`` cannot be serialised.
        """
        running_json = model_json(running) if running is not None else ""
        with redis_errors("starting the run"):
            verdict, token = self._begin(
                keys=[keys.run_record(run_id), keys.fence(run_id), keys.cancel_flag(run_id),
                      keys.EVENTS_STREAM, delivery.stream],
                args=[self.group, delivery.entry_id, attempt,
                      "run" if running is not None else "claim",
                      running_json, run_id,
                      event_json(event_data), self.events_maxlen, keys.FENCE_TTL_S],
            )
        return Begin(verdict), int(token)

    def finalise(self, delivery: Delivery, token: int, record: RunRecord, *,
                 event_data: dict[str, Any], dead_letter: DeadLetter | None = None,
                 promotion: Promotion | None = None,
                 callback: CallbackJob | None = None) -> Finalised:
        """Write ``record`` + its status event (+ dead letter / re-enqueue, + the callback
        job) and ack, atomically: a written terminal record always has its callback queued.

        ``NotSerialisable`` (nothing written) when ``record`` cannot be serialised.
        """
        mode, aux_stream, aux_payload, reason = "final", delivery.stream, "", ""
        if dead_letter is not None:
            mode, aux_stream = "dead", keys.DEAD_LETTER_STREAM
            aux_payload, reason = delivery.payload or "", dead_letter.reason
        elif promotion is not None:
            mode, aux_stream, aux_payload = "promote", promotion.stream, promotion.message_json
        job = callback or CallbackJob("", "", "", 0)
        record_json = model_json(record)
        with redis_errors("writing the run record"):
            done = self._finalise(
                keys=[keys.run_record(record.id), keys.fence(record.id), delivery.stream,
                      keys.EVENTS_STREAM, aux_stream, keys.CALLBACKS_DUE,
                      keys.callback_job(job.job_id or record.id)],
                args=[token, self.group, delivery.entry_id, record.id, record.attempt,
                      record_json, record.status.value, event_json(event_data),
                      self.events_maxlen, keys.FENCE_TTL_S, mode, aux_payload, reason,
                      delivery.deliveries, job.job_id, job.url, job.payload, job.due_ms],
            )
        return {1: Finalised.WRITTEN, 0: Finalised.FENCED}.get(int(done),
                                                              Finalised.ALREADY_TERMINAL)

    def publish(self, run_id: str, attempt: int, token: int,
                events: list[tuple[str, str, str]]) -> bool:
        """Append ``(type, status, data_json)`` events of one pickup; False if fenced out."""
        args: list[Any] = [token, self.events_maxlen, run_id, attempt]
        for event in events:
            args.extend(event)
        with redis_errors("publishing events"):
            n = self._publish(keys=[keys.fence(run_id), keys.EVENTS_STREAM], args=args)
        return int(n) >= 0


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
