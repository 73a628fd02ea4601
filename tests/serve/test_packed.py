"""Commands packed by hiredis (``serve.packed``): the bytes redis-py would send, its errors,
the connection given back in every case, a script Redis lost loaded and run again."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from runflow_worker.serve import packed
from runflow_worker.serve.queue import connect

pytestmark = pytest.mark.timeout(60)

ECHO_LUA = "return {KEYS[1], ARGV[1], ARGV[2], ARGV[3], #ARGV}"


@pytest.fixture
def client(r: redis.Redis, redis_server: Any) -> Iterator[redis.Redis]:
    c = connect(redis_server.url)
    yield c
    c.close()


def in_use(client: redis.Redis) -> int:
    return len(client.connection_pool._in_use_connections)


def test_packs_the_bytes_redis_py_packs(client: redis.Redis) -> None:
    conn = client.connection_pool.get_connection()
    try:
        args = ("EVALSHA", "a" * 40, 2, "k1", "k:ü", "", b"raw\x00bytes", 0, -7, 2**40, 1.5,
                0.1, '{"node_id": "3"}')
        assert packed.pack(conn, args) == [b"".join(conn.pack_command(*args))]
    finally:
        client.connection_pool.release(conn)


@pytest.mark.parametrize("bad", [True, None, object()])
def test_refuses_what_redis_py_refuses(client: redis.Redis, bad: object) -> None:
    conn = client.connection_pool.get_connection()
    try:
        with pytest.raises(redis.DataError):
            conn.pack_command("SET", "k", bad)
        with pytest.raises(redis.DataError):
            packed.pack(conn, ("SET", "k", bad))
    finally:
        client.connection_pool.release(conn)


def test_another_encoding_is_packed_by_redis_py(redis_server: Any) -> None:
    c = redis.Redis.from_url(redis_server.url, encoding="latin-1", decode_responses=True)
    try:
        packed.execute(c, "SET", "k", "é")
        assert c.get("k") == "é"
        assert redis.Redis.from_url(redis_server.url).get("k") == b"\xe9"  # latin-1 bytes
    finally:
        c.close()


def test_execute_reads_the_raw_reply(client: redis.Redis, r: redis.Redis) -> None:
    assert packed.execute(client, "SET", "k", "v") == "OK"
    r.xadd("s", {"f": "1", "g": "2"})
    reply = packed.execute(client, "XRANGE", "s", "-", "+")
    assert [fields for _id, fields in reply] == [["f", "1", "g", "2"]]  # flat, no callback
    assert in_use(client) == 0


def test_an_error_reply_raises_and_the_connection_stays_usable(client: redis.Redis) -> None:
    with pytest.raises(redis.ResponseError, match="unknown command"):
        packed.execute(client, "NO-SUCH-COMMAND", "x")
    assert in_use(client) == 0
    assert packed.execute(client, "PING") in ("PONG", True)


def test_a_lost_connection_is_given_back_closed(client: redis.Redis, redis_server: Any) -> None:
    packed.execute(client, "PING")
    redis_server.stop()
    try:
        with pytest.raises(redis.ConnectionError):
            packed.execute(client, "PING")
        assert in_use(client) == 0
    finally:
        redis_server.start()
    assert packed.execute(client, "PING") in ("PONG", True)  # a new connection


def test_run_script_loads_a_script_redis_lost(client: redis.Redis, r: redis.Redis) -> None:
    script = client.register_script(ECHO_LUA)
    assert packed.run_script(client, script, ["key"], ["a", 2, "c"]) == ["key", "a", "2", "c", 3]
    r.script_flush()
    assert not r.script_exists(script.sha)[0]
    assert packed.run_script(client, script, ["key"], ["x", 0, ""]) == ["key", "x", "0", "", 3]
    assert r.script_exists(script.sha)[0]
    assert in_use(client) == 0


def test_send_leaves_the_reply_for_read_response(client: redis.Redis) -> None:
    conn = client.connection_pool.get_connection()
    try:
        packed.send(conn, "ECHO", "later")
        assert conn.read_response() == "later"
    finally:
        client.connection_pool.release(conn)
