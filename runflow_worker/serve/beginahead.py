"""The begin script sent ahead: its round trip overlaps the run's first local steps.

A pickup begins with one script (``RecordStore.begin_attempt``: the fence token, the
``running`` record, the status event). Waiting for its reply before anything else put a
Redis round trip, ~1 ms of a warm run on the benchmark's machine (2 ms at p90), on every
run's path. Instead the daemon sends the script (``RecordStore.send_begin``) and starts
the pipeline at once: the message's checks, the run's directories and the fetch of the
caller's files happen while Redis answers. The pipeline asks for the answer
(``ServeControl.admit``) before anything that needs the run begun: before it downloads
models, before it takes the ComfyUI child and executes, and before any event is written
(events carry the token). A run whose begin says it must not run (terminal already,
canceled, superseded) is stopped there, its result dropped, and ended as before; what it
did until then is what any worker may do for a queued run of that owner (read its files,
check its graph, start its environment's child).

The reply is read from a connection held out of the pool meanwhile, by the run's thread or,
when the run's first steps take longer than a lease tick (a slow input download), by the
lease keeper's first tick, which needs the token to keep the lease and to read the cancel
flag (``LeaseKeeper.watch``). redis-py has no call for a reply read later, so this takes a
connection, sends the packed script (``serve.packed.send``) and reads with
``read_response``, as its own ``execute_command`` does, and translates errors as
``serve.queue.redis_errors`` does.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError

from runflow_worker.errors import QueueError
from runflow_worker.serve import packed
from runflow_worker.serve.queue import redis_errors

WHAT = "starting the run"
"""How a failure names the step (``QueueError`` messages)."""


class Begin(StrEnum):
    """What a pickup found (the begin script's verdict)."""

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


class PendingBegin:
    """One begin script on its way: ``result`` reads its reply (once; later calls repeat
    the outcome or the error); ``close`` drops a reply never read."""

    def __init__(self, client: redis.Redis, script: Script, keys: Sequence[Any],
                 args: Sequence[Any]) -> None:
        self._client = client
        self._script = script
        self._keys = list(keys)
        self._args = list(args)
        self._reply: list[Any] | None = None
        self._error: QueueError | None = None
        self._conn: Any = None
        self._lock = threading.Lock()
        pool = client.connection_pool
        try:
            with redis_errors(WHAT):
                conn = pool.get_connection()
                try:
                    packed.send(conn, "EVALSHA", script.sha, len(self._keys), *self._keys,
                                *self._args)
                except BaseException:
                    conn.disconnect()  # a command cut halfway must not reach the next user
                    pool.release(conn)
                    raise
        except QueueError as exc:
            # As a failed call: no resend (it may have reached Redis); ``result`` raises it.
            self._error = exc
            return
        self._conn = conn

    def result(self) -> list[Any]:
        """The script's reply; ``QueueError`` when Redis failed (the run's entry stays
        pending with this consumer, as for any failed begin)."""
        with self._lock:  # the run's thread or the lease keeper's, whichever asks first
            if self._reply is not None:
                return self._reply
            if self._error is not None:
                raise self._error
            try:
                self._reply = self._read()
            except QueueError as exc:
                self._error = exc
                raise
            return self._reply

    def outcome(self) -> tuple[Begin, int]:
        """``result`` as (what the pickup found, its fencing token)."""
        verdict, token = self.result()
        return Begin(verdict), int(token)

    def running_token(self) -> int | None:
        """The fencing token when the run is begun, None otherwise (or when Redis failed):
        what the lease keeper keeps the lease with."""
        try:
            begin, token = self.outcome()
        except QueueError:
            return None
        return token if begin is Begin.RUNNING else None

    def close(self) -> None:
        """Give the connection back; one whose reply was never read is closed first (its
        reply would otherwise answer the pool's next caller)."""
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.disconnect()
            self._client.connection_pool.release(conn)

    def _read(self) -> list[Any]:
        conn, self._conn = self._conn, None
        if conn is None:  # closed before anyone asked: the reply is gone with it
            raise QueueError(f"{WHAT}: the reply was dropped unread")
        pool = self._client.connection_pool
        try:
            with redis_errors(WHAT):
                try:
                    reply = conn.read_response()
                except NoScriptError:
                    # Redis restarted since the boot loaded the scripts: nothing ran. The
                    # script's own call loads it and runs it (what ``Script`` does).
                    pool.release(conn)
                    conn = None
                    reply = self._script(keys=self._keys, args=self._args)
                except BaseException:
                    conn.disconnect()
                    raise
        finally:
            if conn is not None:
                pool.release(conn)
        return list(reply)
