"""Counting the Redis commands and round trips a worker makes, by thread (test helper).

``counting_client(url, log)`` is a client like ``serve.queue.connect``'s whose connections
append every request they send to ``log``: one ``Request`` per round trip (a pipeline is
one request of several commands, a single command one of one), with the sending thread and
a monotonic timestamp. ``CommandLog.run_window`` cuts out what one run cost: on the run's
thread, from the read that delivered it to the next read; on the other threads, the
requests naming the run's fence. ``Request.label`` names a Lua script by the attribute that
holds it (``begin``, ``finalise``, ...), so a listing reads like the code.

The benchmark ``bench/bench_serve_overhead.py`` prints these listings too.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import hiredis
import redis

from runflow_worker.serve import keys
from runflow_worker.serve.queue import connect

READS = ("XREADGROUP", "XAUTOCLAIM")
"""The commands with which a worker's loop takes its next delivery."""
FINALISE = "EVALSHA finalise"
"""The terminal write, which may also take the next delivery (it reads ahead)."""


@dataclass(frozen=True)
class Request:
    """One round trip: the commands sent together, by which thread, when."""

    thread: str
    commands: tuple[tuple[Any, ...], ...]
    at_s: float
    labels: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def names(self) -> tuple[str, ...]:
        """The command names (``EVALSHA`` resolved to its script's name)."""
        return tuple(self._name(c) for c in self.commands)

    @property
    def label(self) -> str:
        """The request in a few words: ``EVALSHA finalise`` or ``MULTI+XADD+...``."""
        return "+".join(self.names)

    def _name(self, command: tuple[Any, ...]) -> str:
        name = str(command[0]).upper()
        if name == "EVALSHA" and len(command) > 1:
            return f"EVALSHA {self.labels.get(str(command[1]), str(command[1])[:8])}"
        return name

    def mentions(self, text: str) -> bool:
        """True when any argument of any command equals ``text``."""
        return any(str(arg) == text for c in self.commands for arg in c)


class CommandLog:
    """Every request of the counting connections, in the order they were sent."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.labels: dict[str, str] = {}
        """Script SHA -> name, filled by ``name_scripts``."""
        self._lock = threading.Lock()

    def add(self, commands: list[tuple[Any, ...]]) -> None:
        """Record one round trip sent by the current thread."""
        request = Request(threading.current_thread().name, tuple(commands), time.monotonic(),
                          self.labels)
        with self._lock:
            self.requests.append(request)

    def snapshot(self) -> list[Request]:
        """The requests so far (a copy)."""
        with self._lock:
            return list(self.requests)

    def name_scripts(self, **holders: Any) -> None:
        """Name the ``Script`` attributes of ``holders`` (``store=worker.store``): every
        attribute holding a registered script is named after it, without its underscore."""
        for holder in holders.values():
            for attr, value in vars(holder).items():
                if isinstance(value, redis.commands.core.Script):
                    self.labels[str(value.sha)] = attr.lstrip("_")

    def run_window(self, run_id: str) -> list[Request]:
        """The requests of one run. Its *run thread* is the one that sent the first request
        naming the run's fence (the begin script). On it, the window opens at the request
        that delivered the run: the last read before (included), or the previous run's
        finalise script, which reads the next entry ahead (excluded: it is that run's); it
        closes at the next read (excluded) or at its own finalise (included). On other
        threads it holds the requests naming the run's fence (events, lease ticks)."""
        requests = self.snapshot()
        fence = keys.fence(run_id)
        first = next(i for i, q in enumerate(requests) if q.mentions(fence))
        run_thread = requests[first].thread
        opener = max(i for i in range(first) if requests[i].thread == run_thread
                     and (requests[i].names[0] in READS or requests[i].label == FINALISE))
        start = opener if requests[opener].names[0] in READS else opener + 1
        end = len(requests)
        for i in range(first, len(requests)):
            if requests[i].thread != run_thread:
                continue
            if requests[i].names[0] in READS:
                end = i
                break
            if requests[i].label == FINALISE:
                end = i + 1
                break
        return [q for i, q in enumerate(requests)
                if (q.thread == run_thread and start <= i < end)
                or (q.thread != run_thread and q.mentions(fence))]

    def next_read_sent(self, run_id: str) -> bool:
        """True once the thread that ran ``run_id`` has sent the request that ends its
        window: its next read, or its finalise script (which reads ahead)."""
        requests = self.snapshot()
        fence = keys.fence(run_id)
        first = next((i for i, q in enumerate(requests) if q.mentions(fence)), None)
        if first is None:
            return False
        run_thread = requests[first].thread
        return any(q.thread == run_thread and (q.names[0] in READS or q.label == FINALISE)
                   for q in requests[first:])


def counting_client(url: str, log: CommandLog, *, block_s: float = 1.0) -> redis.Redis:
    """A client with ``serve.queue.connect``'s settings whose connections record every
    request they send in ``log``."""

    class CountingConnection(redis.Connection):
        # Every request leaves through here, packed by redis-py or by ``serve.packed``:
        # the bytes are read back into its commands.
        def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            log.add(unpack(command))
            super().send_packed_command(command, check_health)

    client = connect(url, block_s=block_s)
    client.connection_pool.connection_class = CountingConnection
    return client


def unpack(packed: Any) -> list[tuple[Any, ...]]:
    """The commands in the bytes of one request (as many as a pipeline packs together)."""
    reader = hiredis.Reader(encoding="utf-8", errors="replace")
    for chunk in [packed] if isinstance(packed, (bytes, str)) else packed:
        reader.feed(chunk.encode() if isinstance(chunk, str) else chunk)
    commands = []
    while (command := reader.gets()) is not False:
        commands.append(tuple(command))
    return commands


def describe(requests: list[Request]) -> str:
    """A listing: one line per round trip, thread and commands, milliseconds from the first."""
    if not requests:
        return "(none)"
    t0 = requests[0].at_s
    return "\n".join(f"{(q.at_s - t0) * 1000:7.2f} ms  {q.thread:<16} {q.label}"
                     for q in requests)
