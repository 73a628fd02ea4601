"""A fake ComfyUI child whose start fails while the file ``fail-start`` exists in the
directory configured as its ComfyUI checkout (it exits 1 before Ready); a test removes the
file to let the next start succeed (the sandboxed child cannot remove it itself)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tests.fakes import fake_child


def main(conn: Any, config: dict[str, Any]) -> None:
    if (Path(config["comfyui_dir"]) / "fail-start").exists():
        sys.exit(1)
    fake_child.main(conn, config)
