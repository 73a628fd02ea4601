"""The run queue on Redis Streams: consumer group, deliveries, leases and reclaims (SPEC §2).

A *delivery* is one stream entry handed to this worker, by ``XREADGROUP`` (first delivery)
or by ``XAUTOCLAIM`` (an entry whose holder stopped renewing its lease). While a run is
alive its worker renews the lease by re-claiming the entry to itself (``XCLAIM ... JUSTID``
resets the idle time without counting a delivery), so an entry's idle time passes the lease
only when its holder is dead or frozen. Every lease operation is fenced by the run's
fencing token (see ``serve.recordstore``): a worker that lost the run can no longer touch it.

This module is the stream and lease side of a delivery only: every script that writes a run
record or a status event (the enqueue, the release of a started run, the terminal write)
lives in ``serve.recordstore``.

Redis errors leave this module as ``QueueError`` subclasses (``raise ... from exc``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import redis
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.retry import Retry

from runflow_worker.errors import QueueError
from runflow_worker.serve import keys, packed

log = logging.getLogger(__name__)
T = TypeVar("T")

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


def load_scripts(client: redis.Redis, scripts: list[Script]) -> None:
    """Load ``scripts`` into Redis in one round trip, so that their first calls find them
    (a script Redis does not have costs its caller two more round trips: the refused
    ``EVALSHA`` and a ``SCRIPT LOAD``; after a Redis restart redis-py still does that)."""
    with redis_errors("loading the scripts"), client.pipeline(transaction=False) as pipe:
        for script in scripts:
            pipe.script_load(script.script)
        pipe.execute()


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


def retry_write(write: Callable[[], T], *, give_up: Callable[[], bool],
                on_error: Callable[[QueueError, bool, int], None],
                sleep: Callable[[float], None], cap_s: float, permanent_retries: int,
                ) -> T | QueueError:
    """Run ``write`` until Redis takes it; the error given up on once ``give_up()`` is true
    or after ``permanent_retries`` non-connection errors. ``on_error(exc, retrying,
    failures)`` sees each failure (``failures`` before it: 0 for the first); ``sleep``
    waits between tries (``Backoff`` capped at ``cap_s``)."""
    backoff = Backoff(cap_s=cap_s)
    permanent = 0
    while True:
        try:
            return write()
        except QueueError as exc:
            if not isinstance(exc, RedisUnavailable):
                permanent += 1
            retrying = not (give_up() or permanent > permanent_retries)
            on_error(exc, retrying, backoff.failures)
            if not retrying:
                return exc
            sleep(backoff.next_delay_s())


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
    def earlier_deliveries(self) -> int:
        """Deliveries before this one: what a release sets the entry's counter back to, so
        that a shutdown does not count against ``max_deliveries``."""
        return max(0, self.deliveries - 1)

    @property
    def enqueued_unix_ms(self) -> int:
        """When the entry was added (the millisecond part of its id)."""
        return int(self.entry_id.split("-", 1)[0])


def first_delivery(stream: str, entry_id: str, fields: list[str] | None) -> Delivery:
    """The first delivery of ``entry_id`` from a raw reply (``fields``: flat name/value
    pairs, as ``XREADGROUP`` and the finalise script's read-ahead return them)."""
    pairs = dict(zip(fields[::2], fields[1::2], strict=True)) if fields else {}
    return Delivery(stream, str(entry_id), pairs.get(keys.RUN_FIELD), deliveries=1,
                    reclaimed=False)


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
        self.scripts = [self._lease_tick]
        """Every script of this module (loaded at boot: ``load_scripts``)."""

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
        wait = ("BLOCK", block_ms) if block_ms is not None else ()
        with redis_errors("reading the run stream"):
            # Packed by hiredis (``serve.packed``), its flat reply read as it comes.
            reply = packed.execute(self.client, "XREADGROUP", "GROUP", self.group,
                                   self.consumer, "COUNT", 1, *wait, "STREAMS", self.stream, ">")
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                return first_delivery(self.stream, entry_id, fields)
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

    def give_back(self, delivery: Delivery) -> None:
        """Leave an entry that was read but never started pending for another worker at
        once (not fenced: no pickup of its run began); its delivery counter is set back."""
        with redis_errors("releasing the entry"):
            self.client.xclaim(delivery.stream, self.group, self.consumer, 0,
                               [delivery.entry_id], idle=self.lease_ms,
                               retrycount=delivery.earlier_deliveries, justid=True)

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
