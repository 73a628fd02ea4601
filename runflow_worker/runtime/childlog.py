"""Logging of the ComfyUI child: one JSON object per line on stderr, secrets redacted.

The child's stderr is a pipe the parent reads (``runtime.logrelay``), which re-emits each
line as a record of the worker's own log. ComfyUI's records (``!!! Exception during
processing !!!`` and its traceback) are written as JSON lines so the relay keeps their
level and logger: ``ts``, ``level``, ``logger``, ``msg`` (a traceback stays inside ``msg``,
so a record is always one line, cut in its middle to stay within ``LINE_MAX_BYTES``),
``process: "comfyui"``, and ``run_id``/``job_id`` while a job runs (for reading the child's
output by hand: the relay tags records with the job the parent runs, never with these).

Why the child writes its own lines instead of forwarding records over the channel: the
parent reads the channel only while a job runs, so records logged while idle or during
start would fill it and block the child; and the last lines before a crash would die with
it. A line written to stderr is out of the process at once.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from datetime import UTC, datetime
from typing import Any, TextIO

from runflow_worker.runtime.redact import redact

LINE_MAX_BYTES = 16 * 1024
"""The longest line the parent's relay takes whole (longer ones are cut there)."""
_LOGGER_MAX_CHARS = 200

_job_id: str | None = None


def set_job(job_id: str | None) -> None:
    """Tag the following lines with ``job_id`` (and its run id); None once the job ended.

    A process-wide value, not a context variable: the child runs one job at a time, and a
    node's own threads log for that job too.
    """
    global _job_id
    _job_id = job_id


def run_id_of(job_id: str) -> str:
    """The run id in a worker job id (``<run_id>:<attempt>:<nonce>``; run ids have no ':')."""
    return job_id.split(":", 1)[0]


class ChildJsonFormatter(logging.Formatter):
    """One JSON line per record: ts, level, logger, msg (traceback included), run_id."""

    def format(self, record: logging.LogRecord) -> str:
        """The JSON line for ``record``; never raises (a broken record still logs)."""
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad %-format in a node's log call
            text = f"{record.msg!r} % {record.args!r}"
        if record.exc_info and record.exc_info[0] is not None:
            text = f"{text}\n{self.formatException(record.exc_info)}"
        if record.stack_info:
            text = f"{text}\n{self.formatStack(record.stack_info)}"
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name[:_LOGGER_MAX_CHARS],
            "msg": redact(text.rstrip("\n")),
            "process": "comfyui",
        }
        job_id = _job_id
        if job_id is not None:
            out["run_id"] = run_id_of(job_id)
            out["job_id"] = job_id
        return _within_limit(out)


def _within_limit(out: dict[str, Any]) -> str:
    """The JSON line of ``out``, its ``msg`` cut in the middle until the line fits
    ``LINE_MAX_BYTES`` (a traceback's end says the most, so more of the end is kept)."""
    line = json.dumps(out, default=str, ensure_ascii=False)
    msg, keep = out["msg"], len(out["msg"])
    while len(line.encode("utf-8", errors="replace")) > LINE_MAX_BYTES and keep > 0:
        keep //= 2
        head = keep // 4
        tail = keep - head
        out["msg"] = (f"{msg[:head]} [... {len(msg) - keep} characters cut ...] "
                      f"{msg[len(msg) - tail:]}")
        line = json.dumps(out, default=str, ensure_ascii=False)
    return line


def install(level: int | str = logging.INFO, stream: TextIO | None = None) -> None:
    """Make the root logger write JSON lines to ``stream`` (stderr) at ``level``.

    Called before ComfyUI is imported; ComfyUI configures logging only in its ``main.py``,
    which the embedding never runs, so nothing replaces this handler.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(ChildJsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)  # warnings.warn from nodes: JSON lines too
    crash_log = logging.getLogger("runflow_worker.runtime.child")

    def excepthook(kind: Any, exc: Any, tb: Any) -> None:
        crash_log.critical("uncaught exception", exc_info=(kind, exc, tb))

    def thread_excepthook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is not SystemExit:
            name = args.thread.name if args.thread is not None else "?"
            crash_log.error("uncaught exception in thread %s", name,
                            exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook
