"""The fake ComfyUI child of the serve tests: ``tests.fakes.fake_child`` plus three test nodes.

- ``TestMark``: when the job arrives, appends ``inputs["tag"]`` and a newline to
  ``inputs["path"]`` (one line per execution: the tests count executions with it).
- ``TestPid``: when the job arrives, writes the child's pid to ``inputs["path"]`` (which
  child ran the job).
- ``TestKillWorker``: when the job arrives, SIGKILLs the worker process (the child's parent):
  a run that takes its whole container down every time (a poison run).

All act before the fake child sees the job; the fake child ignores their node types.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from runflow_worker.runtime import protocol as p
from tests.fakes import fake_child


def _side_effects(job: p.Execute) -> None:
    nodes = list(job.graph.values())
    for node in nodes:
        if node.get("class_type") == "TestMark":
            inputs = node.get("inputs", {})
            with open(inputs["path"], "a") as fh:
                fh.write(f"{inputs['tag']}\n")
        if node.get("class_type") == "TestPid":
            with open(node["inputs"]["path"], "w") as fh:
                fh.write(str(os.getpid()))
    if any(node.get("class_type") == "TestKillWorker" for node in nodes):
        os.kill(os.getppid(), signal.SIGKILL)


class _Conn:
    """The child's end of the pipe, with a look at each job as it arrives."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def recv(self) -> Any:
        msg = self._conn.recv()
        if isinstance(msg, p.Execute):
            _side_effects(msg)
        return msg

    def send(self, msg: Any) -> None:
        self._conn.send(msg)


def main(conn: Any, config: dict[str, Any]) -> None:
    """Entry point (``tests.fakes.serve_child:main``)."""
    fake_child.main(_Conn(conn), config)
