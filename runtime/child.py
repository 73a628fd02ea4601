"""Entry point of the spawned ComfyUI child: initialise, then serve jobs from the pipe.

The main thread executes jobs (ComfyUI is not thread-safe); a reader thread receives
``Interrupt`` and ``Shutdown`` while a job runs. ComfyUI's stdout chatter goes to stderr
so the parent's stdout stays clean (the ``run`` CLI prints the record there).
"""

from __future__ import annotations

import gc
import os
import queue
import sys
import threading
import traceback
from typing import Any

from runtime import protocol as p

IDLE_COLLECT_AFTER_S = 2.0


def main(conn: Any, config: dict[str, Any]) -> None:
    """Run the child until Shutdown or the parent disappears."""
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for key, value in (config.get("env") or {}).items():
        os.environ[key] = value
    send_lock = threading.Lock()

    def send(msg: Any) -> None:
        with send_lock:
            conn.send(msg)

    try:
        from runtime.comfy import ComfyEmbedding

        embedding = ComfyEmbedding(config)
        ready = embedding.init()
    except BaseException as exc:  # noqa: BLE001 - report, then exit: the parent marks us DEFUNCT
        send(p.InitFailed(f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        return
    # Objects alive after init live for the whole process: keep them out of every future
    # collection so a GC pause never lands on a run.
    gc.collect()
    gc.freeze()
    send(ready)

    jobs: queue.Queue[p.Execute | None] = queue.Queue()

    def reader() -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                jobs.put(None)
                return
            if isinstance(msg, p.Execute):
                jobs.put(msg)
            elif isinstance(msg, p.Interrupt):
                embedding.interrupt(msg.job_id)
            elif isinstance(msg, p.Shutdown):
                jobs.put(None)
                return

    threading.Thread(target=reader, name="runflow-pipe-reader", daemon=True).start()
    dirty = False
    while True:
        try:
            job = jobs.get(timeout=IDLE_COLLECT_AFTER_S if dirty else None)
        except queue.Empty:
            embedding.collect_idle()
            dirty = False
            continue
        if job is None:
            break
        try:
            outcome = embedding.execute(job, send)
        except Exception as exc:  # noqa: BLE001 - a bug here must not kill a warm ComfyUI
            outcome = p.Failed(job.job_id, p.FailureKind.INTERNAL,
                               f"{type(exc).__name__}: {exc}",
                               details={"traceback": traceback.format_exc()[-4000:]})
        send(outcome)
        dirty = True
    conn.close()
