"""Structured logging: one JSON object per line, secrets scrubbed (SPEC §8).

``configure_logging`` installs ``JsonFormatter`` on the root logger. Callers attach fields
with ``extra={"run_id": ..., "event": ...}``; every such field lands as a top-level key.
Before a line is written, presigned URL queries, URL credentials and ``whsec_`` secrets are
replaced by ``[redacted]``, in the message and in every string field, so a secret that slips
into an exception text still never reaches the log.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from runflow_worker.runtime.redact import redact
from runflow_worker.runtime.redact import scrub as _scrub

# Attributes every LogRecord has; anything else was passed through ``extra=``.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName",
}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line: ts, level, logger, msg and every ``extra`` field."""

    def format(self, record: logging.LogRecord) -> str:
        """The JSON line for ``record`` (secrets redacted)."""
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                out[key] = _scrub(value)
        if record.exc_info and record.exc_info[0] is not None:
            out["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(out, default=str, ensure_ascii=False)


def configure_logging(level: str = "INFO", *, stream: TextIO | None = None) -> None:
    """Send every log record to ``stream`` (stderr) as JSON lines at ``level``."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
