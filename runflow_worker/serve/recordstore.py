"""Every write of a run record or a status event to Redis: the Lua scripts and their
KEYS/ARGV lists, in one place, so that every run ends with exactly one terminal record.

The scripts, in the order a run meets them::

    enqueue     the ``queued`` record + its event, then the entry (``submit``); refused when
                the run id has a record
    begin       a pickup: skip a terminal or superseded run, take the fencing token, write
                the ``running`` record + event (or claim the run without writing)
    publish     progress and log events of one pickup (``serve.events``), in batches
    finalise    the pickup's last progress events, the terminal record + its event (+ the
                dead-letter copy or the OOM re-enqueue, + the callback job) and the ack
    release     the pickup's last progress events, the record back to ``queued`` + its
                event, and the entry left pending for another worker at once

Records are built by ``run.record``; key names live in ``serve.keys``; the stream and lease
side of a delivery (reads, reclaims, renewals) is ``serve.queue``.

Fencing: each pickup of a run increments ``runflow:fence:<run_id>`` and keeps the value as
its *token*. Every later write of that pickup (the running record, progress events, the
terminal record, the ack, the release) is a Lua script that first checks the counter still
holds the token, so a worker that lost its lease (killed, frozen, partitioned) can no longer
write anything once another worker has picked the run up. A counter that is missing (Redis
lost its data) is re-established by the first writer.

Atomicity: the run's last progress events, the terminal record, its ``status`` event, the
dead-letter copy or the OOM re-enqueue, and the XACK are one script, so a crash or a
cancellation can never leave a record without its event or an acked entry without its
record. A record that is already terminal is never overwritten: the entry is acked and the
write dropped.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis
from pydantic import BaseModel

from runflow_worker.errors import WorkerError
from runflow_worker.run.contract import RunMessage, RunRecord
from runflow_worker.serve import keys
from runflow_worker.serve.beginahead import Begin, PendingBegin
from runflow_worker.serve.packed import run_script
from runflow_worker.serve.queue import Delivery, first_delivery, redis_errors

_TERMINAL_LUA = "(s == 'succeeded' or s == 'failed' or s == 'canceled')"


def _append_events_lua(*, first: int, events: str, maxlen: str, run_id: str,
                       attempt: str) -> str:
    """Lua appending the ``(type, status, data)`` triples from ``ARGV[first]`` on to the
    events stream: the one spelling of an event entry that the publish, finalise and
    release scripts share (its other arguments are Lua expressions of each script)."""
    return f"""for i = {first}, #ARGV, 3 do
  redis.call('XADD', {events}, 'MAXLEN', '~', {maxlen}, '*', 'run_id', {run_id},
             'attempt', {attempt}, 'type', ARGV[i], 'status', ARGV[i + 1], 'data', ARGV[i + 2])
end"""


# Write the ``queued`` record and its status event, then add the run to its stream: refused
# (nothing written) when the run id already has a record, whatever its status, so that a
# retried or repeated enqueue never runs a run twice nor overwrites its outcome.
# KEYS: record, events, run stream
# ARGV: 1 record, 2 events_maxlen, 3 message, 4 run_id, 5 attempt, 6 event_data
# Returns {'queued', entry id} or {'exists', status}.
_ENQUEUE_LUA = f"""
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, rec = pcall(cjson.decode, cur)
  local s = 'unreadable'
  if ok and type(rec) == 'table' and type(rec['status']) == 'string' then s = rec['status'] end
  return {{'exists', s}}
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'run_id', ARGV[4],
           'attempt', ARGV[5], 'type', 'status', 'status', 'queued', 'data', ARGV[6])
return {{'queued', redis.call('XADD', KEYS[3], '*', '{keys.RUN_FIELD}', ARGV[3])}}
"""

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
#       16 callback url, 17 callback payload, 18 callback due (epoch ms),
#       19 consumer reading the stream's next new entry once written ('' = none),
#       20 the progress events' attempt, then (type, status, data)* of the pickup's last
#       progress events: appended before the status event
# Returns 0 (fenced), 2 (terminal already), 1 (written, now or by the same call whose reply
# was lost: the record holds exactly ARGV[6]), or {1, entry id, fields} when written and the
# next entry was read.
_FINALISE_LUA = f"""
local f = redis.call('GET', KEYS[2])
if f and f ~= ARGV[1] then return 0 end
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[6] then
  -- This pickup's own write, sent again after its reply was lost: written already (a
  -- promotion's re-enqueue must not be added twice). Acked again, nothing else.
  redis.pcall('XACK', KEYS[3], ARGV[2], ARGV[3])
  redis.pcall('XDEL', KEYS[3], ARGV[3])
  return 1
end
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
{_append_events_lua(first=21, events="KEYS[4]", maxlen="ARGV[9]", run_id="ARGV[4]",
                    attempt="ARGV[20]")}
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
if ARGV[19] ~= '' then
  -- pcall: the run is written whatever the read meets (a group gone with a Redis restart)
  local nxt = redis.pcall('XREADGROUP', 'GROUP', ARGV[2], ARGV[19], 'COUNT', 1,
                          'STREAMS', KEYS[3], '>')
  if type(nxt) == 'table' and nxt['err'] == nil then
    local entry = nxt[1][2][1]
    return {{1, entry[1], entry[2]}}
  end
end
return 1
"""

# KEYS: fence, events. ARGV: token, events_maxlen, run_id, attempt, (type, status, data)*
_PUBLISH_LUA = f"""
local f = redis.call('GET', KEYS[1])
if f and f ~= ARGV[1] then return -1 end
{_append_events_lua(first=5, events="KEYS[2]", maxlen="ARGV[2]", run_id="ARGV[3]",
                    attempt="ARGV[4]")}
return (#ARGV - 4) / 3
"""


# Give a pending entry back without acking it: still pending (so not lost), its idle time
# set to the lease so any worker's XAUTOCLAIM takes it at once, and its delivery counter
# set back so a shutdown does not count against max_deliveries. The record goes back to
# ``queued`` with its status event in the same step, and only while this pickup still holds
# the fence. Returns 1, or 0 when fenced out (nothing done).
# KEYS: fence, stream, record, events
# ARGV: 1 token, 2 group, 3 consumer, 4 entry_id, 5 idle_ms, 6 retry count, 7 record,
#       8 events_maxlen, 9 run_id, 10 attempt, 11 event_data, then (type, status, data)*
#       of the pickup's last progress events: appended before the status event
_RELEASE_LUA = f"""
local f = redis.call('GET', KEYS[1])
if f ~= false and f ~= ARGV[1] then return 0 end
redis.pcall('XCLAIM', KEYS[2], ARGV[2], ARGV[3], 0, ARGV[4], 'IDLE', ARGV[5],
            'RETRYCOUNT', ARGV[6], 'JUSTID')
{_append_events_lua(first=12, events="KEYS[4]", maxlen="ARGV[8]", run_id="ARGV[9]",
                    attempt="ARGV[10]")}
redis.call('SET', KEYS[3], ARGV[7])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[8], '*', 'run_id', ARGV[9],
           'attempt', ARGV[10], 'type', 'status', 'status', 'queued', 'data', ARGV[11])
return 1
"""


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

    @classmethod
    def of(cls, stream: str, message: RunMessage) -> Promotion:
        """The re-enqueue of ``message`` (``run.record.promoted_run``) on ``stream``.

        ``NotSerialisable`` when the message is nested too deeply to be re-enqueued.
        """
        return cls(stream, model_json(message))


class RunExists(WorkerError):
    """``enqueue`` refused: the run id already has a record (queued, running or terminal)."""

    def __init__(self, run_id: str, status: str) -> None:
        super().__init__(f"run {run_id} already exists (status {status}); not enqueued again")
        self.run_id = run_id
        self.status = status


Event = tuple[str, str, str]
"""An event of one pickup as its script writes it: ``(type, status, data_json)``."""


def _flat(events: Sequence[Event]) -> list[str]:
    """``events`` as the script's trailing ARGV triples."""
    return [field for event in events for field in event]


_EVENT_ENCODER = json.JSONEncoder(separators=(",", ":"), default=str)
"""Shared: ``json.dumps`` with options builds an encoder at every call."""


def event_json(data: dict[str, Any]) -> str:
    """The ``data`` field of an event."""
    return _EVENT_ENCODER.encode(data)


class RecordStore:
    """Fenced, atomic writes of run records and events."""

    def __init__(self, client: redis.Redis, *, group: str = keys.CONSUMER_GROUP,
                 events_maxlen: int = 100_000) -> None:
        self.client = client
        self.group = group
        self.events_maxlen = events_maxlen
        self._enqueue = client.register_script(_ENQUEUE_LUA)
        self._begin = client.register_script(_BEGIN_LUA)
        self._finalise = client.register_script(_FINALISE_LUA)
        self._publish = client.register_script(_PUBLISH_LUA)
        self._release = client.register_script(_RELEASE_LUA)
        self.scripts = [self._begin, self._finalise, self._publish, self._release]
        """The scripts a worker runs (loaded at its boot: ``serve.queue.load_scripts``)."""

    def read(self, run_id: str) -> RunRecord | None:
        """The record of ``run_id``, or None."""
        with redis_errors("reading a run record"):
            raw = self.client.get(keys.run_record(run_id))
        return RunRecord.model_validate_json(raw) if raw else None

    def enqueue(self, message: RunMessage, queued: RunRecord, gpu_class: str, *,
                event_data: dict[str, Any]) -> str:
        """Write the ``queued`` record and its event, then add the run to its class's stream.

        One script, in that order: a worker that sees the entry always finds the record.
        Raises ``RunExists`` (nothing written) when the run id already has a record: a run
        id is enqueued once (a queued or running run is not enqueued twice either).
        Returns the entry id.
        """
        with redis_errors("enqueueing the run"):
            verdict, value = run_script(
                self.client, self._enqueue,
                [keys.run_record(message.run_id), keys.EVENTS_STREAM,
                 keys.runs_stream(gpu_class)],
                [queued.to_json(), self.events_maxlen, message.model_dump_json(),
                 message.run_id, message.attempt, event_json(event_data)])
        if verdict != "queued":
            raise RunExists(message.run_id, str(value))
        return str(value)

    def begin_attempt(self, delivery: Delivery, run_id: str, attempt: int, *,
                      running: RunRecord | None, event_data: dict[str, Any]
                      ) -> tuple[Begin, int]:
        """Take the run's next fencing token and (with ``running``) mark it running.

        Returns the outcome and the token (0 when the entry was skipped).
        ``NotSerialisable`` (nothing written) when ``running`` cannot be serialised.
        """
        keys_, args = self._begin_call(delivery, run_id, attempt, running, event_data)
        with redis_errors("starting the run"):
            verdict, token = run_script(self.client, self._begin, keys_, args)
        return Begin(verdict), int(token)

    def send_begin(self, delivery: Delivery, run_id: str, attempt: int, *,
                   running: RunRecord, event_data: dict[str, Any]) -> PendingBegin:
        """``begin_attempt`` sent now, its reply read later (``pending.outcome()``), so
        the caller works meanwhile (``serve.beginahead``). ``NotSerialisable`` as there,
        raised here (nothing sent)."""
        keys_, args = self._begin_call(delivery, run_id, attempt, running, event_data)
        return PendingBegin(self.client, self._begin, keys_, args)

    def _begin_call(self, delivery: Delivery, run_id: str, attempt: int,
                    running: RunRecord | None, event_data: dict[str, Any]
                    ) -> tuple[list[Any], list[Any]]:
        running_json = model_json(running) if running is not None else ""
        return ([keys.run_record(run_id), keys.fence(run_id), keys.cancel_flag(run_id),
                 keys.EVENTS_STREAM, delivery.stream],
                [self.group, delivery.entry_id, attempt,
                 "run" if running is not None else "claim",
                 running_json, run_id,
                 event_json(event_data), self.events_maxlen, keys.FENCE_TTL_S])

    def finalise(self, delivery: Delivery, token: int, record: RunRecord, *,
                 event_data: dict[str, Any], dead_letter: DeadLetter | None = None,
                 promotion: Promotion | None = None,
                 callback: CallbackJob | None = None, events: Sequence[Event] = (),
                 events_attempt: int | None = None, read_next: str | None = None
                 ) -> tuple[Finalised, Delivery | None]:
        """Write ``record`` + its status event (+ dead letter / re-enqueue, + the callback
        job) and ack, atomically: a written terminal record always has its callback queued.

        ``events``: the pickup's progress events not written yet (``EventPublisher.finish``),
        appended just before the status event, with ``events_attempt`` (the pickup's
        attempt; ``record``'s by default, which a promotion's ``queued`` record is not).
        ``read_next``: once written, the same script reads the stream's next new entry
        for this consumer (the ``XREADGROUP`` the loop would send next), returned as the
        second value (None when the stream had none, or nothing was written).

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
            done = run_script(
                self.client, self._finalise,
                [keys.run_record(record.id), keys.fence(record.id), delivery.stream,
                 keys.EVENTS_STREAM, aux_stream, keys.CALLBACKS_DUE,
                 keys.callback_job(job.job_id or record.id)],
                [token, self.group, delivery.entry_id, record.id, record.attempt,
                 record_json, record.status.value, event_json(event_data),
                 self.events_maxlen, keys.FENCE_TTL_S, mode, aux_payload, reason,
                 delivery.deliveries, job.job_id, job.url, job.payload, job.due_ms,
                 read_next or "",
                 record.attempt if events_attempt is None else events_attempt,
                 *_flat(events)],
            )
        if isinstance(done, list):
            return Finalised.WRITTEN, first_delivery(delivery.stream, done[1], done[2])
        return {1: Finalised.WRITTEN, 0: Finalised.FENCED}.get(
            int(done), Finalised.ALREADY_TERMINAL), None

    def publish(self, run_id: str, attempt: int, token: int, events: list[Event]) -> bool:
        """Append ``(type, status, data_json)`` events of one pickup; False if fenced out."""
        with redis_errors("publishing events"):
            n = run_script(self.client, self._publish, [keys.fence(run_id), keys.EVENTS_STREAM],
                           [token, self.events_maxlen, run_id, attempt, *_flat(events)])
        return int(n) >= 0

    def release(self, delivery: Delivery, token: int, queued: RunRecord, *,
                event_data: dict[str, Any], consumer: str, idle_ms: int,
                events: Sequence[Event] = ()) -> bool:
        """Leave the entry pending for another worker at once (idle ``idle_ms``, its
        delivery counter set back) and put the record back to ``queued`` with its event, in
        one step fenced by ``token``; False (nothing done) when fenced out. ``events``: the
        pickup's progress events not written yet, appended before the status event."""
        with redis_errors("releasing the entry"):
            done = run_script(
                self.client, self._release,
                [keys.fence(queued.id), delivery.stream, keys.run_record(queued.id),
                 keys.EVENTS_STREAM],
                [token, self.group, consumer, delivery.entry_id, idle_ms,
                 delivery.earlier_deliveries, model_json(queued), self.events_maxlen,
                 queued.id, queued.attempt, event_json(event_data), *_flat(events)],
            )
        return bool(int(done))
