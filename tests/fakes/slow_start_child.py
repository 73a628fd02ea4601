"""A fake ComfyUI child whose start takes a minute (for interrupting the environment phase)."""

from __future__ import annotations

from typing import Any

from tests.fakes import fake_child


def main(conn: Any, config: dict[str, Any]) -> None:
    fake_child.main(conn, {**config, "env": {**(config.get("env") or {}),
                                             "fake_init_delay_s": "60"}})
