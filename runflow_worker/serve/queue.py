"""The run queue on Redis Streams: consumer group, deliveries, leases and reclaims (SPEC §2).

A *delivery* is one stream entry handed to this worker, by ``XREADGROUP`` (first delivery)
or by ``XAUTOCLAIM`` (an entry whose holder stopped renewing its lease). While a run is
alive its worker renews the lease by re-claiming the entry to itself (``XCLAIM ... JUSTID``
resets the idle time without counting a delivery), so an entry's idle time passes the lease
only when its holder is dead or frozen. Every lease operation is fenced by the run's
fencing token (see ``serve.records``): a worker that lost the run can no longer touch it.

Redis errors leave this module as ``QueueError`` subclasses (``raise ... from exc``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from runflow_worker.errors import QueueError, WorkerError
from runflow_worker.serve import keys

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 2.0
"""TCP connect timeout to Redis."""
COMMAND_TIMEOUT_S = 10.0
"""Socket timeout of one command, beyond any BLOCK time we ask for."""
MAX_RECLAIM_CALLS = 100_000
"""Safety bound of one reclaim scan (each ``XAUTOCLAIM`` call looks at 10 pending entries)."""


class RedisUnavailable(QueueError):
    """Redis cannot be reached (connection refused, reset, timed out): back off and retry."""


class GroupMissing(QueueError):
    """The stream or its consumer group vanished (a Redis restart without persistence)."""


class RunExists(WorkerError):
    """``enqueue`` refused: the run id already has a record (queued, running or terminal)."""

    def __init__(self, run_id: str, status: str) -> None:
        super().__init__(f"run {run_id} already exists (status {status}); not enqueued again")
        self.run_id = run_id
        self.status = status


@contextmanager
def redis_errors(what: str) -> Iterator[None]:
    """Translate redis-py errors raised inside into ``QueueError`` subclasses."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise RedisUnavailable(f"{what}: Redis unavailable: {exc}") from exc
    except redis.ResponseError as exc:
        if str(exc).startswith("NOGROUP"):
            raise GroupMissing(f"{what}: {exc}") from exc
        raise QueueError(f"{what}: {exc}") from exc
    except redis.RedisError as exc:
        raise QueueError(f"{what}: {exc}") from exc


def connect(redis_url: str, *, block_s: float = 0.0) -> redis.Redis:
    """A client for ``redis_url`` (RESP2, str responses, no hidden retries).

    Retries are ours (``Backoff``), so redis-py must fail fast instead of sleeping inside a
    command. ``block_s`` is the longest ``BLOCK`` a caller will use; the socket timeout
    leaves room for it.
    """
    return redis.Redis.from_url(
        redis_url, decode_responses=True, protocol=2,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=COMMAND_TIMEOUT_S + block_s,
        socket_keepalive=True,
        retry=Retry(NoBackoff(), 0), retry_on_timeout=False,
        health_check_interval=30,
    )


class Backoff:
    """Capped exponential backoff with full jitter: 0.1 s, 0.2 s, ... up to ``cap_s``."""

    def __init__(self, initial_s: float = 0.1, cap_s: float = 5.0) -> None:
        self.initial_s = initial_s
        self.cap_s = cap_s
        self.failures = 0

    def next_delay_s(self) -> float:
        """The delay before the next try (grows with each call until ``reset``)."""
        ceiling = min(self.cap_s, self.initial_s * (2 ** self.failures))
        self.failures += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        """Back to the initial delay (after a success)."""
        self.failures = 0


def _stream_id(entry_id: str) -> tuple[int, int]:
    """A stream entry id (``<ms>-<seq>``) as a tuple that sorts like the stream does."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True)
class Delivery:
    """One stream entry handed to this worker."""

    stream: str
    entry_id: str
    payload: str | None
    """The ``run`` field (the run message JSON); None if the entry lacks it."""
    deliveries: int
    """How many times the group has delivered this entry, this delivery included."""
    reclaimed: bool
    """True when taken over from a worker whose lease expired."""

    @property
    def enqueued_unix_ms(self) -> int:
        """When the entry was added (the millisecond part of its id)."""
        return int(self.entry_id.split("-", 1)[0])


# Renew the lease (optional) and report the cancel flag, fenced by the run's token.
# Returns {state, canceled}: state 1 = ours, 0 = another pickup holds the run (lease lost),
# 2 = the fence vanished (Redis lost its data) and was re-established with our token.
_LEASE_TICK_LUA = """
local f = redis.call('GET', KEYS[1])
local state = 1
if f == false then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[6])
  state = 2
elseif f ~= ARGV[1] then
  return {0, 0}
end
if ARGV[5] == '1' then
  redis.pcall('XCLAIM', KEYS[2], ARGV[2], ARGV[3], 0, ARGV[4], 'JUSTID')
end
return {state, redis.call('EXISTS', KEYS[3])}
"""

# Give a pending entry back without acking it: still pending (so not lost), its idle time
# set to the lease so any worker's XAUTOCLAIM takes it at once, and its delivery counter
# set back so a shutdown does not count against max_deliveries.
# The release and the record's return to ``queued`` (with its status event) happen together,
# and only while this pickup still holds the fence.
_RELEASE_LUA = """
local f = redis.call('GET', KEYS[1])
if f ~= false and f ~= ARGV[1] then return 0 end
redis.pcall('XCLAIM', KEYS[2], ARGV[2], ARGV[3], 0, ARGV[4], 'IDLE', ARGV[5],
            'RETRYCOUNT', ARGV[6], 'JUSTID')
if ARGV[7] ~= '' then
  redis.call('SET', KEYS[3], ARGV[7])
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[8], '*', 'run_id', ARGV[9],
             'attempt', ARGV[10], 'type', 'status', 'status', 'queued', 'data', ARGV[11])
end
return 1
"""


@dataclass(frozen=True)
class LeaseTick:
    """What one lease tick found."""

    held: bool
    """False once another pickup holds the run: this worker must stop and write nothing."""
    canceled: bool
    """True when ``runflow:cancel:<run_id>`` exists."""


class RunQueue:
    """The stream of one GPU class as seen by one consumer of the ``workers`` group."""

    def __init__(self, client: redis.Redis, gpu_class: str, consumer: str, *,
                 lease_s: float) -> None:
        self.client = client
        self.gpu_class = gpu_class
        self.stream = keys.runs_stream(gpu_class)
        self.group = keys.CONSUMER_GROUP
        self.consumer = consumer
        self.lease_ms = max(1, int(lease_s * 1000))
        # Where the next reclaim scan resumes (the pending list is scanned round-robin).
        self._reclaim_cursor = "0-0"
        self._lease_tick = client.register_script(_LEASE_TICK_LUA)
        self._release = client.register_script(_RELEASE_LUA)

    def ensure_group(self) -> None:
        """Create the group from id 0 (MKSTREAM) unless it exists."""
        with redis_errors("creating the consumer group"):
            try:
                self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
                log.info("created consumer group %s on %s", self.group, self.stream,
                         extra={"event": "group_created", "stream": self.stream})
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def ping(self) -> None:
        """Raise RedisUnavailable unless Redis answers."""
        with redis_errors("ping"):
            self.client.ping()

    def read_new(self, block_ms: int | None) -> Delivery | None:
        """The next never-delivered entry, waiting up to ``block_ms`` (None: do not wait)."""
        with redis_errors("reading the run stream"):
            reply = self.client.xreadgroup(self.group, self.consumer, {self.stream: ">"},
                                           count=1, block=block_ms)
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                return Delivery(self.stream, entry_id, (fields or {}).get(keys.RUN_FIELD),
                                deliveries=1, reclaimed=False)
        return None

    def reclaim_expired(self) -> Delivery | None:
        """Take over one entry whose holder let its lease expire, or None.

        Scans the pending list with a cursor (``XAUTOCLAIM`` looks at a bounded window per
        call), resuming where the previous scan stopped and wrapping around once, so None
        means no entry of the whole list had expired: an expired entry behind many live ones,
        or before the saved cursor, is still found (``serve --burst`` relies on it). After
        the wrap the scan stops as soon as its cursor reaches where it began: the entries
        from there on were seen in the first leg.
        """
        start = self._reclaim_cursor
        one_leg = start == "0-0"  # a scan from the head covers the list without wrapping
        wrapped = False
        for _ in range(MAX_RECLAIM_CALLS):
            with redis_errors("reclaiming expired entries"):
                reply = self.client.xautoclaim(self.stream, self.group, self.consumer,
                                               self.lease_ms, self._reclaim_cursor, count=1)
            cursor, entries = reply[0], reply[1]
            self._reclaim_cursor = cursor
            for entry_id, fields in entries:
                if fields is None:  # deleted while pending (older Redis reports it so)
                    continue
                return Delivery(self.stream, entry_id, fields.get(keys.RUN_FIELD),
                                deliveries=self.delivery_count(entry_id), reclaimed=True)
            if cursor == "0-0":
                if one_leg or wrapped:
                    return None
                # The scan began mid-list: the entries before ``start`` are still unseen.
                wrapped = True
            elif wrapped and _stream_id(cursor) >= _stream_id(start):
                return None
        return None

    def delivery_count(self, entry_id: str) -> int:
        """How many times ``entry_id`` was delivered (0 if it is not pending)."""
        with redis_errors("reading the pending list"):
            rows = self.client.xpending_range(self.stream, self.group, min=entry_id,
                                              max=entry_id, count=1)
        return int(rows[0]["times_delivered"]) if rows else 0

    def lease_tick(self, delivery: Delivery, run_id: str, token: int, *,
                   renew: bool) -> LeaseTick:
        """Renew the lease (when ``renew``) and read the cancel flag, fenced by ``token``."""
        with redis_errors("renewing the lease"):
            state, canceled = self._lease_tick(
                keys=[keys.fence(run_id), delivery.stream, keys.cancel_flag(run_id)],
                args=[token, self.group, self.consumer, delivery.entry_id,
                      "1" if renew else "0", keys.FENCE_TTL_S],
            )
        if int(state) == 2:
            log.warning("fencing token of run %s was missing (Redis lost its data?); "
                        "re-established", run_id, extra={"run_id": run_id,
                                                         "event": "fence_restored"})
        return LeaseTick(held=int(state) != 0, canceled=bool(int(canceled)))

    def release(self, delivery: Delivery, run_id: str | None, token: int | None, *,
                queued: tuple[str, int, str, int] | None = None) -> bool:
        """Leave the entry pending for another worker at once; False if fenced out.

        Without a token (an entry read but never started) the release is not fenced.
        ``queued`` = (record JSON, attempt, event data JSON, events maxlen) also puts the
        run's record back to ``queued`` with a status event, in the same fenced step.
        """
        retry_count = max(0, delivery.deliveries - 1)
        with redis_errors("releasing the entry"):
            if run_id is None or token is None:
                self.client.xclaim(delivery.stream, self.group, self.consumer, 0,
                                   [delivery.entry_id], idle=self.lease_ms,
                                   retrycount=retry_count, justid=True)
                return True
            record_json, attempt, event_data, events_maxlen = queued or ("", 0, "", 0)
            done = self._release(
                keys=[keys.fence(run_id), delivery.stream, keys.run_record(run_id),
                      keys.EVENTS_STREAM],
                args=[token, self.group, self.consumer, delivery.entry_id, self.lease_ms,
                      retry_count, record_json, events_maxlen, run_id, attempt, event_data],
            )
        return bool(int(done))

    def dead_letter_unidentified(self, delivery: Delivery, reason: str) -> None:
        """Move an entry with no usable run id to the dead-letter stream and ack it."""
        with redis_errors("dead-lettering an entry"), \
                self.client.pipeline(transaction=True) as pipe:
            pipe.xadd(keys.DEAD_LETTER_STREAM, {
                keys.RUN_FIELD: delivery.payload or "",
                keys.DEAD_REASON_FIELD: reason,
                keys.SOURCE_STREAM_FIELD: delivery.stream,
                keys.SOURCE_ID_FIELD: delivery.entry_id,
                keys.DELIVERIES_FIELD: delivery.deliveries,
            })
            pipe.xack(delivery.stream, self.group, delivery.entry_id)
            pipe.xdel(delivery.stream, delivery.entry_id)
            pipe.execute()


# Write the ``queued`` record and its status event, then add the run to its stream: refused
# (nothing written) when the run id already has a record, whatever its status, so that a
# retried or repeated enqueue never runs a run twice nor overwrites its outcome.
# KEYS: record, events, run stream. ARGV: record JSON, events maxlen, message JSON,
# event fields (name, value)*.  Returns {'queued', entry id} or {'exists', status}.
_ENQUEUE_LUA = f"""
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, rec = pcall(cjson.decode, cur)
  local s = 'unreadable'
  if ok and type(rec) == 'table' and type(rec['status']) == 'string' then s = rec['status'] end
  return {{'exists', s}}
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 4))
return {{'queued', redis.call('XADD', KEYS[3], '*', '{keys.RUN_FIELD}', ARGV[3])}}
"""


def enqueue(client: redis.Redis, gpu_class: str, message_json: str, *, run_id: str,
            queued_record_json: str, event_fields: dict[str, Any], events_maxlen: int) -> str:
    """Write the ``queued`` record and its event, then add the run to its class's stream.

    One script, in that order: a worker that sees the entry always finds the record.
    Raises ``RunExists`` (nothing written) when ``run_id`` already has a record: a run id
    is enqueued once (a queued or running run is not enqueued twice either).
    Returns the entry id.
    """
    fields: list[Any] = []
    for name, value in event_fields.items():
        fields.extend((name, value))
    with redis_errors("enqueueing the run"):
        verdict, value = client.register_script(_ENQUEUE_LUA)(
            keys=[keys.run_record(run_id), keys.EVENTS_STREAM, keys.runs_stream(gpu_class)],
            args=[queued_record_json, events_maxlen, message_json, *fields])
    if verdict != "queued":
        raise RunExists(run_id, str(value))
    return str(value)
