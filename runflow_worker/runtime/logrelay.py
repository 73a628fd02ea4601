"""The ComfyUI child's stdout and stderr, re-emitted as the worker's own log records.

The child's output is untrusted text: a custom node can print anything, forge a JSON line
that looks like the worker's, print without end. So the child writes into a pipe, never
into the worker's stderr, and a thread of the parent (``LogRelay``) turns each line into a
record of the ``runflow.comfyui`` logger:

- a line is at most ``LINE_MAX_BYTES`` (the rest is dropped and the line marked), decoded
  leniently (invalid UTF-8 replaced); a progress bar's carriage returns keep only what a
  terminal would show last;
- a line in the child's JSON shape (``runtime.childlog``) gives its ``level``, ``msg`` and
  ``logger`` (as ``child_logger``); any other line is logged as its text, at info; every
  record has ``origin: "comfyui"``;
- ``run_id`` and ``job_id`` are the job the parent is running (``set_job``), never what
  the line claims; lines read while no job runs carry none;
- a token bucket (``LINES_BURST`` lines, ``LINES_PER_S`` a second; the same in bytes) bounds
  the volume: lines over it are read and dropped, and one warning record counts them.

Memory is bounded (one line and one read chunk), the thread reads as fast as the child
writes (so the child never blocks on a full pipe because of the worker's log), and it ends
when the child's end of the pipe closes or ``stop`` is called, whichever comes first.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from runflow_worker.runtime.childlog import LINE_MAX_BYTES, run_id_of
from runflow_worker.runtime.wire import readable

LOGGER = "runflow.comfyui"
LINES_BURST = 1000
LINES_PER_S = 200.0
BYTES_BURST = 1 << 20
BYTES_PER_S = 256 * 1024.0
_READ_CHUNK_BYTES = 1 << 16
_DRAIN_MAX_BYTES = 4 << 20
"""At most this much is read after ``stop`` (a process the child forked may still write)."""
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}
_CUT_MARK = " [line cut: over {} bytes]"


class _Bucket:
    """A token bucket: ``take(n)`` is True while ``n`` tokens are left."""

    def __init__(self, burst: float, per_s: float) -> None:
        self.burst, self.per_s = burst, per_s
        self.tokens = burst
        self.at = time.monotonic()

    def take(self, n: float, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.per_s)
        self.at = now
        if self.tokens < n:
            return False
        self.tokens -= n
        return True


class LogRelay:
    """Reads the child's output pipe ``fd`` on its own thread and logs each line."""

    def __init__(self, fd: int, job_of: Callable[[], str | None] = lambda: None, *,
                 line_max_bytes: int = LINE_MAX_BYTES, lines_burst: int = LINES_BURST,
                 lines_per_s: float = LINES_PER_S, bytes_burst: int = BYTES_BURST,
                 bytes_per_s: float = BYTES_PER_S) -> None:
        self._fd = fd
        self._job_of = job_of
        self._job: str | None = job_of()
        self._line_max = line_max_bytes
        self._lines = _Bucket(lines_burst, lines_per_s)
        self._bytes = _Bucket(bytes_burst, bytes_per_s)
        self.dropped = 0
        """Lines dropped over the rate limit and not yet reported."""
        self.dropped_total = 0
        self.failed = 0
        """Lines a logging handler failed on."""
        self._log = logging.getLogger(LOGGER)
        self._buf = bytearray()
        self._skipping = False  # inside a line already cut: drop up to its newline
        self._lock = threading.Lock()
        self._stopping = False
        self._closed = False
        # Held while reading the pipe and while switching jobs: ``job_changed`` drains in
        # the caller's thread, so lines are read by one thread at a time.
        self._read_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(fd, False)
        self._thread = threading.Thread(target=self._run, name="runflow-child-output",
                                        daemon=True)
        self._thread.start()

    def job_changed(self) -> None:
        """The parent's job changed (``job_of`` answers anew): lines already in the pipe
        keep the job they were written under; later ones get the new one.

        Done here, in the caller's thread, before it returns: the child writes a job's
        lines before it reports the job's end, so they are in the pipe by the time the
        parent moves on. Left to the reader thread, a short job could end before that
        thread ran, and its lines would be read under the next job (or none).

        The reader thread is not woken: it waits on the pipe, which stays readable for
        whatever this drain left (an end of file included). Waking it cost two thread
        switches a job, on every run's path.
        """
        with self._read_lock:
            if self._closed:
                return
            self._drain(_DRAIN_MAX_BYTES)
            self._job = self._job_of()

    def stop(self) -> None:
        """End the thread after it read what is in the pipe now (never blocks)."""
        with self._lock:
            self._stopping = True
        self._wake()

    def join(self, timeout_s: float) -> bool:
        """Wait for the thread to end; True when it did within ``timeout_s``."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _wake(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:
                pass  # the thread has wake-ups pending anyway

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        try:
            while True:
                # The stop flag is read before the drain: a stop seen here came after what
                # it follows was written, so this drain still reads it (read after the
                # drain, a stop could end the thread with those lines unread).
                with self._lock:
                    stopping = self._stopping
                with self._read_lock:
                    eof = self._drain(_DRAIN_MAX_BYTES)
                if eof or stopping:
                    break
                if self._wake_r in readable([self._fd, self._wake_r], None):
                    os.read(self._wake_r, 4096)
        except Exception:  # noqa: BLE001 - a relay bug must not go unseen, nor loop
            self._log.exception("reading the ComfyUI process's output failed")
        finally:
            self._report_dropped()
            with self._read_lock, self._lock:
                self._closed = True
                for fd in (self._fd, self._wake_r, self._wake_w):
                    os.close(fd)

    def _drain(self, max_bytes: int) -> bool:
        """Read and log what the pipe holds now (up to ``max_bytes``); True at end of file."""
        read = 0
        while read < max_bytes:
            try:
                chunk = os.read(self._fd, _READ_CHUNK_BYTES)
            except BlockingIOError:
                return False
            if not chunk:
                if self._buf and not self._skipping:
                    self._line(bytes(self._buf))
                self._buf.clear()
                return True
            read += len(chunk)
            self._feed(chunk)
        return False

    def _feed(self, chunk: bytes) -> None:
        self._buf += chunk
        while (end := self._buf.find(b"\n")) >= 0:
            line = bytes(self._buf[:end])
            del self._buf[:end + 1]
            if self._skipping:
                self._skipping = False
                continue
            self._line(line)
        if len(self._buf) > self._line_max:
            if self._skipping:
                self._buf.clear()
                return
            cr = self._buf.rfind(b"\r")
            if cr >= 0:  # a progress bar redrawn in place: only its last state counts
                del self._buf[:cr + 1]
            if len(self._buf) > self._line_max:
                self._line(bytes(self._buf))
                self._buf.clear()
                self._skipping = True

    def _line(self, raw: bytes) -> None:
        raw = raw.rstrip(b"\r")
        raw = raw[raw.rfind(b"\r") + 1:]
        if not raw.strip():
            return
        cut = len(raw) > self._line_max
        if cut:
            raw = raw[:self._line_max]
        now = time.monotonic()
        if not (self._lines.take(1, now) and self._bytes.take(len(raw), now)):
            self.dropped += 1
            self.dropped_total += 1
            return
        self._report_dropped()
        text = raw.decode("utf-8", errors="replace")
        level, msg, child_logger = _parse(text)
        if cut:
            msg += _CUT_MARK.format(self._line_max)
        extra: dict[str, Any] = {"origin": "comfyui"}
        if child_logger is not None:
            extra["child_logger"] = child_logger
        job = self._job
        if job is not None:
            extra["run_id"] = run_id_of(job)
            extra["job_id"] = job
        try:
            self._log.log(level, "%s", msg, extra=extra)
        except Exception:  # noqa: BLE001 - keep reading: a stopped reader blocks the child
            self.failed += 1

    def _report_dropped(self) -> None:
        if self.dropped:
            n, self.dropped = self.dropped, 0
            self._log.warning("%d lines of the ComfyUI process's output dropped (over the "
                              "rate limit)", n, extra={"origin": "comfyui",
                                                       "event": "child_output_dropped",
                                                       "dropped": n})


def _parse(text: str) -> tuple[int, str, str | None]:
    """(level, message, child logger) of one line: the child's JSON shape, or plain text."""
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError):
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("msg"), str):
            level = obj.get("level")
            name = obj.get("logger")
            return (_LEVELS.get(level, logging.INFO) if isinstance(level, str) else logging.INFO,
                    obj["msg"], name[:200] if isinstance(name, str) else None)
    return logging.INFO, text, None
