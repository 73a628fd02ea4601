"""``--input KEY=VALUE`` parsing per the declared input type, and deployed-file loading."""

from __future__ import annotations

import argparse
import json
import uuid
from pathlib import Path
from typing import Any

from runflow_worker.errors import ErrorCode, RunRejected, Violation
from runflow_worker.run.contract import (
    InputDef,
    InputType,
    RunMessage,
    effective_inputs,
    parse_message,
    utcnow,
)

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


def message_from_args(args: argparse.Namespace) -> RunMessage:
    """A fresh run message (attempt 1, created now) from ``run``/``submit`` arguments.

    The message's own ``run_id`` is kept (SPEC §2); ``--run-id`` names a message that has
    none (a different one is refused: INVALID_INPUT on ``run_id``); else a new id is made.
    ``--inputs-json`` and then ``--input`` values are laid over the message's ``input``.
    Raises RunRejected.
    """
    data = load_deployed(args.deployed)
    own = data.get("run_id")
    if args.run_id:
        if own not in (None, "") and own != args.run_id:
            raise RunRejected([Violation(
                ErrorCode.INVALID_INPUT, "run_id",
                f"--run-id {args.run_id!r} differs from the message's run_id {own!r}; "
                "the message's run_id is kept, so give --run-id only for a message without "
                "one")])
        data["run_id"] = args.run_id
    elif own in (None, ""):
        data["run_id"] = uuid.uuid4().hex
    data["attempt"] = 1
    data["created_at"] = utcnow().isoformat()
    data.pop("billing", None)
    if args.timeout_s is not None:
        data["timeout_s"] = args.timeout_s
    if getattr(args, "callback_url", None):
        data["callback_url"] = args.callback_url
    message = parse_message(data)
    values: dict[str, Any] = dict(message.input)
    if args.inputs_json is not None:
        values.update(load_inputs_json(args.inputs_json))
    if args.input:
        defs, _ = effective_inputs(message.workflow)
        values.update(parse_cli_inputs(defs, args.input))
    return message.model_copy(update={"input": values})
