"""Entry point of the spawned ComfyUI child: initialise, then serve jobs from the channel.

The main thread executes jobs (ComfyUI is not thread-safe); a reader thread receives
``Interrupt`` and ``Shutdown`` while a job runs. ``ChildEnd`` is the child's end of the
channel (``runtime.wire`` frames, ``runtime.protocol`` messages). ComfyUI's stdout chatter
goes to stderr, a pipe the parent re-emits as log records (``runtime.logrelay``); its
logging writes JSON lines (``runtime.childlog``, installed by ``runtime.spawn`` before this
module is imported). The process environment was scrubbed of credentials at spawn
(``cache.commands.child_environment``).
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

from runflow_worker.runtime import childlog
from runflow_worker.runtime import protocol as p
from runflow_worker.runtime.errors import ProtocolError
from runflow_worker.runtime.wire import Channel, ChannelClosed, WireError

IDLE_COLLECT_AFTER_S = 2.0


class ChildEnd:
    """The child's end of the channel: protocol messages in, protocol messages out."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._lock = threading.Lock()

    def fileno(self) -> int:
        """The channel's socket."""
        return self._channel.fileno()

    def recv(self) -> p.ParentMessage:
        """The parent's next message; ChannelClosed once the parent is gone."""
        obj = self._channel.recv()
        assert obj is not None  # a blocking recv
        return p.parent_message(obj)

    def send(self, msg: p.ChildMessage) -> None:
        """Write ``msg`` as plain data cut to the channel's limits (thread-safe).

        Plain data (``protocol.fit_child_message``, encoded once) because a validation error's
        ``input_config`` may hold an object of a custom node's own class, and a long
        traceback or file list must not make the parent drop the child.
        """
        payload = p.child_payload(msg)
        with self._lock:
            self._channel.send_payload(payload)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()


def make_sender(conn: Any) -> Callable[[Any], None]:
    """The ``send`` of ``conn`` (a ``ChildEnd``: thread-safe, plain data only)."""
    return conn.send


def main(conn: Any, config: dict[str, Any]) -> None:
    """Run the child until Shutdown or the parent disappears."""
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    send = make_sender(conn)

    try:
        from runflow_worker.runtime.comfy import ComfyEmbedding

        embedding = ComfyEmbedding(config)
        ready = embedding.init()
    except BaseException as exc:  # noqa: BLE001 - report, then exit: the parent marks us DEFUNCT
        send(p.InitFailed(f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        return
    # Objects alive after init live for the whole process: keep them out of every future
    # collection so a GC pause never lands on a run. No collection first: with ComfyUI
    # loaded it takes 0.25-0.4 s of the start and finds a handful of objects to free.
    gc.freeze()
    send(ready)

    # SimpleQueue: the reader's hand-off of a job to this thread is on every run's path.
    jobs: queue.SimpleQueue[p.Execute | None] = queue.SimpleQueue()

    def reader() -> None:
        while True:
            try:
                msg = conn.recv()
            except (ChannelClosed, WireError, ProtocolError, OSError):
                jobs.put(None)  # the parent is gone (or broke the channel): exit
                return
            if isinstance(msg, p.Execute):
                jobs.put(msg)
            elif isinstance(msg, p.Interrupt):
                embedding.interrupt(msg.job_id)
            elif isinstance(msg, p.Shutdown):
                jobs.put(None)
                return

    threading.Thread(target=reader, name="runflow-channel-reader", daemon=True).start()
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
