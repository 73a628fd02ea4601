"""Entry point of the spawned ComfyUI child: initialise, then serve jobs from the pipe.

The main thread executes jobs (ComfyUI is not thread-safe); a reader thread receives
``Interrupt`` and ``Shutdown`` while a job runs. ComfyUI's stdout chatter goes to stderr
so the parent's stdout stays clean (the ``run`` CLI prints the record there); its logging
writes JSON lines tagged with the job's run id (``runtime.childlog``, installed by
``runtime.spawn`` before this module is imported). The process environment was scrubbed
of credentials at spawn (``cache.commands.child_environment``).
"""

from __future__ import annotations

import gc
import os
import queue
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

from runtime import childlog
from runtime import protocol as p

IDLE_COLLECT_AFTER_S = 2.0


def make_sender(conn: Any) -> Callable[[Any], None]:
    """A thread-safe ``send`` that writes only plain data (``protocol.plain_message``).

    Plain data because the parent cannot unpickle what it cannot import: a validation
    error's ``input_config`` may hold an object of a custom node's own class.
    """
    lock = threading.Lock()

    def send(msg: Any) -> None:
        msg = p.plain_message(msg)
        with lock:
            conn.send(msg)

    return send


def main(conn: Any, config: dict[str, Any]) -> None:
    """Run the child until Shutdown or the parent disappears."""
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    send = make_sender(conn)

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
        childlog.set_job(job.job_id)
        try:
            outcome = embedding.execute(job, send)
        except Exception as exc:  # noqa: BLE001 - a bug here must not kill a warm ComfyUI
            outcome = p.Failed(job.job_id, p.FailureKind.INTERNAL,
                               f"{type(exc).__name__}: {exc}",
                               details={"traceback": traceback.format_exc()[-4000:]})
        finally:
            childlog.set_job(None)
        send(outcome)
        dirty = True
    conn.close()
