"""Run by ``test_real_builtin_nodes.py`` in a fresh interpreter: initialise real ComfyUI
(``runtime.comfy.ComfyEmbedding``), eager or deferred, and print its node registry.

    python builtin_registry.py COMFYUI_DIR BASE_DIR eager|deferred [SEED]

Deferred: every name the eager registry holds (given on stdin, one JSON list) is settled
one at a time in an order shuffled by SEED; printed: the registry then (``settled``), what
the deferred loading saw (how often it had to load everything; once every file is loaded,
the names each file registered that its source does not spell out as a quoted literal),
and the registry with every file loaded.
"""

from __future__ import annotations

import json
import os
import random
import sys
from typing import Any


def registry(nodes: Any) -> dict[str, Any]:
    """Each registered name -> the module and qualified name of its class; display names."""
    return {"classes": {name: f"{cls.__module__}:{cls.__qualname__}"
                        for name, cls in nodes.NODE_CLASS_MAPPINGS.items()},
            "display_names": dict(nodes.NODE_DISPLAY_NAME_MAPPINGS)}


def main() -> int:
    comfy, base, mode = sys.argv[1:4]
    out = sys.stdout
    sys.stdout = sys.stderr  # ComfyUI prints
    from runflow_worker.runtime.comfy import ComfyEmbedding

    emb = ComfyEmbedding({"comfyui_dir": comfy, "base_dir": base, "cpu": True,
                          "custom_node_dirs": [os.path.join(comfy, "custom_nodes")],
                          "defer_builtin_nodes": mode == "deferred"})
    emb.init()
    result: dict[str, Any] = {}
    if mode == "deferred":
        deferred = emb.builtins
        assert deferred is not None
        result["pending_at_start"] = deferred.pending
        names = json.loads(sys.stdin.read())
        random.Random(int(sys.argv[4])).shuffle(names)
        for name in names:
            deferred.settle([name])
        result["pending_after"] = deferred.pending
        result["full_loads"] = deferred.full_loads
        result["settled"] = registry(emb._nodes)
        deferred.load_all()
        unspelled = {}
        for index, names_of_file in deferred._registered.items():
            path = deferred._calls[index][0][0]
            with open(path, "rb") as fh:
                source = fh.read()
            missing = [n for n in names_of_file
                       if f'"{n}"'.encode() not in source and f"'{n}'".encode() not in source]
            if missing:
                unspelled[os.path.basename(path)] = missing
        result["unspelled"] = unspelled
    out.write(json.dumps({**result, **registry(emb._nodes)}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
