"""A fake ComfyUI child whose start waits until the file ``RUNFLOW_TEST_START_GATE`` names
exists (a test opens the gate from elsewhere in the run)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from tests.fakes import fake_child


def main(conn: Any, config: dict[str, Any]) -> None:
    gate = Path(os.environ["RUNFLOW_TEST_START_GATE"])
    while not gate.exists():  # another process's event: polled, 10 ms at a time
        time.sleep(0.01)
    fake_child.main(conn, config)
