"""The run message (SPEC section 3) and the run record (SPEC section 7) as typed models.

Parsing is deliberately lenient about the values the rules judge (a commit is any string
here) so that ``check_message`` can report every broken rule with its own code and field,
instead of pydantic stopping at the first one.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from runflow_worker.errors import ErrorCode, RunRejected, Violation
from runflow_worker.runtime import graph as graphs

HEX40 = re.compile(r"[0-9a-f]{40}")
HEX64 = re.compile(r"[0-9a-fA-F]{64}")
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
ASSET_URL = re.compile(
    r"runflow://assets/[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?"
    r"[0-9a-fA-F]{12}"
)
DEFAULT_TIMEOUT_S = 1800.0
INPUTS_SUBDIR = "runflow_inputs"
"""Folder of the run's input directory that holds the callers' files."""


def _default_when_null(value: Any) -> Any:
    return DEFAULT_TIMEOUT_S if value is None else value


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and HEX64.fullmatch(value) is not None


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class GitPin(_Model):
    """A pinned git checkout as the deploy plugin writes it (``origin`` and ``commit`` are
    judged by ``check_message``, which gives their own error codes: any JSON value parses)."""

    origin: Any = None
    commit: Any = None
    dirty: bool = False


class PackagePin(_Model):
    """A Python package version recorded at deploy time."""

    name: str
    version: str | None = None


class Environment(_Model):
    """ComfyUI pin and the package list of the deploying machine."""

    comfyui: GitPin = Field(default_factory=GitPin)
    packages: list[PackagePin] = Field(default_factory=list)


class ModelRef(_Model):
    """A model file, addressed by content, materialised at its key under ``models/``
    (``sha256`` is judged by ``check_message``: any JSON value parses)."""

    sha256: Any = None
    url: str | None = None
    size_bytes: int | None = Field(None, ge=0)


class ResourceRef(_Model):
    """A file the graph itself references, materialised under the run's ``input/``."""

    asset_id: str | None = None
    url: str | None = None
    sha256: Any = None
    mime_type: str | None = None
    size_bytes: int | None = Field(None, ge=0)


class InputType(StrEnum):
    """Types of Runflow inputs."""

    STRING = "STRING"
    INT = "INT"
    FLOAT = "FLOAT"
    BOOLEAN = "BOOLEAN"
    IMAGE = "IMAGE"
    FILE = "FILE"


class InputDef(_Model):
    """A declared input of the deployed workflow."""

    input_id: str
    type: InputType
    default: Any = None
    required: bool = Field(False, strict=True)


class DeployedWorkflow(_Model):
    """The workflow snapshot carried by a run message."""

    id: str | None = None
    owner: str | None = None
    slug: str | None = None
    version: str | None = None
    workflow_json: Any
    custom_nodes: dict[str, GitPin] = Field(default_factory=dict)
    environment: Environment = Field(default_factory=Environment)
    models: dict[str, ModelRef] = Field(default_factory=dict)
    resources: dict[str, ResourceRef] = Field(default_factory=dict)
    inputs: list[InputDef] | None = None
    gpu_mode: Literal["auto", "explicit"] = "auto"
    gpu_explicit_models: list[str] = Field(default_factory=list)


class AttemptBilling(_Model):
    """GPU time of one attempt of a run."""

    attempt: int
    gpu_class: str
    gpu_model: str | None = None
    gpu_seconds: float = 0.0
    cold_start_seconds: float = 0.0
    peak_vram_bytes: int | None = None
    outcome: str


class Billing(_Model):
    """Billing carried by a message (earlier attempts) and written into the record."""

    gpu_seconds: float = 0.0
    attempts: list[AttemptBilling] = Field(default_factory=list)


class RunMessage(_Model):
    """One run as it travels on the queue (SPEC section 3)."""

    run_id: str
    attempt: int = Field(1, ge=1, strict=True)
    created_at: datetime | None = None
    workflow: DeployedWorkflow
    input: dict[str, Any] = Field(default_factory=dict)
    callback_url: str | None = None
    client_ref: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    # null means the default; NaN and infinities are no JSON numbers and are refused.
    timeout_s: Annotated[float, BeforeValidator(_default_when_null)] = Field(
        DEFAULT_TIMEOUT_S, gt=0, strict=True, allow_inf_nan=False)
    billing: Billing = Field(default_factory=Billing)


class RunStatus(StrEnum):
    """Run record statuses."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        """True for succeeded, failed and canceled."""
        return self in (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELED)


class OutputEntry(_Model):
    """One output file of a run."""

    output_id: str
    url: str
    key: str
    filename: str
    content_type: str
    size_bytes: int
    sha256: str
    node_id: str | None = None


class RunOutput(_Model):
    """The ``output`` of a succeeded run."""

    kind: Literal["comfyui_outputs"] = "comfyui_outputs"
    outputs: list[OutputEntry] = Field(default_factory=list)


class RunRecord(_Model):
    """The run record at ``runflow:run:<run_id>`` (SPEC section 7)."""

    id: str
    status: RunStatus
    attempt: int = 1
    workflow: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_ms: int | None = None
    output: RunOutput | None = None
    error: dict[str, Any] | None = None
    billing: Billing = Field(default_factory=Billing)
    timings_ms: dict[str, int] = Field(default_factory=dict)
    client_ref: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)
    environment: dict[str, Any] | None = None
    """What the run executed with (ComfyUI commit, environment key)."""

    def to_json(self) -> str:
        """Compact JSON of the record (None fields kept: clients rely on the keys)."""
        return self.model_dump_json()


def utcnow() -> datetime:
    """Timezone-aware now in UTC."""
    return datetime.now(UTC)


# --------------------------------------------------------------------------- parsing


def _dotted(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "message"


def parse_message(data: Any) -> RunMessage:
    """Parse a run message; shape errors raise RunRejected naming every field."""
    try:
        return RunMessage.model_validate(data)
    except ValidationError as exc:
        violations = []
        for err in exc.errors():
            field = _dotted(err["loc"])
            code = (
                ErrorCode.INVALID_WORKFLOW if field.startswith("workflow") else
                ErrorCode.INVALID_INPUT
            )
            violations.append(Violation(code, field, err["msg"]))
        raise RunRejected(violations) from exc


def parse_message_json(raw: str | bytes) -> RunMessage:
    """Parse a run message from JSON text."""
    try:
        return RunMessage.model_validate_json(raw)
    except ValidationError:
        import json

        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise RunRejected(
                [Violation(ErrorCode.INVALID_INPUT, "message", f"not JSON: {exc}")]
            ) from exc
        except RecursionError as exc:
            raise RunRejected(
                [Violation(ErrorCode.INVALID_INPUT, "message", "nested too deeply")]
            ) from exc
        return parse_message(data)


# --------------------------------------------------------------------------- rules


def url_problem(url: str, *, allow_local_files: bool = False) -> str | None:
    """Why a caller-supplied file URL is refused, or None (https, runflow assets)."""
    if ASSET_URL.fullmatch(url):
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return "is not a valid URL"
    scheme = parts.scheme.lower()
    if scheme == "http":
        return "uses http:// (only https:// is accepted)"
    if scheme == "file" and allow_local_files:
        return None
    if scheme != "https":
        return "must be an https:// URL or runflow://assets/<uuid>"
    if parts.username is not None or parts.password is not None:
        return "carries credentials"
    if not parts.hostname:
        return "has no host"
    return None


def _origin_allowed(origin: str, allowed_origins: tuple[str, ...]) -> bool:
    return origin.startswith("https://") or any(origin.startswith(p) for p in allowed_origins)


def _pin_violations(
    where: str, pin: GitPin, allowed_origins: tuple[str, ...]
) -> list[Violation]:
    out: list[Violation] = []
    if not isinstance(pin.commit, str) or not HEX40.fullmatch(pin.commit):
        out.append(Violation(ErrorCode.UNPINNED_CUSTOM_NODE, f"{where}.commit",
                             "must be a 40-hex git commit"))
    if not pin.origin:
        out.append(Violation(ErrorCode.FORBIDDEN_ORIGIN, f"{where}.origin", "is missing"))
    elif not isinstance(pin.origin, str) or not _origin_allowed(pin.origin, allowed_origins):
        out.append(Violation(ErrorCode.FORBIDDEN_ORIGIN, f"{where}.origin",
                             "must be an https:// origin"))
    return out


def _relative_key_violation(where: str, key: str) -> Violation | None:
    why = graphs.file_reference_problem(key)
    if why is None and not key.strip("/\\"):
        why = "is empty"
    elif why is None and any(part in ("", ".") for part in re.split(r"[\\/]", key)):
        why = "must name a file (no '.' or empty parts, no trailing slash)"
    if why:
        return Violation(ErrorCode.INVALID_WORKFLOW, where, f"path {why}")
    return None


def effective_inputs(workflow: DeployedWorkflow) -> tuple[dict[str, InputDef], list[Violation]]:
    """Input definitions (declared, completed from the graph) and their problems."""
    problems: list[Violation] = []
    graph = workflow.workflow_json if isinstance(workflow.workflow_json, dict) else {}
    derived = graphs.derived_input_types(graph)
    defs: dict[str, InputDef] = {}
    for i, d in enumerate(workflow.inputs or []):
        if d.input_id not in derived:
            # A definition whose node is gone from the graph declares nothing: a caller
            # value for it is refused as undeclared (SPEC section 3: declared by the graph).
            continue
        if d.input_id in defs:
            problems.append(Violation(ErrorCode.INVALID_WORKFLOW, f"workflow.inputs[{i}]",
                                      f"input_id {d.input_id!r} declared twice"))
        defs[d.input_id] = d
        in_graph = derived.get(d.input_id)
        if in_graph is not None and in_graph != d.type.value:
            problems.append(Violation(ErrorCode.INVALID_WORKFLOW, f"workflow.inputs[{i}].type",
                                      f"{d.type.value} but the graph's node is {in_graph}"))
        if d.default is not None and _type_problem(d.type, d.default, False) is not None:
            problems.append(Violation(ErrorCode.INVALID_WORKFLOW, f"workflow.inputs[{i}].default",
                                      f"is not a valid {d.type.value}"))
    for input_id, kind in derived.items():
        # The deploy plugin removes each input node's value: an input that is only in
        # the graph has no default, so it is required.
        defs.setdefault(input_id, InputDef(input_id=input_id, type=InputType(kind), required=True))
    return defs, problems


def _type_problem(kind: InputType, value: Any, allow_local_files: bool) -> str | None:
    if kind is InputType.STRING:
        return None if isinstance(value, str) else "must be a string"
    if kind is InputType.INT:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else "must be an integer"
    if kind is InputType.FLOAT:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and not math.isfinite(value):  # NaN and infinities are no JSON numbers
            return "must be a finite number"
        return None if ok else "must be a number"
    if kind is InputType.BOOLEAN:
        return None if isinstance(value, bool) else "must be a boolean"
    if not isinstance(value, str):
        return "must be a URL string"
    return url_problem(value, allow_local_files=allow_local_files)


def check_message(
    message: RunMessage,
    *,
    allowed_origins: tuple[str, ...] = (),
    allow_local_files: bool = False,
) -> dict[str, InputDef]:
    """Apply every SPEC section 3 rule checkable without an environment.

    Returns the effective input definitions; raises RunRejected listing every violation.
    ``allow_local_files`` admits ``file://`` inputs (the local CLI only, never the queue).
    """
    wf = message.workflow
    violations: list[Violation] = []
    if not RUN_ID.fullmatch(message.run_id):
        violations.append(Violation(ErrorCode.INVALID_INPUT, "run_id",
                                    "must be 1-128 characters of A-Z a-z 0-9 . _ -"))
    violations += _pin_violations("workflow.environment.comfyui", wf.environment.comfyui,
                                  allowed_origins)
    for name, pin in wf.custom_nodes.items():
        violations += _pin_violations(f"workflow.custom_nodes.{name}", pin, allowed_origins)
    for key, model in wf.models.items():
        if not _is_sha256(model.sha256):
            violations.append(Violation(ErrorCode.INVALID_SHA, f"workflow.models.{key}.sha256",
                                        "must be 64 hex characters"))
        bad = _relative_key_violation(f"workflow.models.{key}", key)
        if bad:
            violations.append(bad)
    for key, res in wf.resources.items():
        if not _is_sha256(res.sha256):
            violations.append(Violation(ErrorCode.INVALID_SHA,
                                        f"workflow.resources.{key}.sha256",
                                        "must be 64 hex characters"))
        bad = _relative_key_violation(f"workflow.resources.{key}", key)
        if bad is None and re.split(r"[\\/]", key)[0] == INPUTS_SUBDIR:
            # That folder holds the callers' files: a resource there could be replaced by
            # one, or replace one.
            bad = Violation(ErrorCode.INVALID_WORKFLOW, f"workflow.resources.{key}",
                            f"path must not be under {INPUTS_SUBDIR}/ (the callers' files)")
        if bad:
            violations.append(bad)

    for p in graphs.structure_problems(wf.workflow_json):
        violations.append(Violation(ErrorCode.INVALID_WORKFLOW, p.field, p.message))
    if isinstance(wf.workflow_json, dict):
        for p in graphs.input_node_problems(wf.workflow_json):
            violations.append(Violation(ErrorCode.INVALID_WORKFLOW, p.field, p.message))

    defs, def_problems = effective_inputs(wf)
    violations += def_problems
    for key, value in message.input.items():
        d = defs.get(key)
        if d is None:
            violations.append(Violation(ErrorCode.INVALID_INPUT, f"input.{key}",
                                        "is not an input of this workflow"))
            continue
        why = _type_problem(d.type, value, allow_local_files)
        if why:
            violations.append(Violation(ErrorCode.INVALID_INPUT, f"input.{key}", why))
    for input_id, d in defs.items():
        if input_id not in message.input and d.default is None and d.required:
            violations.append(Violation(ErrorCode.INVALID_INPUT, f"input.{input_id}",
                                        "is required"))
    if message.callback_url is not None:
        why = url_problem(message.callback_url)
        if why or message.callback_url.startswith("runflow://"):
            violations.append(Violation(ErrorCode.INVALID_INPUT, "callback_url",
                                        why or "must be an https:// URL"))
    if violations:
        raise RunRejected(violations)
    return defs


def resolved_values(message: RunMessage, defs: dict[str, InputDef]) -> dict[str, Any]:
    """Caller values completed with defaults (inputs with neither are left out)."""
    values: dict[str, Any] = {}
    for input_id, d in defs.items():
        if input_id in message.input:
            values[input_id] = message.input[input_id]
        elif d.default is not None:
            values[input_id] = d.default
    return values
