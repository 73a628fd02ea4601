"""A fake ComfyUI child that forks a long-sleeping helper first, as a custom node using a
fork-based ``multiprocessing`` pool or DataLoader workers does, then serves jobs like
``fake_child`` (a ``FakeCrash`` node makes it SIGKILL itself while the helper lives).

The helper holds the child's end of the channel and its output pipe (a fork inherits
every descriptor), so neither tells the runner of the child's death (its pidfd does). The config ``env`` key
``fake_helper_pidfile`` names the file the helper's pid is written to (a test kills it
there should the runner have failed to).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from tests.fakes import fake_child

HELPER_S = 60.0


def main(conn: Any, config: dict[str, Any]) -> None:
    pidfile = Path((config.get("env") or {})["fake_helper_pidfile"])
    pid = os.fork()  # before fake_child starts its threads
    if pid == 0:
        try:
            time.sleep(HELPER_S)  # a pool worker waiting for work; bounded for safety
        finally:
            os._exit(0)
    tmp = pidfile.with_name(pidfile.name + ".tmp")
    tmp.write_text(str(pid))
    os.replace(tmp, pidfile)
    fake_child.main(conn, config)
