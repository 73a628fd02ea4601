"""A fake ComfyUI child whose start waits until the file ``gate`` exists in the directory
configured as its ComfyUI checkout (a test opens the gate from elsewhere in the run; a
file, not an environment variable: the child gets no ``RUNFLOW_*`` variables)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tests.fakes import fake_child


def main(conn: Any, config: dict[str, Any]) -> None:
    gate = Path(config["comfyui_dir"]) / "gate"
    while not gate.exists():  # another process's event: polled, 10 ms at a time
        time.sleep(0.01)
    fake_child.main(conn, config)
