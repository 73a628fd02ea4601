"""The commands on a run's path, packed by hiredis in one call and sent on a pooled connection.

redis-py's command layer packs a command in Python: each argument goes through an
``encode`` and two generator steps (about seven type checks an argument). For the finalise
script's ~45 arguments that was ~0.12 ms of a call with warm caches and ~0.25 ms with cold
ones, which is how a warm run's code meets it (measured on the benchmark's 2-core VM); the
begin script, the enqueue and the pickup's read pay the same per argument.
``hiredis.pack_command`` (redis-py's own parser library, a dependency) writes the same bytes in
one C call: ``str`` as UTF-8, ``int`` and ``float`` as redis-py writes them, and it refuses
what redis-py refuses (``bool``, ``None``).

``execute`` is what ``Redis.execute_command`` does for a command without a response callback
on a client without retries (``serve.queue.connect``): a pooled connection, the command sent,
its reply read, the connection given back; a failure while sending or reading closes it
first (redis-py's connection does that itself). ``run_script`` sends ``EVALSHA``, and hands a
script Redis does not know (restarted since the boot loaded it) to redis-py's ``Script``,
which loads and runs it, as ``Script.__call__`` does. Errors are redis-py's own, translated
by the callers (``serve.queue.redis_errors``).

No library sends a pre-packed command and reads its reply in one call: redis-py's
connection methods are used as its client uses them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import hiredis
import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError


def pack(conn: Any, args: Sequence[Any]) -> list[bytes]:
    """``args`` as the bytes of one command for ``conn``; redis-py's ``DataError`` for an
    argument it would refuse."""
    encoder = conn.encoder
    if encoder.encoding.lower() not in ("utf-8", "utf8") or encoder.encoding_errors != "strict":
        return list(conn.pack_command(*args))  # hiredis writes str as strict UTF-8 only
    try:
        return [hiredis.pack_command(tuple(args))]
    except TypeError as exc:
        raise redis.DataError(f"cannot send {args[0]!r}: {exc}") from None


def send(conn: Any, *args: Any) -> None:
    """Send one command on ``conn`` (its reply is for ``conn.read_response``)."""
    conn.send_packed_command(pack(conn, args))


def execute(client: redis.Redis, *args: Any) -> Any:
    """One command on a pooled connection of ``client``: its reply, as redis-py's parser
    gives it (no response callback)."""
    pool = client.connection_pool
    conn = pool.get_connection()
    try:
        conn.send_packed_command(pack(conn, args))
        return conn.read_response()
    finally:
        pool.release(conn)


def run_script(client: redis.Redis, script: Script, keys: Sequence[Any],
               args: Sequence[Any]) -> Any:
    """``script``'s reply for ``keys`` and ``args`` (loaded first if Redis lost it)."""
    try:
        return execute(client, "EVALSHA", script.sha, len(keys), *keys, *args)
    except NoScriptError:
        return script(keys=list(keys), args=list(args))
