"""The closed set of messages between the runner (parent) and its ComfyUI child.

Every message is a small frozen dataclass of plain data, pickled over a
``multiprocessing`` pipe connection. The child never receives or sends anything else; an
unknown object on the pipe is a protocol error that makes the runner DEFUNCT.

"Plain data" is enforced on the child's side: it sends ``plain_message(msg)``, whose
fields hold only JSON-safe builtins (``plain``). ComfyUI's validation errors carry the
node's ``INPUT_TYPES`` entries, which may hold objects of a custom node's own classes; the
parent cannot import those modules, so such a pickle would fail to load there.

Parent -> child: ``Execute``, ``Interrupt``, ``Shutdown``.
Child -> parent: ``Ready``, ``InitFailed``, ``NodeStarted``, ``Progress``, ``Log``,
``Done``, ``Failed``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from typing import Any


class FailureKind(StrEnum):
    """Why an execution failed, as the runner sees it (the worker maps it to a code)."""

    INVALID_WORKFLOW = "invalid_workflow"
    """ComfyUI validation refused the graph (unknown node, bad value, dangling link)."""
    NODE_ERROR = "node_error"
    """A node raised."""
    OUT_OF_MEMORY = "out_of_memory"
    """torch's OutOfMemoryError, from any node."""
    INTERRUPTED = "interrupted"
    """Interrupted on the parent's request (cancel, timeout, shutdown)."""
    CHILD_DIED = "child_died"
    """The child process died; the runner is DEFUNCT until restarted."""
    INTERNAL = "internal"
    """Anything else: a bug or an unexpected ComfyUI state."""


# ----------------------------------------------------------------- parent -> child


@dataclass(frozen=True)
class Execute:
    """Run one graph. Directories are absolute and belong to this job alone."""

    job_id: str
    """Unique per job; the worker's are ``<run_id>:<attempt>:<nonce>`` (the child's log
    lines carry the part before the first ``:`` as ``run_id``)."""
    graph: dict[str, Any]
    input_dir: str
    output_dir: str
    temp_dir: str
    models_dir: str | None = None
    """The job's models tree (``<kind>/<file>`` links); None = the checkout's own models/."""
    model_digests: dict[str, str] = field(default_factory=dict)
    """``models`` key -> sha256: a key whose digest changed invalidates the child's cache."""
    resource_digests: dict[str, str] = field(default_factory=dict)
    """``resources`` key (under the input directory) -> sha256, likewise: a node reading a
    resource by its path is cached by that path."""


@dataclass(frozen=True)
class Interrupt:
    """Interrupt the job running now (no-op when idle)."""

    job_id: str


@dataclass(frozen=True)
class Shutdown:
    """Exit cleanly after the current message."""


# ----------------------------------------------------------------- child -> parent


@dataclass(frozen=True)
class Ready:
    """ComfyUI is imported and its nodes are loaded."""

    comfyui_commit: str | None
    node_count: int
    import_failures: tuple[str, ...]
    init_s: float
    device: str
    gpu_model: str | None = None
    import_errors: dict[str, str] = field(default_factory=dict)
    """Entry of ``import_failures`` -> what ComfyUI logged about it (an excerpt of the
    traceback, first and last lines)."""


@dataclass(frozen=True)
class InitFailed:
    """ComfyUI could not be imported or initialised; the child exits after this."""

    message: str
    traceback: str


@dataclass(frozen=True)
class NodeStarted:
    """A node started executing."""

    job_id: str
    node_id: str
    node_type: str | None


@dataclass(frozen=True)
class Progress:
    """Step ``value`` of ``total`` inside a node (a sampler, an upscaler...)."""

    job_id: str
    node_id: str | None
    value: int
    total: int


@dataclass(frozen=True)
class Log:
    """A text a node published for the user (``send_progress_text``)."""

    job_id: str
    node_id: str | None
    text: str


@dataclass(frozen=True)
class OutputFile:
    """A file an output node wrote, relative to the job's output directory."""

    node_id: str
    node_type: str
    relpath: str
    output_id: str | None
    """The Runflow Output node's ``output_id``; None for other output nodes."""


@dataclass(frozen=True)
class Done:
    """The job succeeded."""

    job_id: str
    outputs: tuple[OutputFile, ...]
    execute_s: float
    peak_vram_bytes: int | None = None


@dataclass(frozen=True)
class Failed:
    """The job failed; the child stays usable (except for CHILD_DIED, made by the parent)."""

    job_id: str
    kind: FailureKind
    message: str
    node_id: str | None = None
    node_type: str | None = None
    exception_type: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    peak_vram_bytes: int | None = None


ParentMessage = Execute | Interrupt | Shutdown
ChildMessage = Ready | InitFailed | NodeStarted | Progress | Log | Done | Failed
PARENT_MESSAGES = (Execute, Interrupt, Shutdown)
CHILD_MESSAGES = (Ready, InitFailed, NodeStarted, Progress, Log, Done, Failed)
JobEvent = NodeStarted | Progress | Log


# ----------------------------------------------------------------- plain data

_MAX_DEPTH = 32


def plain(value: Any, _depth: int = 0) -> Any:
    """``value`` as JSON-safe builtins: str, int, float, bool, None, list, dict (str keys).

    Subclasses of str/int/float become the builtin (a custom node's ``AnyType("*")`` is
    the string ``"*"``), tuples and sets become lists, non-finite floats and anything else
    their ``repr``. Never raises; nesting deeper than 32 levels (a cycle) is cut.
    """
    kind = type(value)
    if value is None or kind in (str, int, bool):
        return value
    if kind is float:
        return value if math.isfinite(value) else repr(value)
    if _depth >= _MAX_DEPTH:
        return "..."
    try:
        if isinstance(value, str):
            return str.__str__(value)
        if isinstance(value, int):  # bool cannot be subclassed; IntEnum and the like
            return int.__int__(value)
        if isinstance(value, float):
            return plain(float.__float__(value))
        if isinstance(value, dict):
            return {_plain_key(k): plain(v, _depth + 1) for k, v in value.items()}
        if isinstance(value, (list, tuple, set, frozenset)):
            return [plain(v, _depth + 1) for v in value]
        return repr(value)
    except Exception:  # noqa: BLE001 - a broken __repr__ or a dict changing while read
        return f"<unrepresentable {kind.__name__}>"


def _plain_key(key: Any) -> str:
    key = plain(key, _MAX_DEPTH - 1)
    return key if isinstance(key, str) else repr(key)


def _plain_field(value: Any) -> Any:
    if isinstance(value, FailureKind):
        return FailureKind(str.__str__(value))
    if isinstance(value, OutputFile):
        return plain_message(value)
    if isinstance(value, tuple):
        return tuple(_plain_field(v) for v in value)
    return plain(value)


def plain_message(msg: Any) -> Any:
    """A copy of the child message ``msg`` whose fields hold plain data only (``plain``)."""
    if not isinstance(msg, (*CHILD_MESSAGES, OutputFile)):
        raise TypeError(f"not a child message: {type(msg).__name__}")
    return replace(msg, **{f.name: _plain_field(getattr(msg, f.name)) for f in fields(msg)})
