"""Fixtures of the serve tests: a real redis-server, worker processes and in-process workers.

``redis_server`` is one ``redis-server`` per session on a free loopback port, without
persistence (``--save "" --appendonly no``), that a test can stop and restart on the same
port. Every test starts from an empty database. Workers run the fake ComfyUI child of
``tests.serve.child``; tests wait on conditions with deadlines, never on fixed sleeps.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from runflow_worker.run.contract import parse_message
from runflow_worker.serve import keys
from runflow_worker.serve.submit import enqueue_message
from tests import factories

REPO_ROOT = Path(__file__).resolve().parents[2]
CHILD_ENTRY = "tests.serve.child:main"
REDIS_BIN = shutil.which("redis-server") or "redis-server"


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str = "condition",
             interval_s: float = 0.02) -> Any:
    """Poll ``condition`` until it returns a truthy value; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


class RedisServer:
    """A redis-server subprocess on a fixed port that can be restarted (losing its data)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        self.proc = subprocess.Popen(
            [REDIS_BIN, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        try:
            wait_for(lambda: self._pings(client), 10, "redis-server to answer PING")
        finally:
            client.close()

    @staticmethod
    def _pings(client: redis.Redis) -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        """Kill the server (its data is gone)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def restart(self) -> None:
        """Stop and start again on the same port."""
        self.stop()
        self.start()


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


# --------------------------------------------------------------------------- runs


def graph(*, sleep_s: float = 0.0, mark: Path | None = None, tag: str = "",
          extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fake workflow: a string input saved as output ``out``, optionally slowed or marked."""
    g: dict[str, Any] = {
        "1": {"class_type": "RunflowInputString", "inputs": {"input_id": "prompt"}},
    }
    if mark is not None:
        g["5"] = {"class_type": "TestMark", "inputs": {"path": str(mark), "tag": tag}}
    if sleep_s:
        g["6"] = {"class_type": "FakeSleep", "inputs": {"seconds": sleep_s}}
    g.update(extra or {})
    g["9"] = {"class_type": "FakeSave", "inputs": {"text": ["1", 0], "output_id": "out"}}
    return g


def submit(client: redis.Redis, run_id: str, g: dict[str, Any] | None = None, *,
           gpu_class: str = "cpu", **overrides: Any) -> str:
    """Enqueue a run the way ``runflow-worker submit`` does; return the run id."""
    overrides.setdefault("input", {"prompt": f"hello {run_id}"})
    msg = parse_message(factories.message(g or graph(), run_id=run_id, **overrides))
    enqueue_message(client, msg, gpu_class, events_maxlen=100_000)
    return run_id


def run_cli(argv: list[str], redis_url: str, monkeypatch: pytest.MonkeyPatch,
            capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``runflow-worker ARGV`` in this process against ``redis_url``: (code, out, err)."""
    from runflow_worker.cli.main import main

    monkeypatch.setenv("RUNFLOW_REDIS_URL", redis_url)
    monkeypatch.setenv("RUNFLOW_GPU_CLASS", "cpu")
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def record(client: redis.Redis, run_id: str) -> dict[str, Any] | None:
    """The run record as a dict, or None."""
    raw = client.get(keys.run_record(run_id))
    return json.loads(raw) if raw else None


def status_of(client: redis.Redis, run_id: str) -> str | None:
    """The record's status, or None."""
    rec = record(client, run_id)
    return rec["status"] if rec else None


def is_terminal(client: redis.Redis, run_id: str) -> bool:
    """True once the run's record is succeeded, failed or canceled."""
    return status_of(client, run_id) in ("succeeded", "failed", "canceled")


def events(client: redis.Redis, run_id: str | None = None) -> list[dict[str, Any]]:
    """Events (of one run, or all), oldest first, with ``data`` decoded."""
    out = []
    for entry_id, fields in client.xrange(keys.EVENTS_STREAM):
        if run_id is None or fields.get("run_id") == run_id:
            out.append({**fields, "id": entry_id, "data": json.loads(fields.get("data", "{}"))})
    return out


def terminal_events(client: redis.Redis, run_id: str) -> list[dict[str, Any]]:
    """The run's status events with a terminal status."""
    return [e for e in events(client, run_id) if e["type"] == "status"
            and e["status"] in ("succeeded", "failed", "canceled")]


def fence_value(client: redis.Redis, run_id: str) -> int:
    """How many pickups the run had (its fencing counter)."""
    return int(client.get(keys.fence(run_id)) or 0)


# --------------------------------------------------------------------------- workers


@pytest.fixture
def worker_env(tmp_path: Path, redis_server: RedisServer) -> dict[str, str]:
    """Environment of a worker process (no RUNFLOW_* leaks in from outside)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNFLOW_")}
    comfy = tmp_path / "comfyui"
    comfy.mkdir(exist_ok=True)
    env.update({
        "PYTHONPATH": str(REPO_ROOT),
        "RUNFLOW_REDIS_URL": redis_server.url,
        "RUNFLOW_GPU_CLASS": "cpu",
        "RUNFLOW_LEASE_S": "1",
        "RUNFLOW_GRACE_S": "10",
        "RUNFLOW_IDLE_EXIT_S": "0",
        "RUNFLOW_HTTP_PORT": "0",
        "RUNFLOW_CACHE_DIR": str(tmp_path / "cache"),
        "RUNFLOW_STORAGE_URL": (tmp_path / "outputs").as_uri(),
        "RUNFLOW_COMFYUI_DIR": str(comfy),
        "RUNFLOW_RUNNER_ENTRY": CHILD_ENTRY,
        "RUNFLOW_LOG_LEVEL": "INFO",
        # The test child reports by writing marks next to the test and can kill its worker
        # (a poison run): both reach outside any sandbox, by design. The sandboxed daemon
        # has its own tests (tests/serve/test_sandboxed_serve.py, tests/runtime/test_sandbox_*.py).
        "RUNFLOW_SANDBOX": "none",
    })
    return env


class WorkerProcess:
    """``python -m runflow_worker.cli.main serve ...`` (the console script's module) as a subprocess."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runflow_worker.cli.main", "serve", *args],
            cwd=REPO_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        """The worker's pid."""
        return self.proc.pid

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the worker (not to its child)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def wait(self, timeout_s: float) -> int:
        """Wait for the exit code."""
        return self.proc.wait(timeout_s)

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc.poll() is None

    def log_lines(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far (other lines skipped)."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def logged(self, event: str) -> list[dict[str, Any]]:
        """Log lines with ``event``."""
        return [line for line in self.log_lines() if line.get("event") == event]

    def stop(self) -> None:
        """Kill the worker if it still runs, and close its log."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


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


class InProcessWorker:
    """A ``Worker`` running in a thread of the test process (no signals, inspectable)."""

    def __init__(self, worker: Any, *, burst: bool = False) -> None:
        self.worker = worker
        self.exit_code: int | None = None
        self.thread = threading.Thread(target=self._run, args=(burst,), daemon=True)
        self.thread.start()

    def _run(self, burst: bool) -> None:
        self.exit_code = self.worker.work(burst=burst)

    def stop(self, timeout_s: float = 20) -> None:
        """Ask for a warm stop and wait for the thread."""
        self.worker.shutdown.request_warm(self.worker.settings.grace_s)
        self.thread.join(timeout_s)
        self.worker.pipeline.close()


@pytest.fixture
def inprocess_worker(tmp_path: Path, redis_server: RedisServer
                     ) -> Iterator[Callable[..., InProcessWorker]]:
    """Start ``Worker`` threads with settings overrides (and a ``storage``, a Redis
    ``client``, a ``before_start(worker)`` hook); stopped at teardown."""
    from runflow_worker.run.pipeline import Pipeline, PipelineConfig
    from runflow_worker.run.storage import LocalStorage
    from runflow_worker.serve.daemon import Worker
    from runflow_worker.settings import Settings

    started: list[InProcessWorker] = []

    def start(*, burst: bool = False, callbacks: Any = None, http_port: int = 0,
              gpu_class: str = "cpu", storage: Any = None, client: Any = None,
              before_start: Callable[[Any], None] | None = None,
              **overrides: Any) -> InProcessWorker:
        fields: dict[str, Any] = {"redis_url": redis_server.url, "lease_s": 1.0,
                                  "grace_s": 5.0, "idle_exit_s": 0.0, "http_port": 0,
                                  "cache_dir": tmp_path / "cache"}
        fields.update(overrides)
        settings = Settings(**fields)
        comfy = tmp_path / "comfyui"
        comfy.mkdir(exist_ok=True)
        pipeline = Pipeline(PipelineConfig(work_dir=tmp_path / "work", comfyui_dir=comfy,
                                           cpu=True, child_entry=CHILD_ENTRY,
                                           sandbox=settings.sandboxed),
                            storage=storage or LocalStorage(tmp_path / "outputs"), blobs=None,
                            fetch_input=None)
        worker = Worker(settings, pipeline, gpu_class=gpu_class, callbacks=callbacks,
                        http_port=http_port, client=client)
        if before_start is not None:
            before_start(worker)
        w = InProcessWorker(worker, burst=burst)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()
