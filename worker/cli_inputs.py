"""``--input KEY=VALUE`` parsing per the declared input type, and deployed-file loading."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from worker.contract import InputDef, InputType
from worker.errors import ErrorCode, RunRejected, Violation

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _parse_one(d: InputDef, raw: str) -> Any:
    if d.type is InputType.STRING:
        return raw
    if d.type is InputType.INT:
        return int(raw, 10)
    if d.type is InputType.FLOAT:
        return float(raw)
    if d.type is InputType.BOOLEAN:
        low = raw.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError("expected true or false")
    if raw.startswith("@"):
        path = Path(raw[1:]).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"no such file: {raw[1:]}")
        return path.as_uri()
    return raw


def parse_cli_inputs(defs: dict[str, InputDef], pairs: list[str]) -> dict[str, Any]:
    """Parse ``KEY=VALUE`` pairs per ``defs``; ``@path`` names a local file.

    Raises RunRejected (INVALID_INPUT) naming every offending key.
    """
    values: dict[str, Any] = {}
    violations: list[Violation] = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        field = f"input.{key}"
        if not sep or not key:
            violations.append(Violation(ErrorCode.INVALID_INPUT, f"input.{pair}",
                                        "must be KEY=VALUE"))
            continue
        d = defs.get(key)
        if d is None:
            violations.append(Violation(ErrorCode.INVALID_INPUT, field,
                                        "is not an input of this workflow"))
            continue
        try:
            values[key] = _parse_one(d, raw)
        except ValueError as exc:
            violations.append(Violation(ErrorCode.INVALID_INPUT, field,
                                        f"not a valid {d.type.value}: {exc}"))
    if violations:
        raise RunRejected(violations)
    return values


def load_deployed(path: Path) -> dict[str, Any]:
    """Read DEPLOYED.json: a ``workflow`` object, or a whole run message (has ``workflow``)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RunRejected([Violation(ErrorCode.INVALID_WORKFLOW, str(path),
                                     f"cannot read the deployed workflow: {exc}")]) from exc
    if not isinstance(data, dict):
        raise RunRejected([Violation(ErrorCode.INVALID_WORKFLOW, str(path),
                                     "must be a JSON object")])
    if "workflow" in data and "workflow_json" not in data:
        return data
    return {"workflow": data}


def load_inputs_json(path: Path) -> dict[str, Any]:
    """Read ``--inputs-json``: the ``input`` object verbatim (strict JSON types)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RunRejected([Violation(ErrorCode.INVALID_INPUT, "input",
                                     f"cannot read {path}: {exc}")]) from exc
    if not isinstance(data, dict):
        raise RunRejected([Violation(ErrorCode.INVALID_INPUT, "input", "must be a JSON object")])
    return data
