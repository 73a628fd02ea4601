"""CI guard for the ComfyUI init order in runflow_worker/runtime/comfy.py (real ComfyUI is not in CI).

An import sorter once moved ``utils.extra_config`` below ``server``: ComfyUI then failed to
start with "'utils' is not a package". The order is checked here on the source itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

SOURCE = Path(__file__).parents[2] / "runflow_worker" / "runtime" / "comfy.py"


def _import_order() -> list[str]:
    tree = ast.parse(SOURCE.read_text())
    init = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "init")
    names: list[str] = []
    for node in ast.walk(init):
        if isinstance(node, ast.Import):
            names += [(a.name, node.lineno) for a in node.names]  # type: ignore[misc]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append((node.module, node.lineno))  # type: ignore[arg-type]
    return [name for name, _ in sorted(names, key=lambda item: item[1])]


def test_comfyui_init_order() -> None:
    order = _import_order()
    pos = {name: order.index(name) for name in
           ("comfy.cli_args", "utils.extra_config", "folder_paths", "server", "nodes",
            "comfy.model_management", "execution")}
    # cli args before anything reads them; ComfyUI's utils package before anything that
    # can shadow it; our server object is installed before node modules import.
    assert pos["comfy.cli_args"] < pos["utils.extra_config"] < pos["folder_paths"]
    assert pos["utils.extra_config"] < pos["server"] < pos["nodes"]
    assert pos["folder_paths"] < pos["comfy.model_management"]
    assert pos["server"] < pos["execution"]
