"""Workers for the serve tests: ``runflow-worker serve`` as a subprocess, and a ``Worker``
running in a thread of the test process (no signals, inspectable)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from tests.fakes import SERVE_CHILD
from tests.support.paths import REPO
from tests.support.pipelines import make_pipeline


class WorkerProcess:
    """``python -m runflow_worker.cli.main serve ...`` (the console script's module) as a
    subprocess."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runflow_worker.cli.main", "serve", *args],
            cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)

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


def make_worker(redis_url: str, root: Path, *, child_entry: str = SERVE_CHILD,
                cpu: bool = True, child_sandbox: bool | None = None, storage: Any = None,
                gpu_class: str = "cpu", callbacks: Any = None, http_port: int = 0,
                client: Any = None, **overrides: Any) -> Any:
    """A ``Worker`` (not started) on ``redis_url`` whose pipeline runs ``child_entry`` (the
    serve tests' fake child unless told; on the CPU unless ``cpu`` is False) on the checkout
    ``root/comfyui``, with its cache in ``root/cache``, run directories in ``root/work`` and
    outputs in ``root/outputs`` (unless ``storage``), on its own Redis client unless
    ``client``. ``overrides`` are settings fields
    (the defaults: a lease of 1 s, a grace of 5 s, no idle exit, no health port);
    ``child_sandbox`` runs the child sandboxed or not (None: as the settings say)."""
    from runflow_worker.run.storage import LocalStorage
    from runflow_worker.serve.daemon import Worker
    from runflow_worker.settings import Settings

    fields: dict[str, Any] = {"redis_url": redis_url, "lease_s": 1.0, "grace_s": 5.0,
                              "idle_exit_s": 0.0, "http_port": 0, "cache_dir": root / "cache"}
    fields.update(overrides)
    settings = Settings(**fields)
    comfy = root / "comfyui"
    comfy.mkdir(exist_ok=True)
    sandbox = settings.sandboxed if child_sandbox is None else child_sandbox
    pipeline = make_pipeline(root, comfyui_dir=comfy, cpu=cpu, child_entry=child_entry,
                             sandbox=sandbox, storage=storage or LocalStorage(root / "outputs"))
    return Worker(settings, pipeline, gpu_class=gpu_class, callbacks=callbacks,
                  http_port=http_port, client=client)


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
