"""How the CLI shows run events on stderr: one text line per event, bars for downloads."""

from __future__ import annotations

import sys
import threading
from typing import Any

from runflow_worker.run.failures import StopReason


def describe_event(kind: str | None, data: dict[str, Any]) -> str | None:
    """A one-line description of a progress or log event (None: nothing worth a line)."""
    if kind == "log":
        return f"  [{data.get('node_id')}] {data.get('message')}"
    if "step" in data:
        return f"  node {data.get('node_id')}: step {data['step']}/{data.get('total')}"
    if "node_type" in data:
        return f"node {data.get('node_id')} {data['node_type']}"
    if "bytes" in data:
        what = ", ".join(data.get("fields") or []) or data.get("sha256", "")[:12]
        return f"  {what}: {data['bytes']}/{data.get('total') or '?'} bytes"
    return None


class DownloadBars:
    """Rich progress bars on stderr, one per blob being downloaded."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                  DownloadColumn(), TransferSpeedColumn(),
                                  console=Console(file=sys.stderr), transient=False)
        self._tasks: dict[str, Any] = {}
        self._started = False

    def update(self, data: dict[str, Any]) -> None:
        """Advance the bar of ``data["sha256"]`` to ``data["bytes"]`` of ``data["total"]``."""
        if not self._started:
            self._progress.start()
            self._started = True
        sha = data.get("sha256", "")
        task = self._tasks.get(sha)
        if task is None:
            # "workflow.models.checkpoints/x.safetensors" -> "checkpoints/x.safetensors"
            name = ", ".join(f.split(".", 2)[-1] for f in data.get("fields") or []) or sha[:12]
            task = self._tasks[sha] = self._progress.add_task(name, total=data.get("total"))
        self._progress.update(task, completed=data["bytes"], total=data.get("total"))

    def close(self) -> None:
        """Stop drawing (leaves the final bars on screen)."""
        if self._started:
            self._progress.stop()
            self._started = False


class CliControl:
    """The ``RunControl`` of a command run by hand: Ctrl-C (``canceled``) cancels; download
    progress as bars, other events as lines on stderr (nothing with ``quiet``)."""

    def __init__(self, quiet: bool) -> None:
        self.canceled = threading.Event()
        self.quiet = quiet
        self.bars = DownloadBars()

    def stop_reason(self) -> StopReason | None:
        """CANCELED once ``canceled`` is set."""
        return StopReason.CANCELED if self.canceled.is_set() else None

    def admit(self) -> None:
        """Nothing to wait for: ``run`` has no queue to begin the run in."""

    def emit(self, kind: str, data: dict[str, Any]) -> None:
        """Show one event of the run."""
        if self.quiet:
            return
        if data.get("phase") == "models" and "bytes" in data:
            self.bars.update(data)
            return
        line = describe_event(kind, data)
        if line is not None:
            print(line, file=sys.stderr)
