"""ComfyUI embedded as a library: the only module that imports ComfyUI.

Written against ComfyUI 0.3.6x (commit a125cd8); every version-sensitive call is here.
Order matters (see ``ComfyEmbedding.init``): cli args before ``folder_paths`` and
``comfy.model_management`` are imported (both read args at import), ``utils.extra_config``
before ``nodes`` (nodes.py puts ``comfy/`` first on sys.path), our own server object set
before any node module is imported (custom nodes register routes at import). A child
without custom nodes defers ComfyUI's built-in extra nodes (``runtime.builtinnodes``) and,
with them, ComfyUI's ``server`` module, which only node modules import. torch and
ComfyUI's own modules are imported with the cyclic garbage collector off
(``_no_collections``).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from runflow_worker.runtime import protocol as p
from runflow_worker.runtime.builtinnodes import DeferredBuiltins, LoaderCall, recorder
from runflow_worker.runtime.customnodes import COMFYUI_OWN
from runflow_worker.runtime.graph import file_reference_problem, skip_pass_through_inputs

log = logging.getLogger(__name__)

CLIENT_ID = "runflow"
NONCE_INPUT = "runflow_job"
"""Extra input put on every output node so ComfyUI's cache never reuses an earlier run's
outputs (extra inputs enter the cache signature and are ignored by the node)."""
_KEEP_FOLDERS = frozenset({"custom_nodes", "configs"})
IMPORT_ERROR_HEAD_LINES = 6
IMPORT_ERROR_TAIL_LINES = 14
IMPORT_ERROR_MAX_CHARS = 4000


class _WarningCapture(logging.Handler):
    """Collects the warnings logged while one custom node pack loads: ComfyUI reports an
    import error only as a logged traceback and a ``False``."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.extend(record.getMessage().splitlines())
        except Exception:  # noqa: BLE001, S110 - a message that cannot be formatted is left out
            pass

    def excerpt(self) -> str:
        """The first and last lines of what was logged, bounded in size."""
        lines = [line for line in self.lines if line.strip()]
        if len(lines) > IMPORT_ERROR_HEAD_LINES + IMPORT_ERROR_TAIL_LINES:
            lines = [*lines[:IMPORT_ERROR_HEAD_LINES], "...",
                     *lines[-IMPORT_ERROR_TAIL_LINES:]]
        text = "\n".join(lines)
        if len(text) > IMPORT_ERROR_MAX_CHARS:
            half = IMPORT_ERROR_MAX_CHARS // 2
            text = text[:half] + "\n...\n" + text[-half:]
        return text or "the pack did not load (no error logged)"


@contextmanager
def _no_collections() -> Iterator[None]:
    """The block runs with the cyclic garbage collector off; what it made is frozen after.

    Importing torch and ComfyUI makes a few million objects, and the collector, triggered
    by allocation counts, traverses the growing heap again and again meanwhile: about a
    fifth of the import's time (0.8-1 s of 4-5 s on a 2-core CPU machine,
    ``docs/runtime.md``). The heap it leaves lives as long as the process, so it is frozen
    (``gc.freeze``: never traversed again) instead of collected; the import's own garbage
    (about 10,000 objects, 8 MB, measured at ComfyUI a125cd8) is frozen with it rather than
    paying a full collection (0.3-0.4 s) on the start's path.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def git_commit(path: str) -> str | None:
    """The checkout's HEAD commit, or None when it is not a git checkout."""
    try:
        out = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and len(commit) == 40 else None


class _Server:
    """Stands in for ``server.PromptServer.instance``; forwards events to ``sink``."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.sockets_metadata: dict[str, Any] = {}
        self.loop = loop
        # ComfyUI's server announces that it serves each node's WEB_DIRECTORY itself; packs
        # that find the flag missing take ComfyUI for an old one and link or copy their
        # JavaScript into ComfyUI's own web/extensions (ComfyUI-Custom-Scripts does).
        self.supports: set[str] = {"custom_nodes_from_web"}
        self.prompt_queue = None
        self.sink: Callable[[str, dict[str, Any]], None] = lambda event, data: None

    # Made when a node module first asks (a custom node registering an HTTP route): aiohttp
    # is not imported for a child that loads none.
    @functools.cached_property
    def routes(self) -> Any:
        """Where node modules register HTTP routes (never served)."""
        from aiohttp import web

        return web.RouteTableDef()

    @functools.cached_property
    def app(self) -> Any:
        """The aiohttp application some node modules add middleware or routes to."""
        from aiohttp import web

        return web.Application()

    def send_sync(self, event: str, data: Any, sid: str | None = None) -> None:
        """ComfyUI's event entry point (executing, executed, progress...)."""
        if isinstance(data, dict):
            self.sink(event, data)

    async def send(self, event: str, data: Any, sid: str | None = None) -> None:
        """Async variant used by some nodes."""
        self.send_sync(event, data, sid)

    def send_progress_text(self, text: str, node_id: str | None, sid: str | None = None) -> None:
        """Text a node shows under itself: forwarded as a log event."""
        self.sink("progress_text", {"text": str(text), "node": node_id})

    def add_on_prompt_handler(self, handler: Any) -> None:
        """Accepted and ignored: prompts never arrive over HTTP here."""


class ComfyEmbedding:
    """One initialised ComfyUI in this process.

    ``config``: the runner's config as plain data (``RunnerConfig``); besides its fields,
    ``defer_builtin_nodes`` (default True) may be set False to load ComfyUI's built-in
    extra nodes at start even without custom nodes (``runtime.builtinnodes``).
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.server: _Server | None = None
        self.executor: Any = None
        self.file_digests: dict[str, str] = {}  # "models/<key>" / "input/<key>" -> sha256
        self.builtins: DeferredBuiltins | None = None
        """ComfyUI's built-in extra nodes not loaded at start (None: all were)."""
        self._job: p.Execute | None = None
        self._send: Callable[[Any], None] = lambda msg: None
        self._interrupt_requested = False

    # ------------------------------------------------------------------ init

    def init(self) -> p.Ready:
        """Import and initialise ComfyUI; return the Ready message."""
        start = time.perf_counter()
        comfy_dir = str(Path(self.config["comfyui_dir"]).resolve())
        base_dir = Path(self.config["base_dir"])
        base_dir.mkdir(parents=True, exist_ok=True)
        for extra in reversed(self.config.get("extra_sys_path") or ()):
            sys.path.insert(0, extra)
        sys.path.insert(0, comfy_dir)

        # torch and ComfyUI's own modules only: a custom node pack's import runs with the
        # collector on (what it leaves in cycles, a loaded model say, must stay collectable).
        with _no_collections():
            import torch

            cpu = self.config.get("cpu")
            if cpu is None:
                cpu = not torch.cuda.is_available()
            from comfy.cli_args import args

            args.cpu = bool(cpu)
            args.base_directory = str(base_dir)
            args.disable_all_custom_nodes = False
            packs = self._custom_node_paths()
            # Built-in extra nodes (and ComfyUI's own custom_nodes/ files) are loaded when a
            # graph names one (runtime.builtinnodes), unless a custom node pack loads: packs
            # may rely on them being there at import.
            defer = self.config.get("defer_builtin_nodes", True) and all(
                os.path.basename(path) in COMFYUI_OWN for path in packs)
            # isort: off
            # The order is load-bearing (see the module docstring); never let a sorter touch it:
            # ComfyUI's `utils` package must be imported before anything can shadow it with
            # comfy/utils.py.
            import utils.extra_config  # noqa: F401
            import folder_paths
            if not defer:
                # ComfyUI's server module (its routes, aiohttp, its frontend manager: 0.3-0.4 s)
                # is for node modules to import; nothing else of ComfyUI does. A child that
                # defers them imports it before its first load (_install_server).
                import server  # noqa: F401
            # isort: on

            asyncio.set_event_loop(self.loop)
            self.server = _Server(self.loop)
            self.server.sink = self._on_event
            if not defer:
                self._install_server()

            import comfy.model_management
            import comfy.utils
            import execution
            import hook_breaker_ac10a0
            import nodes

        self._folder_paths = folder_paths
        self._nodes = nodes
        self._mm = comfy.model_management
        self._execution = execution
        self._models_root = os.path.abspath(folder_paths.models_dir)
        self._folder_plan: list[tuple[str, Any, list[tuple[str | None, str]]]] = []
        self._remember_folders()

        self._hook_breaker = hook_breaker_ac10a0
        failures: list[str] = []
        errors: dict[str, str] = {}
        hook_breaker_ac10a0.save_functions()
        try:
            if defer:
                self.builtins = self._defer_builtin_nodes(packs)
            else:
                self.loop.run_until_complete(
                    nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
                failures, errors = self._load_custom_nodes(packs)
        finally:
            hook_breaker_ac10a0.restore_functions()
        self._register_runflow_nodes()
        comfy.utils.set_progress_bar_global_hook(self._progress_hook)
        self.executor = execution.PromptExecutor(self.server, cache_type=execution.CacheType.CLASSIC)
        self._remember_folders()
        gpu_model = torch.cuda.get_device_name() if torch.cuda.is_available() and not cpu else None
        return p.Ready(
            comfyui_commit=git_commit(comfy_dir),
            node_count=len(nodes.NODE_CLASS_MAPPINGS),
            import_failures=tuple(failures),
            import_errors=errors,
            init_s=time.perf_counter() - start,
            device=str(self._mm.get_torch_device()),
            gpu_model=gpu_model,
        )

    def _custom_node_paths(self) -> list[str]:
        """The custom node entries to load, in order (ComfyUI's listing rules)."""
        paths: list[str] = []
        for root in self.config.get("custom_node_dirs") or ():
            if not os.path.isdir(root):
                continue
            for entry in sorted(os.listdir(root)):
                path = os.path.join(root, entry)
                if entry == "__pycache__" or entry.endswith(".disabled"):
                    continue
                if os.path.isfile(path) and not entry.endswith(".py"):
                    continue
                paths.append(path)
        return paths

    def _load_custom_nodes(self, paths: list[str]) -> tuple[list[str], dict[str, str]]:
        """Load every pack; return the entries that failed and, for each, what was logged."""
        base_names = set(self._nodes.NODE_CLASS_MAPPINGS)
        failures: list[str] = []
        errors: dict[str, str] = {}
        for path in paths:
            entry = os.path.basename(path)
            capture = _WarningCapture()
            root_logger = logging.getLogger()
            root_logger.addHandler(capture)
            try:
                ok = self.loop.run_until_complete(self._nodes.load_custom_node(
                    path, base_names, module_parent="custom_nodes"))
            finally:
                root_logger.removeHandler(capture)
            if not ok:
                failures.append(entry)
                errors[entry] = capture.excerpt()
        return failures, errors

    def _defer_builtin_nodes(self, own_packs: list[str]) -> DeferredBuiltins:
        """ComfyUI's ``init_extra_nodes`` (no custom or API nodes) with its loader recording
        the built-in files it would load instead of loading them; ``own_packs`` (ComfyUI's
        own custom node files) deferred after them."""
        nodes = self._nodes
        calls: list[LoaderCall] = []
        load_custom_node = nodes.load_custom_node
        nodes.load_custom_node = recorder(calls)
        try:
            self.loop.run_until_complete(
                nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        finally:
            nodes.load_custom_node = load_custom_node
        return DeferredBuiltins(calls, self._load_builtin, nodes.NODE_CLASS_MAPPINGS,
                                nodes.NODE_DISPLAY_NAME_MAPPINGS, own_packs=own_packs)

    def _install_server(self) -> None:
        """Import ComfyUI's server module and make our object its ``PromptServer.instance``
        (before any node module is imported: they register routes and send events there)."""
        import server

        server.PromptServer.instance = self.server

    def _load_builtin(self, call: LoaderCall) -> bool:
        """One deferred file, loaded with ComfyUI's own call (and, as at start,
        ``hook_breaker_ac10a0`` around it)."""
        self._install_server()
        args, kwargs = call
        self._hook_breaker.save_functions()
        try:
            return bool(self.loop.run_until_complete(
                self._nodes.load_custom_node(*args, **kwargs)))
        finally:
            self._hook_breaker.restore_functions()

    def _register_runflow_nodes(self) -> None:
        from runflow_worker.runtime import nodepack

        for name, cls in nodepack.NODE_CLASS_MAPPINGS.items():
            # The environment's own custom nodes win: they were loaded first.
            if name not in self._nodes.NODE_CLASS_MAPPINGS:
                self._nodes.NODE_CLASS_MAPPINGS[name] = cls
                self._nodes.NODE_DISPLAY_NAME_MAPPINGS[name] = nodepack.NODE_DISPLAY_NAME_MAPPINGS[
                    name]

    # ------------------------------------------------------------------ events

    def _on_event(self, event: str, data: dict[str, Any]) -> None:
        job = self._job
        if job is None:
            return
        if event == "executing" and data.get("node") is not None:
            node_id = str(data["node"])
            node = job.graph.get(node_id) or {}
            self._send(p.NodeStarted(job.job_id, node_id, node.get("class_type")))
            if self._interrupt_requested:
                # An interrupt that arrived before execute_async started was cleared by it.
                self._mm.interrupt_current_processing(True)
        elif event == "progress_text":
            self._send(p.Log(job.job_id, data.get("node"), data.get("text", "")))

    def _progress_hook(self, value: int, total: int, preview: Any, prompt_id: Any = None,
                       node_id: Any = None) -> None:
        # Must raise on interrupt, or a running sampler never stops (ComfyUI's main.py
        # does the same in its own hook).
        self._mm.throw_exception_if_processing_interrupted()
        job = self._job
        if job is None:
            return
        if node_id is None and self.server is not None:
            node_id = self.server.last_node_id
        self._send(p.Progress(job.job_id, None if node_id is None else str(node_id),
                              int(value), int(total)))

    def interrupt(self, job_id: str) -> None:
        """Interrupt the running job (called from the channel reader thread)."""
        if self._job is not None and self._job.job_id == job_id:
            self._interrupt_requested = True
            self._mm.interrupt_current_processing(True)

    # ------------------------------------------------------------------ execute

    def _point_folders(self, job: p.Execute) -> None:
        fp = self._folder_paths
        fp.set_input_directory(job.input_dir)
        fp.set_output_directory(job.output_dir)
        fp.set_temp_directory(job.temp_dir)
        for name, exts, plan in self._folder_plan:
            # The shared models/ tree is replaced by the run's own (only its declared models
            # are visible); a custom node's own folders stay.
            fp.folder_names_and_paths[name] = ([
                path if rel is None else os.path.join(job.models_dir, rel)
                for rel, path in plan if rel is None or job.models_dir], exts)
        fp.filename_list_cache.clear()

    def _remember_folders(self) -> None:
        """ComfyUI's folders as they are now, each path as ``(its path below models/, or
        None, path)``: worked out when nodes have loaded, not at every job."""
        below = self._models_root + os.sep
        self._folder_plan = []
        for name, (paths, exts) in self._folder_paths.folder_names_and_paths.items():
            plan: list[tuple[str | None, str]] = []
            for path in paths:
                absolute = os.path.abspath(path)
                rel = (os.path.relpath(absolute, self._models_root)
                       if name not in _KEEP_FOLDERS and absolute.startswith(below) else None)
                plan.append((rel, path))
            self._folder_plan.append((name, exts, plan))

    def _forget_changed_models(self, job: p.Execute) -> None:
        digests = {**{f"models/{k}": d for k, d in job.model_digests.items()},
                   **{f"input/{k}": d for k, d in job.resource_digests.items()}}
        changed = [k for k, d in digests.items() if self.file_digests.get(k, d) != d]
        self.file_digests.update(digests)
        if changed:
            # Loader outputs are cached by file *name* (and any node reading a path by that
            # path): a name now holding other bytes must not be served from the cache.
            log.info("files changed under the same name (%s): resetting caches", changed)
            self.executor.reset()
            self._mm.unload_all_models()

    def _own_input_class(self, class_type: str) -> bool:
        """Whether ``class_type`` is registered as the worker's own (pass-through) input
        node, not an environment's own class of that name."""
        from runflow_worker.runtime import nodepack

        own = nodepack.NODE_CLASS_MAPPINGS.get(class_type)
        return own is not None and self._nodes.NODE_CLASS_MAPPINGS.get(class_type) is own

    def _check_file_inputs(self, graph: dict[str, Any]) -> p.Failed | None:
        """The first file input (a combo, an upload) whose value is no acceptable file
        reference, as the run's failure; None when there is none.

        A node's ``INPUT_TYPES`` is asked only when one of its string values would be
        refused: it tells whether that input takes a file. The usual graph has no such
        value, and asks none (``LoadImage``'s lists the input folder, and ComfyUI's own
        validation asks again right after).
        """
        mappings = self._nodes.NODE_CLASS_MAPPINGS
        for node_id, node in graph.items():
            refused = {name: why for name, value in (node.get("inputs") or {}).items()
                       if isinstance(value, str) and (why := file_reference_problem(value))}
            cls = mappings.get(node.get("class_type")) if refused else None
            if cls is None:
                continue
            try:
                spec = cls.INPUT_TYPES()
            except Exception:  # noqa: BLE001, S112 - validation reports a broken INPUT_TYPES
                continue
            declared = {**spec.get("required", {}), **spec.get("optional", {})}
            for name, why in refused.items():
                entry = declared.get(name)
                kind = entry[0] if isinstance(entry, (list, tuple)) and entry else None
                opts = entry[1] if isinstance(entry, (list, tuple)) and len(entry) > 1 else {}
                if isinstance(kind, list) or kind == "COMBO" or (
                        isinstance(opts, dict) and any("upload" in str(k) for k in opts)):
                    return p.Failed("", p.FailureKind.INVALID_WORKFLOW,
                                    f"input {name!r} of node {node_id}: file reference {why}",
                                    node_id=str(node_id), node_type=node.get("class_type"))
        return None

    def execute(self, job: p.Execute, send: Callable[[Any], None]) -> p.Done | p.Failed:
        """Validate and execute one job; report events through ``send``."""
        import torch

        self._send = send
        self._interrupt_requested = False
        graph = {str(k): v for k, v in job.graph.items()}
        if self.builtins is not None and self.builtins.pending:
            names = [node.get("class_type") for node in graph.values() if isinstance(node, dict)]
            self._job = job  # an interrupt during the load (up to a second or so) is kept
            try:
                loaded = self.builtins.settle(names)
            finally:
                self._job = None
            if loaded:
                gc.freeze()  # as after init: what a load keeps stays out of collections
        mappings = self._nodes.NODE_CLASS_MAPPINGS
        for node in graph.values():
            cls = mappings.get(node.get("class_type"))
            if cls is not None and getattr(cls, "OUTPUT_NODE", False):
                node.setdefault("inputs", {})[NONCE_INPUT] = job.job_id
        # The worker's own input nodes hand their injected loader's output on unchanged:
        # their readers read the loader itself, and ComfyUI runs a node less per input.
        skip_pass_through_inputs(graph, self._own_input_class)
        # Folders first: INPUT_TYPES of loader nodes lists this run's files, not the last run's.
        self._point_folders(job)
        bad = self._check_file_inputs(graph)
        if bad is not None:
            return p.Failed(job.job_id, bad.kind, bad.message, bad.node_id, bad.node_type)
        self._forget_changed_models(job)
        cuda = torch.cuda.is_available() and self._mm.cpu_state != self._mm.CPUState.CPU
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        self._job = job
        try:
            valid, error, outputs, node_errors = self.loop.run_until_complete(
                self._execution.validate_prompt(job.job_id, graph, None))
            if not valid:
                return self._validation_failure(job, graph, error, node_errors)
            if self._interrupt_requested:
                return p.Failed(job.job_id, p.FailureKind.INTERRUPTED, "interrupted")
            self.loop.run_until_complete(self.executor.execute_async(
                graph, job.job_id, {"client_id": CLIENT_ID}, outputs))
        except BaseException as exc:  # KeyboardInterrupt from a node escapes the executor
            if isinstance(exc, SystemExit):
                raise
            return p.Failed(job.job_id, p.FailureKind.INTERNAL,
                            f"ComfyUI raised {type(exc).__name__}: {exc}",
                            exception_type=type(exc).__name__)
        finally:
            self._job = None
        peak = int(torch.cuda.max_memory_allocated()) if cuda else None
        return self._outcome(job, graph, time.perf_counter() - start, peak)

    def _validation_failure(self, job: p.Execute, graph: dict[str, Any], error: Any,
                            node_errors: Any) -> p.Failed:
        for node_id, info in (node_errors or {}).items():
            errs = info.get("errors") or [{}]
            first = errs[0]
            text = "; ".join(
                f"{e.get('message', '')}: {e.get('details', '')}".strip(": ") for e in errs)
            # The errors' ``extra_info.input_config`` is the node's INPUT_TYPES entry and
            # may hold a custom node's own objects: the child's send makes them plain data.
            return p.Failed(job.job_id, p.FailureKind.INVALID_WORKFLOW, text,
                            node_id=str(node_id), node_type=info.get("class_type"),
                            details={"type": first.get("type"), "errors": errs[:10]})
        error = error or {}
        details = str(error.get("details", ""))
        node_id = None
        if details.startswith("Node ID '#"):
            node_id = details[len("Node ID '#"):].rstrip("'")
        node_type = (graph.get(node_id) or {}).get("class_type") if node_id else None
        return p.Failed(job.job_id, p.FailureKind.INVALID_WORKFLOW,
                        str(error.get("message", "invalid prompt")), node_id=node_id,
                        node_type=node_type, details={"type": error.get("type")})

    def _outcome(self, job: p.Execute, graph: dict[str, Any], execute_s: float,
                 peak: int | None) -> p.Done | p.Failed:
        messages = self.executor.status_messages
        last_event, last = messages[-1] if messages else ("", {})
        if last_event == "execution_error":
            exc_type = str(last.get("exception_type", ""))
            kind = (p.FailureKind.OUT_OF_MEMORY if "OutOfMemoryError" in exc_type
                    else p.FailureKind.NODE_ERROR)
            message = str(last.get("exception_message", "")).strip()
            if kind is p.FailureKind.OUT_OF_MEMORY:
                message = message.split("\nTIPS:")[0].strip() or "out of memory"
            tb = "".join(last.get("traceback") or [])[-4000:]
            return p.Failed(job.job_id, kind, message, node_id=str(last.get("node_id")),
                            node_type=last.get("node_type"), exception_type=exc_type,
                            details={"traceback": tb}, peak_vram_bytes=peak)
        if last_event == "execution_interrupted":
            return p.Failed(job.job_id, p.FailureKind.INTERRUPTED, "interrupted",
                            node_id=str(last.get("node_id")), node_type=last.get("node_type"),
                            peak_vram_bytes=peak)
        if last_event != "execution_success":
            return p.Failed(job.job_id, p.FailureKind.INTERNAL,
                            f"ComfyUI ended without a result ({last_event or 'no status'})")
        return p.Done(job.job_id, tuple(self._output_files(graph)), execute_s, peak)

    def _output_files(self, graph: dict[str, Any]) -> list[p.OutputFile]:
        files: list[p.OutputFile] = []
        mappings = self._nodes.NODE_CLASS_MAPPINGS
        for node_id, ui in (self.executor.history_result.get("outputs") or {}).items():
            node = graph.get(str(node_id)) or {}
            class_type = node.get("class_type", "")
            cls = mappings.get(class_type)
            output_id = None
            if getattr(cls, "RUNFLOW_IO", None) == "output":
                output_id = (node.get("inputs") or {}).get("output_id") or str(node_id)
            for items in (ui or {}).values():
                if not isinstance(items, list):
                    continue
                for item in items:
                    if not isinstance(item, dict) or item.get("type") != "output":
                        continue
                    name = item.get("filename")
                    if not isinstance(name, str) or not name:
                        continue
                    sub = item.get("subfolder") or ""
                    rel = f"{sub}/{name}" if sub else name
                    files.append(p.OutputFile(str(node_id), class_type, rel, output_id))
        return files

    def collect_idle(self) -> None:
        """Housekeeping while idle: a full GC off the run path, free cached VRAM."""
        import gc

        gc.collect()
        try:
            self._mm.soft_empty_cache()
        except Exception:  # never let housekeeping kill the child
            log.debug("soft_empty_cache failed", exc_info=True)
