"""The closed set of messages between the runner (parent) and its ComfyUI child.

Every message is a small frozen dataclass of plain data. On the channel (``runtime.wire``)
it is one JSON object, ``{"type": <class name>, <field>: <value>, ...}`` with every field
present (``to_wire``). The child runs custom-node code, so what it sends is untrusted:
``child_message`` checks each object against the closed schema below (a known ``type``,
exactly its fields, each of its type, strings and lists within their limits, nesting
within ``DEPTH_MAX``, ``FailureKind`` by value) and builds the dataclass itself; anything
else is a ``ProtocolError`` naming the violation. No type is ever looked up by a name the
child wrote.

The child keeps within the limits: it sends ``fit_child_message(msg)``, whose fields hold
only JSON-safe builtins (``plain``) cut to the schema's limits, and which shrinks a message
whose frame would exceed ``wire.CHILD_FRAME_MAX_BYTES``. (ComfyUI's validation errors carry
a node's ``INPUT_TYPES`` entries, which may hold objects of a custom node's own classes,
and a COMBO's list of every file name.)

Parent -> child: ``Execute``, ``Interrupt``, ``Shutdown``.
Child -> parent: ``Ready``, ``InitFailed``, ``NodeStarted``, ``Progress``, ``Log``,
``Done``, ``Failed``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from typing import Any

from runflow_worker.runtime.errors import ProtocolError
from runflow_worker.runtime.wire import CHILD_FRAME_MAX_BYTES, encode_payload


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
    """A copy of the child message ``msg`` whose fields hold plain data only (``plain``);
    ``msg`` itself when they all do already (a node's event, usually)."""
    if not isinstance(msg, (*CHILD_MESSAGES, OutputFile)):
        raise TypeError(f"not a child message: {type(msg).__name__}")
    values = {f.name: getattr(msg, f.name) for f in fields(msg)}
    changed = {}
    for name, value in values.items():
        new = _plain_field(value)
        if new is not value:
            changed[name] = new
    return replace(msg, **changed) if changed else msg


# ----------------------------------------------------------------- the wire schema

ID_MAX_CHARS = 1024
"""Ids, node types, exception types, device names."""
PATH_MAX_CHARS = 4096
TEXT_MAX_CHARS = 64 * 1024
"""Messages, log texts, tracebacks, and every string inside ``details``."""
LIST_MAX_ITEMS = 10_000
DEPTH_MAX = 33
"""Nesting of ``details`` (``plain`` cuts at 32 levels below the field)."""
_INT_LIMIT = 1 << 63
_SHORT_TEXT_CHARS = 4096
_SHORT_LIST_ITEMS = 100

_Check = Callable[[Any, str], Any]


def _show(value: Any) -> str:
    """A bounded description of a value the child sent (for the violation's message)."""
    if isinstance(value, (list, dict)):  # never repr a nesting the child chose
        return f"<{len(value)} items>"
    text = repr(value[:61] if isinstance(value, str) else value)
    return text if len(text) <= 60 else f"{text[:60]}..."


def _wrong(where: str, wanted: str, value: Any) -> ProtocolError:
    return ProtocolError(f"{where} must be {wanted}, got {type(value).__name__} {_show(value)}")


def _str(max_chars: int) -> _Check:
    def check(value: Any, where: str) -> str:
        if type(value) is not str:
            raise _wrong(where, "a string", value)
        if len(value) > max_chars:
            raise ProtocolError(f"{where} is {len(value)} characters long, over the "
                                f"{max_chars}-character limit")
        return value
    return check


def _int(value: Any, where: str) -> int:
    if type(value) is not int:
        raise _wrong(where, "an integer", value)
    if not -_INT_LIMIT <= value < _INT_LIMIT:
        raise ProtocolError(f"{where} is out of range")
    return value


def _number(value: Any, where: str) -> float:
    if type(value) is int:
        return float(_int(value, where))
    if type(value) is not float or not math.isfinite(value):
        raise _wrong(where, "a finite number", value)
    return value


def _optional(check: _Check) -> _Check:
    def optional(value: Any, where: str) -> Any:
        return None if value is None else check(value, where)
    return optional


def _list(check: _Check, max_items: int = LIST_MAX_ITEMS) -> _Check:
    def list_of(value: Any, where: str) -> tuple[Any, ...]:
        if type(value) is not list:
            raise _wrong(where, "a list", value)
        if len(value) > max_items:
            raise ProtocolError(f"{where} has {len(value)} items, over the {max_items} limit")
        return tuple(check(v, f"{where}[{i}]") for i, v in enumerate(value))
    return list_of


def _str_map(value: Any, where: str) -> dict[str, str]:
    if type(value) is not dict:
        raise _wrong(where, "an object", value)
    return {k: _str(TEXT_MAX_CHARS)(v, f"{where}[{_show(k)}]") for k, v in value.items()}


def _json(max_chars: int | None, depth_max: int | None) -> _Check:
    """Any JSON value, nesting at most ``depth_max`` containers, strings (keys too) at
    most ``max_chars`` (None: unchecked, for the parent's own messages)."""
    def check(value: Any, where: str, depth: int = 1) -> Any:
        kind = type(value)
        if value is None or kind is bool:
            return value
        if kind is str:
            return value if max_chars is None else _str(max_chars)(value, where)
        if kind is int:
            return _int(value, where)
        if kind is float:  # the parent's own graph may hold a caller's NaN
            return value if max_chars is None else _number(value, where)
        if kind not in (list, dict):
            raise _wrong(where, "a JSON value", value)
        if depth_max is not None and depth > depth_max:
            raise ProtocolError(f"{where} nests deeper than {depth_max} levels")
        if kind is list:
            return [check(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
        for key in value:
            if max_chars is not None:
                _str(max_chars)(key, f"{where} key")
        return {k: check(v, f"{where}[{_show(k)}]", depth + 1) for k, v in value.items()}
    return check


def _object(check: _Check) -> _Check:
    def obj(value: Any, where: str) -> dict[str, Any]:
        if type(value) is not dict:
            raise _wrong(where, "an object", value)
        return check(value, where)
    return obj


def _kind(value: Any, where: str) -> FailureKind:
    if type(value) is not str:
        raise _wrong(where, "a failure kind", value)
    try:
        return FailureKind(value)
    except ValueError:
        raise ProtocolError(f"{where} is no failure kind: {_show(value)}") from None


_ID = _str(ID_MAX_CHARS)
_OPT_ID = _optional(_ID)
_TEXT = _str(TEXT_MAX_CHARS)
_DETAILS = _object(_json(TEXT_MAX_CHARS, DEPTH_MAX))


def _text_map(value: Any, where: str) -> dict[str, str]:
    """A child's name -> text map: names and texts within the limits, a bounded count."""
    if type(value) is not dict:
        raise _wrong(where, "an object", value)
    if len(value) > LIST_MAX_ITEMS:
        raise ProtocolError(f"{where} has {len(value)} items, over the {LIST_MAX_ITEMS} limit")
    return {_ID(k, f"{where} key"): _TEXT(v, f"{where}[{_show(k)}]") for k, v in value.items()}

_OUTPUT_FILE: dict[str, _Check] = {"node_id": _ID, "node_type": _ID,
                                   "relpath": _str(PATH_MAX_CHARS), "output_id": _OPT_ID}


def _output_file(value: Any, where: str) -> OutputFile:
    if type(value) is not dict:
        raise _wrong(where, "an object", value)
    return OutputFile(**_fields(value, _OUTPUT_FILE, where))


CHILD_SCHEMA: dict[str, tuple[type, dict[str, _Check]]] = {
    "Ready": (Ready, {"comfyui_commit": _OPT_ID, "node_count": _int,
                      "import_failures": _list(_ID), "init_s": _number, "device": _ID,
                      "gpu_model": _OPT_ID, "import_errors": _text_map}),
    "InitFailed": (InitFailed, {"message": _TEXT, "traceback": _TEXT}),
    "NodeStarted": (NodeStarted, {"job_id": _ID, "node_id": _ID, "node_type": _OPT_ID}),
    "Progress": (Progress, {"job_id": _ID, "node_id": _OPT_ID, "value": _int,
                            "total": _int}),
    "Log": (Log, {"job_id": _ID, "node_id": _OPT_ID, "text": _TEXT}),
    "Done": (Done, {"job_id": _ID, "outputs": _list(_output_file), "execute_s": _number,
                    "peak_vram_bytes": _optional(_int)}),
    "Failed": (Failed, {"job_id": _ID, "kind": _kind, "message": _TEXT, "node_id": _OPT_ID,
                        "node_type": _OPT_ID, "exception_type": _OPT_ID,
                        "details": _DETAILS, "peak_vram_bytes": _optional(_int)}),
}
"""What the child may send: message type -> (class, field -> check)."""

PARENT_SCHEMA: dict[str, tuple[type, dict[str, _Check]]] = {
    "Execute": (Execute, {"job_id": _ID, "graph": _object(_json(None, None)),
                          "input_dir": _str(PATH_MAX_CHARS), "output_dir": _str(PATH_MAX_CHARS),
                          "temp_dir": _str(PATH_MAX_CHARS),
                          "models_dir": _optional(_str(PATH_MAX_CHARS)),
                          "model_digests": _str_map, "resource_digests": _str_map}),
    "Interrupt": (Interrupt, {"job_id": _ID}),
    "Shutdown": (Shutdown, {}),
}


def _fields(obj: dict[str, Any], spec: dict[str, _Check], where: str) -> dict[str, Any]:
    got = set(obj) - {"type"}
    if got != set(spec):
        missing = sorted(set(spec) - got)
        extra = sorted(_show(k) for k in got - set(spec))
        raise ProtocolError(f"{where} has the wrong fields (missing {missing}, unexpected "
                            f"[{', '.join(extra[:5])}])")
    return {name: check(obj[name], f"{where}.{name}") for name, check in spec.items()}


def _decode(obj: dict[str, Any], schema: dict[str, tuple[type, dict[str, _Check]]]) -> Any:
    name = obj.get("type")
    if type(name) is not str or name not in schema:
        raise ProtocolError(f"unknown message type {_show(name)}")
    cls, spec = schema[name]
    return cls(**_fields(obj, spec, name))


def child_message(obj: dict[str, Any]) -> ChildMessage:
    """The child message in the decoded frame ``obj``; ProtocolError naming what is wrong."""
    return _decode(obj, CHILD_SCHEMA)


def parent_message(obj: dict[str, Any]) -> ParentMessage:
    """The parent message in the decoded frame ``obj`` (the child's side)."""
    return _decode(obj, PARENT_SCHEMA)


def _wire_value(value: Any) -> Any:
    if isinstance(value, FailureKind):
        return value.value
    if isinstance(value, OutputFile):
        return {f.name: getattr(value, f.name) for f in fields(value)}
    if isinstance(value, tuple):
        return [_wire_value(v) for v in value]
    return value


def to_wire(msg: Any) -> dict[str, Any]:
    """``msg`` as the JSON object of its frame: ``{"type": <class>, <field>: ...}``."""
    if not isinstance(msg, (*CHILD_MESSAGES, *PARENT_MESSAGES)):
        raise TypeError(f"not a protocol message: {type(msg).__name__}")
    return {"type": type(msg).__name__,
            **{f.name: _wire_value(getattr(msg, f.name)) for f in fields(msg)}}


# ----------------------------------------------------------------- the child's side

_CUT = " [cut]"


def _cut(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[:max_chars - len(_CUT)] + _CUT


def _clip_json(value: Any, max_chars: int, max_items: int) -> Any:
    """A plain value with every string (keys too) and list within the limits."""
    if isinstance(value, str):
        return _cut(value, max_chars)
    if isinstance(value, list):
        return [_clip_json(v, max_chars, max_items) for v in value[:max_items]]
    if isinstance(value, dict):
        return {_cut(k, max_chars): _clip_json(v, max_chars, max_items)
                for k, v in list(value.items())[:max_items]}
    return value


_LIMITS = {"relpath": PATH_MAX_CHARS, "message": TEXT_MAX_CHARS, "traceback": TEXT_MAX_CHARS,
           "text": TEXT_MAX_CHARS}


def _clip(obj: dict[str, Any], max_text: int, max_items: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in obj.items():
        limit = _LIMITS.get(name, ID_MAX_CHARS)
        if name == "details":
            out[name] = _clip_json(value, max_text, max_items)
        elif name == "import_errors":
            out[name] = {_cut(k, ID_MAX_CHARS): _cut(v, max_text)
                         for k, v in list(value.items())[:max_items]}
        elif isinstance(value, str) and name != "type":
            out[name] = _cut(value, min(limit, max_text))
        elif isinstance(value, list):
            out[name] = [_clip(v, max_text, max_items) if isinstance(v, dict)
                         else _cut(v, ID_MAX_CHARS) if isinstance(v, str) else v
                         for v in value[:max_items]]
        else:
            out[name] = value
    return out


def frame_bytes(obj: dict[str, Any]) -> int:
    """The payload size of ``obj``'s frame (as ``wire.encode_frame`` writes it)."""
    return len(encode_payload(obj))


def fit_child_message(msg: ChildMessage, max_bytes: int = CHILD_FRAME_MAX_BYTES,
                      ) -> dict[str, Any]:
    """The wire object of ``msg`` made plain and cut so its frame fits ``max_bytes``.

    Strings are cut to the schema's limits (marked `` [cut]``); a frame still too large
    loses its ``details`` and gets shorter texts and lists; a ``Done`` listing more outputs
    than fit becomes an INTERNAL ``Failed`` (its files would be lost otherwise unseen).
    """
    return _fitted(msg, max_bytes)[0]


def child_payload(msg: ChildMessage, max_bytes: int = CHILD_FRAME_MAX_BYTES) -> bytes:
    """The frame payload of ``fit_child_message(msg)``: what the child writes, encoded
    once (the size check's encoding is the one sent)."""
    return _fitted(msg, max_bytes)[1]


def _fitted(msg: ChildMessage, max_bytes: int) -> tuple[dict[str, Any], bytes]:
    obj = _clip(to_wire(plain_message(msg)), TEXT_MAX_CHARS, LIST_MAX_ITEMS)
    payload = encode_payload(obj)
    if len(payload) <= max_bytes and not (
            isinstance(msg, Done) and len(msg.outputs) > LIST_MAX_ITEMS):
        return obj, payload
    if isinstance(msg, Done):
        return _fitted(Failed(
            msg.job_id, FailureKind.INTERNAL,
            f"the run wrote {len(msg.outputs)} output files, more than one message can "
            f"report", peak_vram_bytes=msg.peak_vram_bytes), max_bytes)
    if "details" in obj:
        obj["details"] = {"cut": "the details were too large to report"}
    obj = _clip(obj, _SHORT_TEXT_CHARS, _SHORT_LIST_ITEMS)
    return obj, encode_payload(obj)
