"""Run messages that do not parse: the rejection, and the failed record that still names the run.

``parse_delivery`` turns whatever goes wrong while reading a message (a shape error, a JSON
nested too deeply for ``json.loads``, a bug) into a rejection, so no entry can crash the
worker on every delivery. (A message that parses but is nested deeper than the record
serialiser allows is found when its first record is written: ``recordstore.NotSerialisable``,
which the daemon turns into the same rejection with ``unreadable``.)

``salvage_record`` gives the ``failed`` record (built by ``run.record.unparseable_record``)
from what can still be read of the raw JSON: ``salvage_members`` decodes the top-level
members one by one, without recursion, so one unreadable member (``metadata`` nested 5000
levels deep, a truncated tail) does not hide the run id and the client's references.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from datetime import datetime
from json.decoder import scanstring
from typing import Any

from pydantic import TypeAdapter, ValidationError

from runflow_worker.errors import ErrorCode, QueueError, RunFailure, RunRejected, Violation
from runflow_worker.run.contract import RUN_ID, RunMessage, RunRecord, parse_message_json
from runflow_worker.run.record import unparseable_record

log = logging.getLogger(__name__)

COPIED_FIELDS = ("workflow", "created_at", "client_ref", "metadata")
"""Fields of the failed record taken from the raw message (or the enqueuer's record)."""
_DATETIME: TypeAdapter[datetime] = TypeAdapter(datetime)


def parse_delivery(payload: str | None) -> tuple[RunMessage | None, RunRejected | None]:
    """The run message of an entry's payload, or why it is refused; never raises.

    Whatever goes wrong while reading a message is the message's fault, not the worker's:
    an exception escaping here would leave the entry pending, redelivered and failing again
    before the ``max_deliveries`` check could end it.
    """
    try:
        # No serialisation here to test the nesting depth: it would cost every delivery a
        # second pass over the whole message, while only the rare over-deep one needs it.
        message = parse_message_json(payload or "")
    except RunRejected as exc:
        return None, exc
    except Exception as exc:  # noqa: BLE001 - see the docstring
        return None, unreadable(exc)
    return message, None


def unreadable(exc: BaseException | None) -> RunRejected:
    """The rejection (INVALID_INPUT on ``message``) of a message whose reading raised ``exc``."""
    if isinstance(exc, RecursionError) or "depth" in str(exc):
        why = "nested too deeply"
    else:
        why = f"cannot be read ({type(exc).__name__})" if exc is not None else "cannot be read"
    return RunRejected([Violation(ErrorCode.INVALID_INPUT, "message", why)])


def salvage_record(payload: str | None, exc: RunFailure, *, gpu_class: str,
                   started_at: datetime, queue_ms: int,
                   read_record: Callable[[str], RunRecord | None] | None = None
                   ) -> tuple[RunRecord | None, str | None]:
    """The ``failed`` record of an entry whose message does not parse, and its callback URL.

    ``exc`` is the record's error: the rejection, or ``WORKER_LOST`` past the delivery limit.

    The run id, attempt and callback URL are read best-effort from the raw JSON; without a
    usable run id there can be no record (None: the entry goes to the dead letters).
    ``workflow`` (owner, slug, version), ``created_at``, ``client_ref`` and ``metadata``
    come from the raw JSON where they are well-typed, else from the record the enqueuer
    wrote (``read_record(run_id)``), so clients still find their run by their references.
    Only a Redis error (``QueueError``) leaves this function.
    """
    try:
        return _salvage_record(payload, exc, gpu_class=gpu_class, started_at=started_at,
                               queue_ms=queue_ms, read_record=read_record)
    except QueueError:
        raise
    except Exception:  # a bug here must not leave the entry redelivered forever
        log.exception("cannot build the record of an unparseable message",
                      extra={"event": "internal_error"})
        return None, None


def _salvage_record(payload: str | None, exc: RunFailure, *, gpu_class: str,
                    started_at: datetime, queue_ms: int,
                    read_record: Callable[[str], RunRecord | None] | None
                    ) -> tuple[RunRecord | None, str | None]:
    data = salvage_members(payload or "")
    run_id = (data or {}).get("run_id")
    if data is None or not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
        return None, None
    attempt = data.get("attempt")
    attempt = attempt if isinstance(attempt, int) and attempt >= 1 else 1
    url = data.get("callback_url")
    known = _well_typed_fields(data)
    existing = _read_quietly(read_record, run_id) if read_record is not None else None
    if existing is not None and existing.id == run_id:
        for name in COPIED_FIELDS:
            value = getattr(existing, name)
            if name not in known and value not in (None, {}):
                known[name] = value
    record = unparseable_record(run_id, attempt, exc, started_at=started_at,
                                gpu_class=gpu_class, queue_ms=queue_ms, copied=known)
    return record, url if isinstance(url, str) else None


def _read_quietly(read_record: Callable[[str], RunRecord | None], run_id: str
                  ) -> RunRecord | None:
    """``read_record(run_id)``; None when the stored record does not parse."""
    try:
        return read_record(run_id)
    except QueueError:
        raise
    except Exception:  # noqa: BLE001 - a record that does not parse gives nothing
        return None


def _well_typed_fields(data: dict[str, Any]) -> dict[str, Any]:
    """The ``COPIED_FIELDS`` that the raw message gives with the record's types."""
    out: dict[str, Any] = {}
    wf = data.get("workflow")
    if isinstance(wf, dict):
        names = {k: wf.get(k) for k in ("owner", "slug", "version")}
        if all(v is None or isinstance(v, str) for v in names.values()) and any(
                names.values()):
            out["workflow"] = names
    created_at = data.get("created_at")
    if isinstance(created_at, str):
        try:
            out["created_at"] = _DATETIME.validate_python(created_at)
        except ValidationError:
            pass
    if isinstance(data.get("client_ref"), str):
        out["client_ref"] = data["client_ref"]
    if isinstance(data.get("metadata"), dict):
        out["metadata"] = data["metadata"]
    return out


# --------------------------------------------------------------------------- raw JSON

_WHITESPACE = " \t\n\r"
_STRUCTURAL = re.compile(r'["{}\[\]]')


def salvage_members(payload: str) -> dict[str, Any] | None:
    """The top-level members of a JSON object, decoded best-effort; None if it is none.

    ``json.loads`` first. When the text is nested too deeply (RecursionError) or broken,
    its top-level members are cut out without recursion and each is decoded alone, so one
    unreadable member (a ``metadata`` nested 5000 levels deep, a truncated tail) does not
    hide the run id of the others.
    """
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):
        return _members_one_by_one(payload)
    return data if isinstance(data, dict) else None


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WHITESPACE:
        i += 1
    return i


def _value_end(text: str, i: int) -> int:
    """Index just past the JSON value starting at ``text[i]``, found without recursion
    (brackets counted, strings skipped); ValueError when it does not end."""
    if text[i] == '"':
        return scanstring(text, i + 1)[1]
    if text[i] not in "{[":
        j = i
        while j < len(text) and text[j] not in ",}]" + _WHITESPACE:
            j += 1
        return j
    depth = 0
    while (m := _STRUCTURAL.search(text, i)) is not None:
        ch, i = m.group(), m.start()
        if ch == '"':
            i = scanstring(text, i + 1)[1]
            continue
        depth += 1 if ch in "{[" else -1
        i += 1
        if depth == 0:
            return i
    raise ValueError("unterminated JSON value")


def _members_one_by_one(text: str) -> dict[str, Any] | None:
    """The members of the object ``text`` opens that decode alone (None: no object)."""
    i = _skip_ws(text, 0)
    if text[i:i + 1] != "{":
        return None
    out: dict[str, Any] = {}
    try:
        i = _skip_ws(text, i + 1)
        while text[i:i + 1] == '"':
            key, i = scanstring(text, i + 1)
            i = _skip_ws(text, i)
            if text[i:i + 1] != ":":
                break
            start = _skip_ws(text, i + 1)
            if start >= len(text):
                break
            end = _value_end(text, start)
            try:
                out[key] = json.loads(text[start:end])
            except (ValueError, RecursionError):
                pass  # this member alone is unreadable; the others may not be
            i = _skip_ws(text, end)
            if text[i:i + 1] != ",":
                break
            i = _skip_ws(text, i + 1)
    except ValueError:
        pass  # a broken tail: keep the members read so far
    return out
