"""A ComfyUI child that loads ComfyUI's built-in extra nodes at start (as ComfyUI does),
for comparing with the deferred loading of the real child (``runtime.builtinnodes``)."""

from __future__ import annotations

from typing import Any

from runflow_worker.runtime import child


def main(conn: Any, config: dict[str, Any]) -> None:
    """``runtime.child.main`` with ``defer_builtin_nodes`` off."""
    child.main(conn, {**config, "defer_builtin_nodes": False})
