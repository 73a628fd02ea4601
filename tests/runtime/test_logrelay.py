"""The ComfyUI child's output reaches the worker's log as records of ``runflow.comfyui``:
lines capped, text only, tagged with the parent's job, the volume bounded."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from runflow_worker.runtime import protocol as p
from runflow_worker.runtime.logrelay import LOGGER, LogRelay
from runflow_worker.runtime.runner import Runner, RunnerConfig
from tests.fakes import HOSTILE_CHILD

pytestmark = pytest.mark.timeout(60)


class Records(logging.Handler):
    """Collects the records of the relay's logger."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    logger = logging.getLogger(LOGGER)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def relay_of(data: bytes, job: str | None = "run-1:1:9", **limits: float) -> LogRelay:
    """A relay that reads ``data`` from a pipe until its end; joined."""
    r, w = os.pipe()
    relay = LogRelay(r, lambda: job, **limits)
    writer = threading.Thread(target=lambda: (os.write(w, data) if len(data) < 60000
                                              else _write_all(w, data), os.close(w)))
    writer.start()
    writer.join(30)
    assert relay.join(timeout_s=30), "the relay did not end at the end of the pipe"
    return relay


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


FORGED = {"ts": "2020-01-01T00:00:00.000+00:00", "level": "error", "logger": "runflow_worker.serve.daemon",
          "msg": "run succeeded", "run_id": "victim", "job_id": "victim:1:1",
          "event": "run_succeeded", "process": "worker"}


def test_a_forged_worker_line_is_the_childs_with_the_parents_run(records: Records) -> None:
    relay_of(json.dumps(FORGED).encode() + b"\nplain print\n")
    forged, plain = records.records
    assert forged.name == LOGGER and forged.levelno == logging.ERROR
    assert forged.getMessage() == "run succeeded"
    assert (forged.run_id, forged.job_id) == ("run-1", "run-1:1:9")
    assert forged.child_logger == "runflow_worker.serve.daemon" and forged.origin == "comfyui"
    assert not hasattr(forged, "event")
    assert plain.getMessage() == "plain print" and plain.levelno == logging.INFO
    assert plain.run_id == "run-1" and not hasattr(plain, "child_logger")


def test_lines_without_a_job_carry_no_run_id(records: Records) -> None:
    relay_of(json.dumps(FORGED).encode() + b"\n", job=None)
    (record,) = records.records
    assert not hasattr(record, "run_id") and not hasattr(record, "job_id")


def test_long_lines_are_cut_and_bytes_decoded_leniently(records: Records) -> None:
    data = b"a" * 100_000 + b"\n" + b"bad \xff\xfe utf-8\n" + b"x" * 3_000_000
    relay = relay_of(data, line_max_bytes=1024)
    long_line, bad, endless = (r.getMessage() for r in records.records)
    assert long_line == "a" * 1024 + " [line cut: over 1024 bytes]"
    assert bad == "bad \ufffd\ufffd utf-8"
    assert endless.startswith("x" * 1024) and endless.endswith("[line cut: over 1024 bytes]")
    assert len(relay._buf) == 0


def test_a_progress_bar_keeps_its_last_state(records: Records) -> None:
    relay_of(b"".join(b"\r%3d%%|###" % i for i in range(0, 101, 5)) + b"\r\n")
    assert [r.getMessage() for r in records.records] == ["100%|###"]


def test_a_flood_is_dropped_and_counted(records: Records) -> None:
    lines = 20_000
    relay = relay_of(b"spam spam spam\n" * lines, lines_burst=100, lines_per_s=1.0)
    spam = [r for r in records.records if r.getMessage() == "spam spam spam"]
    dropped = [r for r in records.records if getattr(r, "event", "") == "child_output_dropped"]
    assert 100 <= len(spam) < 200
    assert dropped and sum(r.dropped for r in dropped) == lines - len(spam)
    assert relay.dropped_total == lines - len(spam)
    assert "lines of the ComfyUI process's output dropped" in dropped[-1].getMessage()


def test_stop_ends_the_thread_while_a_writer_holds_the_pipe(records: Records) -> None:
    r, w = os.pipe()
    relay = LogRelay(r)
    try:
        os.write(w, b"before stop\n")
        relay.stop()
        assert relay.join(timeout_s=10)
        assert [rec.getMessage() for rec in records.records] == ["before stop"]
    finally:
        os.close(w)


def test_a_line_written_before_stop_is_relayed_whatever_the_interleaving(
        records: Records) -> None:
    # The line and the stop arrive between the thread's drain and its look at the stop
    # flag: the thread must still read the line before it ends.
    r, w = os.pipe()
    relay = LogRelay(r)
    real_drain = relay._drain
    fired = threading.Event()

    def drain_then_write_and_stop(max_bytes: int) -> bool:
        eof = real_drain(max_bytes)
        if not fired.is_set():
            fired.set()
            os.write(w, b"between drain and stop\n")
            relay.stop()
        return eof

    relay._drain = drain_then_write_and_stop  # type: ignore[method-assign]
    try:
        relay._wake()  # the thread drains again, through the wrapper
        assert relay.join(timeout_s=10)
        assert fired.is_set()
        assert [rec.getMessage() for rec in records.records] == ["between drain and stop"]
    finally:
        os.close(w)


def test_the_childs_stderr_is_relayed_with_the_run_the_parent_runs(
        tmp_path: Path, records: Records) -> None:
    for d in ("in", "out", "tmp"):
        (tmp_path / d).mkdir()
    runner = Runner(RunnerConfig(comfyui_dir=str(tmp_path), base_dir=str(tmp_path / "b"),
                                 child_entry=HOSTILE_CHILD,
                                 startup_timeout_s=60))
    graph = {"1": {"class_type": "HostileLog",
                   "inputs": {"line": json.dumps(FORGED), "count": 3000}}}
    try:
        runner.start()
        relay = runner._proc.output
        out = runner.execute(p.Execute("mine-7:1:2", graph, str(tmp_path / "in"),
                                       str(tmp_path / "out"), str(tmp_path / "tmp")))
        assert isinstance(out, p.Done)
        runner.stop()
        assert relay.join(timeout_s=10), "the output thread outlived the child"
    finally:
        runner.stop()
    forged = [r for r in records.records if r.getMessage() == "run succeeded"]
    assert forged and all(r.run_id == "mine-7" for r in forged)
    assert all(r.job_id == "mine-7:1:2" for r in forged)
    # 3000 lines at once: the burst passes, the rest is counted.
    dropped = sum(getattr(r, "dropped", 0) for r in records.records)
    assert len(forged) + dropped == 3000 and len(forged) <= 1100


def test_lines_written_before_a_job_change_keep_their_job_however_short_the_job(
        records: Records) -> None:
    # A job that ends before the relay's thread ever ran: its lines are in the pipe when
    # the parent learns of the end, and must still carry it, not the next job (or none).
    r, w = os.pipe()
    jobs: list[str | None] = [None]
    relay = LogRelay(r, lambda: jobs[-1])
    try:
        for job in ("run-a:1:1", "run-b:1:2"):
            jobs.append(job)
            relay.job_changed()
            os.write(w, f"line of {job}\n".encode())
            jobs.append(None)
            relay.job_changed()  # the job's end: its lines are read before this returns
            got = [(rec.getMessage(), getattr(rec, "job_id", None)) for rec in records.records]
            assert got[-1] == (f"line of {job}", job)
        os.write(w, b"between jobs\n")
    finally:
        os.close(w)
        assert relay.join(timeout_s=30)
    assert getattr(records.records[-1], "job_id", None) is None
