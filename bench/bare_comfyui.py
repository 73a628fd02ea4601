"""Bare in-process ComfyUI: the baseline ``bench_serve.py`` measures the worker against.

A plain process that imports ComfyUI the way its own ``main.py`` does (no HTTP server, no
worker, no Runflow node pack) and runs graphs with ``PromptExecutor.execute`` after
``validate_prompt``, as ComfyUI's prompt worker does for a prompt POSTed to its server.
The caller's image is written into ComfyUI's input folder (what an upload to
``/upload/image`` does) and read back by ``LoadImage``; ``SaveImage`` writes the result.
Both are removed after the run, outside its timings, so the folders ComfyUI lists stay as
small as the worker's per-run ones (a bare ComfyUI server's would grow by a file a run).

Driven by one JSON object per line on stdin, answered by one per line on stdout:

    {"graph": {...}, "image": "<base64 PNG>", "name": "in-7.png"}
    -> {"ok": true, "ms": {"input": .., "validate": .., "execute": .., "total": ..}}

The first line on stdout is ``{"ready": true, "init_s": ...}`` once ComfyUI is initialised.

    python bench/bare_comfyui.py COMFYUI_DIR BASE_DIR [--models KIND=DIR ...]

Timings are taken inside this process, around exactly ComfyUI's own work and the input
write: the pipe to the bench adds nothing to them.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any


class _Server:
    """The few attributes of ``server.PromptServer.instance`` that execution reads."""

    def __init__(self) -> None:
        from aiohttp import web

        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.sockets_metadata: dict[str, Any] = {}
        self.routes = web.RouteTableDef()
        self.supports: set[str] = set()

    def send_sync(self, event: str, data: Any, sid: str | None = None) -> None:
        """Events go nowhere: a bare run has no client."""

    def send_progress_text(self, text: str, node_id: str | None, sid: str | None = None) -> None:
        """Likewise."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("comfyui_dir", type=Path)
    parser.add_argument("base_dir", type=Path)
    parser.add_argument("--models", action="append", default=[],
                        help="KIND=DIR: an extra model folder (e.g. upscale_models=/x)")
    args = parser.parse_args()
    start = time.perf_counter()
    out = sys.stdout
    sys.stdout = sys.stderr  # ComfyUI prints; the protocol owns stdout

    sys.path.insert(0, str(args.comfyui_dir.resolve()))
    import torch
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = not torch.cuda.is_available()
    comfy_args.base_directory = str(args.base_dir)
    # isort: off
    # ComfyUI's `utils` package before anything can shadow it with comfy/utils.py
    # (docs/runtime.md): never let a sorter move this.
    import utils.extra_config  # noqa: F401
    import folder_paths
    import server
    # isort: on

    server.PromptServer.instance = srv = _Server()
    import execution
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    for entry in args.models:
        kind, _, directory = entry.partition("=")
        folder_paths.add_model_folder_path(kind, directory, is_default=True)
    input_dir = Path(folder_paths.get_input_directory())
    input_dir.mkdir(parents=True, exist_ok=True)
    output_dir = Path(folder_paths.get_output_directory())
    executor = execution.PromptExecutor(srv, cache_type=execution.CacheType.CLASSIC)

    def reply(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    reply({"ready": True, "init_s": round(time.perf_counter() - start, 3)})
    for line in sys.stdin:
        job = json.loads(line)
        t0 = time.perf_counter()
        (input_dir / job["name"]).write_bytes(base64.b64decode(job["image"]))
        t1 = time.perf_counter()
        prompt_id = uuid.uuid4().hex
        graph = copy.deepcopy(job["graph"])  # ComfyUI writes into the dict it is given
        valid = asyncio.run(execution.validate_prompt(prompt_id, graph, None))
        t2 = time.perf_counter()
        if not valid[0]:
            reply({"ok": False, "error": valid[1], "node_errors": valid[3]})
            continue
        executor.execute(graph, prompt_id, {}, valid[2])
        t3 = time.perf_counter()
        ok = bool(executor.success)
        reply({"ok": ok, "error": None if ok else str(executor.status_messages[-1:]),
               "ms": {"input": (t1 - t0) * 1000, "validate": (t2 - t1) * 1000,
                      "execute": (t3 - t2) * 1000, "total": (t3 - t0) * 1000}})
        # Untimed: the run's input and outputs go, as the worker's per-run folders do.
        # Left there, LoadImage's validation (it lists the input folder) and SaveImage (it
        # lists the output folder for its counter) would slow by a file every run.
        (input_dir / job["name"]).unlink(missing_ok=True)
        shutil.rmtree(output_dir, ignore_errors=True)
        output_dir.mkdir(parents=True, exist_ok=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
