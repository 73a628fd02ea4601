"""Fixtures of the serve tests: a real redis-server, worker processes and in-process workers.

``redis_server`` is one ``redis-server`` per session on a free loopback port, without
persistence (``--save "" --appendonly no``), that a test can stop and restart on the same
port. Every test starts from an empty database. Workers run the fake ComfyUI child of
``tests.fakes.serve_child``; tests wait on conditions with deadlines, never on fixed sleeps.
The helpers the tests call are in ``tests.support`` (``queue``, ``workers``, ``waiting``,
``cli``, ``redis_server``).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.fakes import SERVE_CHILD
from tests.support.paths import REPO
from tests.support.redis_server import RedisServer
from tests.support.workers import InProcessWorker, WorkerProcess, make_worker


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def r(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client on an empty database (the server is restarted if a test left it down)."""
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()
    client = redis.Redis.from_url(redis_server.url, decode_responses=True, protocol=2)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def worker_env(tmp_path: Path, redis_server: RedisServer) -> dict[str, str]:
    """Environment of a worker process (no RUNFLOW_* leaks in from outside)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNFLOW_")}
    comfy = tmp_path / "comfyui"
    comfy.mkdir(exist_ok=True)
    env.update({
        "PYTHONPATH": str(REPO),
        "RUNFLOW_REDIS_URL": redis_server.url,
        "RUNFLOW_GPU_CLASS": "cpu",
        "RUNFLOW_LEASE_S": "1",
        "RUNFLOW_GRACE_S": "10",
        "RUNFLOW_IDLE_EXIT_S": "0",
        "RUNFLOW_HTTP_PORT": "0",
        "RUNFLOW_CACHE_DIR": str(tmp_path / "cache"),
        "RUNFLOW_STORAGE_URL": (tmp_path / "outputs").as_uri(),
        "RUNFLOW_COMFYUI_DIR": str(comfy),
        "RUNFLOW_RUNNER_ENTRY": SERVE_CHILD,
        "RUNFLOW_LOG_LEVEL": "INFO",
        # The test child reports by writing marks next to the test and can kill its worker
        # (a poison run): both reach outside any sandbox, by design. The sandboxed daemon
        # has its own tests (tests/serve/test_sandboxed_serve.py, tests/runtime/test_sandbox_*.py).
        "RUNFLOW_SANDBOX": "none",
    })
    return env


@pytest.fixture
def spawn_worker(worker_env: dict[str, str], tmp_path: Path
                 ) -> Iterator[Callable[..., WorkerProcess]]:
    """Start worker processes: ``spawn_worker("--burst", env={"RUNFLOW_LEASE_S": "2"})``."""
    started: list[WorkerProcess] = []

    def spawn(*args: str, env: dict[str, str] | None = None) -> WorkerProcess:
        n = len(started)
        w = WorkerProcess({**worker_env, **(env or {})}, tmp_path / f"worker-{n}.log", *args)
        started.append(w)
        return w

    yield spawn
    for w in started:
        if w.alive():
            w.signal(signal.SIGKILL)
        w.stop()


@pytest.fixture
def inprocess_worker(tmp_path: Path, redis_server: RedisServer
                     ) -> Iterator[Callable[..., InProcessWorker]]:
    """Start ``Worker`` threads with settings overrides (and a ``storage``, a Redis
    ``client``, a ``before_start(worker)`` hook); stopped at teardown."""
    started: list[InProcessWorker] = []

    def start(*, burst: bool = False, callbacks: Any = None, http_port: int = 0,
              gpu_class: str = "cpu", storage: Any = None, client: Any = None,
              before_start: Callable[[Any], None] | None = None,
              **overrides: Any) -> InProcessWorker:
        worker = make_worker(redis_server.url, tmp_path, callbacks=callbacks,
                             http_port=http_port, gpu_class=gpu_class, storage=storage,
                             client=client, **overrides)
        if before_start is not None:
            before_start(worker)
        w = InProcessWorker(worker, burst=burst)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()
