"""The real child's main loop (``runtime.child.main``) around a stand-in for ComfyUI: what
the child does with a job's events, without ComfyUI.

A job's graph says what its one node does: ``{"events": N}`` reports N node starts and
returns; ``{"events": N, "until_interrupted": true}`` reports them, then waits for the
parent's interrupt (the channel's reader thread delivers it) and ends interrupted.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from runflow_worker.runtime import comfy
from runflow_worker.runtime import protocol as p


class StandInEmbedding:
    """What ``runtime.child.main`` needs of ``ComfyEmbedding``."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.interrupted = threading.Event()

    def init(self) -> p.Ready:
        return p.Ready(comfyui_commit=None, node_count=1, import_failures=(), init_s=0.0,
                       device="cpu")

    def execute(self, job: p.Execute, send: Callable[[Any], None]) -> p.Done | p.Failed:
        self.interrupted.clear()
        spec = job.graph["1"]
        for n in range(int(spec["events"])):
            send(p.NodeStarted(job.job_id, str(n), "StandIn"))
        if spec.get("until_interrupted"):
            self.interrupted.wait(60)
            return p.Failed(job.job_id, p.FailureKind.INTERRUPTED, "interrupted")
        return p.Done(job.job_id, (), 0.0, None)

    def interrupt(self, job_id: str) -> None:
        self.interrupted.set()

    def collect_idle(self) -> None:
        pass


def main(conn: Any, config: dict[str, Any]) -> None:
    comfy.ComfyEmbedding = StandInEmbedding  # type: ignore[misc,assignment]
    from runflow_worker.runtime import child

    child.main(conn, config)
