"""A trusted child that only checks the device ComfyUI would use: torch imports, CUDA works.

Started by the worker (``run.fitness``) after a ComfyUI start failed, through the same
``spawn`` (and so the same sandbox and scrubbed environment) as the ComfyUI child, but with
nothing untrusted on its path: no custom node, no environment packages. Its answer is the
worker's own finding, which a custom node cannot forge: if this fails too, the fault is the
machine's (no usable CUDA, a driver too old for the image's CUDA, a broken torch), not the
run's. It speaks the runner protocol: ``Ready`` or ``InitFailed``, then waits for
``Shutdown``.
"""

from __future__ import annotations

import time
import traceback
from typing import Any

from runflow_worker.runtime import protocol as p
from runflow_worker.runtime.child import make_sender


def check_device(cpu: bool | None) -> tuple[str, str | None]:
    """Import torch and, unless on the CPU, initialise CUDA and run one kernel on GPU 0.

    Returns ``(device, gpu_model)``; raises whatever torch raises.
    """
    import torch

    if cpu is None:
        cpu = not torch.cuda.is_available()
    if cpu:
        torch.zeros(1).add_(1)
        return "cpu", None
    torch.cuda.init()
    torch.zeros(1, device="cuda").add_(1)
    torch.cuda.synchronize()
    return "cuda", torch.cuda.get_device_name()


def main(conn: Any, config: dict[str, Any]) -> None:
    """Entry point (``runtime.devicecheck:main``): report the device, wait for Shutdown."""
    send = make_sender(conn)
    start = time.perf_counter()
    try:
        device, gpu_model = check_device(config.get("cpu"))
    except BaseException as exc:  # noqa: BLE001 - the finding itself, sent to the parent
        send(p.InitFailed(f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        return
    send(p.Ready(comfyui_commit=None, node_count=0, import_failures=(),
                 init_s=time.perf_counter() - start, device=device, gpu_model=gpu_model))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if isinstance(msg, p.Shutdown):
            return
