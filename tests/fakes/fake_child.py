"""A stand-in for the ComfyUI child: speaks the runner protocol, executes toy graphs.

Nodes (``class_type``):
- ``FakeSave``: writes ``inputs["text"]`` (or the value of a linked Runflow input) to
  ``<output>/<prefix>_00001_.txt`` (``file:NAME`` / ``model:KEY`` read that input file or
  model instead, as does ``read: true`` with a linked input's file); an OUTPUT node
  (``output_id`` makes it a Runflow output).
- ``FakeSleep``: sleeps ``seconds`` in small steps, reporting progress; honours Interrupt.
- ``FakeBusy``: sleeps ``seconds`` ignoring interrupts (the runner must kill the child).
- ``FakeCrash``: the child kills itself with ``signal`` (default SIGKILL).
- ``FakeError`` / ``FakeOOM``: raise a node error / an out-of-memory failure.
- ``FakeUnknown``: validation error (unknown node type).
- ``FakeOddDetails``: a validation error whose details hold an object of a class only the
  child can import (like a custom node's ``AnyType``), sent the child's way (made plain).
- ``FakeLog``: logs ``inputs["text"]`` at error level, and an exception with its traceback.
- a custom node: the child imports every pack (``*.py`` file or package) of the config's
  ``custom_node_dirs`` at start, as ComfyUI does (packs that fail are the Ready's
  ``import_failures``); a node whose ``class_type`` a pack's ``NODE_CLASS_MAPPINGS`` has
  is called as ``cls().run(job=<the job's directories>, **inputs)``, and the text it
  returns is saved as an output like ``FakeSave``'s (None: the node made the file itself).
Runflow Input nodes pass their value through (an image input: its LoadImage's file). The
config ``env`` key ``fake_init_fail`` makes initialisation fail (and so does ``cpu: False``
where CUDA is unusable: the child initialises CUDA first, as ComfyUI does); ``fake_init_delay_s``
delays Ready; ``fake_wedged`` makes the child stop reading the channel after Ready (a
wedged ComfyUI). A pack that raises at import is reported in ``import_failures`` and
``import_errors`` (with its traceback).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import sys
import threading
import time
import traceback
import types
from pathlib import Path
from typing import Any

from runflow_worker.runtime import childlog
from runflow_worker.runtime import protocol as p
from runflow_worker.runtime.child import make_sender
from runflow_worker.runtime.errors import ProtocolError
from runflow_worker.runtime.wire import ChannelClosed, WireError

log = logging.getLogger("fake.node")


def main(conn: Any, config: dict[str, Any]) -> None:
    env = config.get("env") or {}
    send = make_sender(conn)
    if env.get("fake_init_fail"):
        send(p.InitFailed("fake init failure", "Traceback: fake"))
        return
    if config.get("cpu") is False:
        # Like ComfyUI told not to use the CPU: CUDA is initialised first, and fails the
        # start where there is no usable CUDA (as on the machines the tests run on).
        try:
            import torch

            torch.cuda.init()
        except Exception as exc:  # noqa: BLE001 - reported like ComfyUI's import error
            send(p.InitFailed(f"{type(exc).__name__}: {exc}", "Traceback: torch.cuda.init"))
            return
    time.sleep(float(env.get("fake_init_delay_s", 0)))
    errors = _load_packs(config.get("custom_node_dirs") or ())
    send(p.Ready(comfyui_commit="0" * 40, node_count=7, import_failures=tuple(errors),
                 init_s=0.0, device="cpu", gpu_model=None, import_errors=errors))
    if env.get("fake_wedged"):
        threading.Event().wait()  # never reads the channel again, until killed
    interrupted = threading.Event()
    jobs: list[p.Execute] = []
    cond = threading.Condition()

    def reader() -> None:
        while True:
            try:
                msg = conn.recv()
            except (ChannelClosed, WireError, ProtocolError, OSError):
                os._exit(0)
            if isinstance(msg, p.Interrupt):
                interrupted.set()
            elif isinstance(msg, p.Shutdown):
                os._exit(0)
            elif isinstance(msg, p.Execute):
                with cond:
                    jobs.append(msg)
                    cond.notify()

    threading.Thread(target=reader, daemon=True).start()
    while True:
        with cond:
            while not jobs:
                cond.wait()
            job = jobs.pop(0)
        interrupted.clear()
        childlog.set_job(job.job_id)
        try:
            outcome = _run(job, conn, send, interrupted)
        finally:
            childlog.set_job(None)
        send(outcome)


PACK_NODES: dict[str, Any] = {}


def _load_packs(dirs: Any) -> dict[str, str]:
    """Import each pack of ``dirs`` (as ComfyUI loads custom nodes); name -> traceback of
    each that failed."""

    failures: dict[str, str] = {}
    for root in dirs:
        if not os.path.isdir(root):
            continue
        for entry in sorted(os.listdir(root)):
            path = os.path.join(root, entry)
            init = os.path.join(path, "__init__.py") if os.path.isdir(path) else path
            if (entry.startswith((".", "__")) or not init.endswith(".py")
                    or not os.path.isfile(init)):
                continue
            try:
                spec = importlib.util.spec_from_file_location(f"fake_pack_{entry}", init)
                assert spec is not None and spec.loader is not None
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                PACK_NODES.update(getattr(module, "NODE_CLASS_MAPPINGS", {}))
            except Exception:  # noqa: BLE001 - a pack that fails is reported, as ComfyUI does
                log.exception("cannot import custom node %s", entry)
                failures[entry] = traceback.format_exc()
    return failures


def _value(graph: dict[str, Any], v: Any) -> Any:
    if isinstance(v, list) and len(v) == 2 and str(v[0]) in graph:
        src = graph[str(v[0])]
        if src.get("class_type") == "LoadImage":
            return src["inputs"].get("image")
        return _value(graph, src["inputs"].get("value"))
    return v


def _odd_failure(job: p.Execute, node_id: str) -> p.Failed:
    # A module only this process has, like a custom node's package.
    module = sys.modules.get("runflow_fake_child_only")
    if module is None:
        module = types.ModuleType("runflow_fake_child_only")
        exec("class AnyType(str):\n    pass\n", module.__dict__)  # noqa: S102 - test fake
        sys.modules[module.__name__] = module
    return p.Failed(job.job_id, p.FailureKind.INVALID_WORKFLOW, "bad input", node_id=node_id,
                    details={"errors": [{"extra_info": {
                        "input_config": (module.AnyType("*"), {"marker": module.AnyType})}}]})


def _run(job: p.Execute, conn: Any, send: Any,
         interrupted: threading.Event) -> p.Done | p.Failed:
    start = time.monotonic()
    outputs: list[p.OutputFile] = []
    for node_id, node in job.graph.items():
        kind, inputs = node["class_type"], node.get("inputs", {})
        if kind == "FakeUnknown":
            return p.Failed(job.job_id, p.FailureKind.INVALID_WORKFLOW,
                            f"Cannot execute because node {kind} does not exist.",
                            node_id=node_id, node_type=kind)
        if kind == "FakeOddDetails":
            return _odd_failure(job, node_id)
    for node_id, node in job.graph.items():
        kind, inputs = node["class_type"], node.get("inputs", {})
        send(p.NodeStarted(job.job_id, node_id, kind))
        if kind == "FakeSleep":
            total = max(1, int(float(inputs.get("seconds", 1)) / 0.01))
            for step in range(total):
                if interrupted.is_set():
                    return p.Failed(job.job_id, p.FailureKind.INTERRUPTED, "interrupted")
                time.sleep(0.01)
                if step % 10 == 0:
                    send(p.Progress(job.job_id, node_id, step + 1, total))
        elif kind == "FakeBusy":
            time.sleep(float(inputs.get("seconds", 30)))
        elif kind == "FakeCrash":
            os.kill(os.getpid(), int(inputs.get("signal", signal.SIGKILL)))
            time.sleep(10)
        elif kind == "FakeError":
            return p.Failed(job.job_id, p.FailureKind.NODE_ERROR, "boom", node_id=node_id,
                            node_type=kind, exception_type="ValueError")
        elif kind == "FakeOOM":
            return p.Failed(job.job_id, p.FailureKind.OUT_OF_MEMORY,
                            "Allocation on device", node_id=node_id, node_type=kind,
                            exception_type="torch.OutOfMemoryError")
        elif kind == "FakeLog":
            log.error("%s", inputs.get("text", ""))
            try:
                raise ValueError(f"fake failure reading {inputs.get('url', '')}")
            except ValueError:
                log.exception("!!! Exception during processing !!!")
        elif kind in PACK_NODES:
            dirs = {"input_dir": job.input_dir, "output_dir": job.output_dir,
                    "temp_dir": job.temp_dir, "models_dir": job.models_dir}
            text = PACK_NODES[kind]().run(job=dirs, **inputs)
            rel = f"{inputs.get('output_id') or kind}_00001_.txt"
            if text is not None:
                (Path(job.output_dir) / rel).write_text(str(text))
            outputs.append(p.OutputFile(node_id, kind, rel, inputs.get("output_id")))
        elif kind == "FakeSave":
            prefix = inputs.get("output_id") or "fake"
            text = _value(job.graph, inputs.get("text", ""))
            data = str(text).encode()
            if isinstance(text, str) and text.startswith("file:"):
                data = (Path(job.input_dir) / text[5:]).read_bytes()
            elif isinstance(text, str) and inputs.get("read"):
                data = (Path(job.input_dir) / text).read_bytes()
            elif isinstance(text, str) and text.startswith("model:"):
                data = (Path(job.models_dir or "") / text[6:]).read_bytes()
            copies = int(inputs.get("copies", 1))
            for i in range(copies):
                rel = f"{prefix}_{i + 1:05d}_.txt"
                (Path(job.output_dir) / rel).write_bytes(data)
                outputs.append(p.OutputFile(node_id, kind, rel, inputs.get("output_id")))
    return p.Done(job.job_id, tuple(outputs), execute_s=time.monotonic() - start)
