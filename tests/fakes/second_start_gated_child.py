"""The serve tests' fake child (``serve_child``), counting its starts in ``<checkout>/starts``;
the second start waits for ``<checkout>/gate`` (another process's event: polled)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tests.fakes import serve_child


def main(conn: Any, config: dict[str, Any]) -> None:
    """Entry point (``tests.fakes.second_start_gated_child:main``)."""
    checkout = Path(config["comfyui_dir"])
    with open(checkout / "starts", "a") as fh:
        fh.write("start\n")
    if len((checkout / "starts").read_text().splitlines()) >= 2:
        while not (checkout / "gate").exists():
            time.sleep(0.01)
    serve_child.main(conn, config)
