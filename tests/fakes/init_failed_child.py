"""A ComfyUI child whose start fails the way a custom node that does not import makes it
fail: it answers ``InitFailed`` at once (the device works, so the fault is the run's)."""

from __future__ import annotations

from typing import Any


def main(conn: Any, config: dict[str, Any]) -> None:
    """Entry point (``tests.fakes.init_failed_child:main``)."""
    from runflow_worker.runtime import protocol as p
    from runflow_worker.runtime.child import make_sender

    make_sender(conn)(p.InitFailed("ImportError: No module named 'evil_pack'", ""))
