"""Enqueueing: a run id is enqueued once, and ``submit`` keeps the message's run id.

A repeated enqueue (a retried API call, ``submit`` of the same message file) must neither run
a finished run again nor overwrite its outcome, nor start a second execution of a run that is
queued or running (SPEC §2: a run is finalised exactly once).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from runflow_worker.cli.inputs import message_from_args
from runflow_worker.errors import RunRejected
from runflow_worker.serve import keys
from runflow_worker.serve.recordstore import RunExists
from tests.support import factories
from tests.support.cli import run_cli
from tests.support.queue import (
    events,
    graph,
    is_terminal,
    record,
    status_of,
    submit,
    terminal_events,
)
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(60)


def test_enqueueing_a_finished_run_again_is_refused_and_it_runs_once(
        r, inprocess_worker, tmp_path: Path) -> None:
    mark = tmp_path / "mark"
    g = graph(mark=mark, tag="x")
    submit(r, "dup", g)
    inprocess_worker(sandbox="none")  # the test child writes the mark outside
    wait_for(lambda: is_terminal(r, "dup"), 20, "the first outcome")
    first = record(r, "dup")
    with pytest.raises(RunExists) as info:
        submit(r, "dup", g)
    assert info.value.status == "succeeded" and "dup" in str(info.value)
    # Nothing was written: the outcome, its one terminal event, one execution.
    assert record(r, "dup") == first
    assert len(terminal_events(r, "dup")) == 1
    assert [e["status"] for e in events(r, "dup") if e["type"] == "status"] == [
        "queued", "running", "succeeded"]
    assert r.xlen(keys.runs_stream("cpu")) == 0
    assert mark.read_text().splitlines() == ["x"]


def test_enqueueing_a_queued_or_running_run_again_is_refused(r, inprocess_worker,
                                                            tmp_path: Path) -> None:
    mark = tmp_path / "mark"
    g = graph(sleep_s=1.0, mark=mark, tag="once")
    submit(r, "twice", g)
    with pytest.raises(RunExists) as info:
        submit(r, "twice", g)
    assert info.value.status == "queued"
    assert r.xlen(keys.runs_stream("cpu")) == 1
    inprocess_worker(sandbox="none")  # the test child writes the mark outside
    wait_for(lambda: status_of(r, "twice") == "running", 20, "the run to start")
    with pytest.raises(RunExists) as info:
        submit(r, "twice", g)
    assert info.value.status == "running"
    wait_for(lambda: is_terminal(r, "twice"), 20, "the outcome")
    assert len(terminal_events(r, "twice")) == 1
    assert mark.read_text().splitlines() == ["once"]
    assert [e["status"] for e in events(r, "twice") if e["type"] == "status"] == [
        "queued", "running", "succeeded"]


def test_submit_reports_an_existing_run_id_and_enqueues_nothing(
        r, redis_server, tmp_path: Path, monkeypatch, capsys) -> None:
    whole = tmp_path / "message.json"
    whole.write_text(json.dumps(factories.message(graph(), run_id="again")))
    code, out, _ = run_cli(["submit", str(whole)], redis_server.url, monkeypatch, capsys)
    assert code == 0 and out.strip() == "again"
    rec = record(r, "again")
    rec["status"] = "failed"
    r.set(keys.run_record("again"), json.dumps(rec))
    code, out, err = run_cli(["submit", str(whole), "--wait"], redis_server.url, monkeypatch,
                          capsys)
    assert code == 2 and out == ""
    assert "again" in err and "status failed" in err and "not enqueued" in err
    assert record(r, "again") == rec
    assert r.xlen(keys.runs_stream("cpu")) == 1


# --------------------------------------------------------------------------- --run-id


def _args(deployed: Path, run_id: str | None) -> argparse.Namespace:
    return argparse.Namespace(deployed=deployed, run_id=run_id, input=[], inputs_json=None,
                              timeout_s=None, callback_url=None)


def test_run_id_flag_names_only_a_message_without_one(tmp_path: Path) -> None:
    own = tmp_path / "own.json"
    own.write_text(json.dumps(factories.message(graph(), run_id="from-message")))
    assert message_from_args(_args(own, None)).run_id == "from-message"
    assert message_from_args(_args(own, "from-message")).run_id == "from-message"
    with pytest.raises(RunRejected) as info:
        message_from_args(_args(own, "from-flag"))
    assert info.value.details["fields"] == ["run_id"]
    assert "from-flag" in info.value.message and "from-message" in info.value.message

    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(factories.workflow(graph())))
    assert message_from_args(_args(bare, "from-flag")).run_id == "from-flag"
    made = message_from_args(_args(bare, None)).run_id
    assert made and made != "from-flag"


def test_submit_refuses_a_run_id_flag_that_differs_from_the_message(
        r, redis_server, tmp_path: Path, monkeypatch, capsys) -> None:
    whole = tmp_path / "message.json"
    whole.write_text(json.dumps(factories.message(graph(), run_id="from-message")))
    code, out, err = run_cli(["submit", str(whole), "--run-id", "from-flag"], redis_server.url,
                          monkeypatch, capsys)
    assert code == 2 and out == ""
    assert "from-flag" in err and "from-message" in err and "run_id" in err
    assert r.xlen(keys.runs_stream("cpu")) == 0
    assert record(r, "from-flag") is None and record(r, "from-message") is None


def test_a_client_enqueues_again_after_redis_lost_its_scripts(r) -> None:
    # The submitting side keeps its scripts per client: a Redis that forgot them (a restart,
    # SCRIPT FLUSH) still takes the next enqueue.
    submit(r, "before-flush")
    r.script_flush()
    submit(r, "after-flush")
    assert status_of(r, "before-flush") == status_of(r, "after-flush") == "queued"
    assert r.xlen(keys.runs_stream("cpu")) == 2


def test_the_submitting_side_keeps_no_client_but_the_last(r, redis_server) -> None:
    import gc
    import weakref

    import redis

    other = redis.Redis.from_url(redis_server.url, decode_responses=True, protocol=2)
    submit(other, "from-other")
    gone = weakref.ref(other)
    other.close()
    del other
    submit(r, "from-r")  # the store of ``r`` replaces the other client's
    gc.collect()
    assert gone() is None
    assert status_of(r, "from-other") == status_of(r, "from-r") == "queued"
