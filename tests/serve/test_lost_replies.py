"""A terminal write whose reply is lost is sent again (``Worker._retry_terminal_write``); the
second call finds its own record written and adds nothing: one status event, and one
re-enqueue of a promoted run (``serve.recordstore``'s finalise script)."""

from __future__ import annotations

import json

import pytest

from runflow_worker.serve import keys
from runflow_worker.serve.queue import RedisUnavailable
from runflow_worker.serve.recordstore import Finalised, RecordStore
from tests.support.queue import events, graph, record, submit

OOM = {"8": {"class_type": "FakeOOM", "inputs": {}}}


@pytest.fixture
def lose_first_reply(monkeypatch: pytest.MonkeyPatch) -> list[Finalised]:
    """The first finalise call is carried out by Redis, then its reply is lost; the verdict
    of every call that returned is recorded."""
    verdicts: list[Finalised] = []
    real = RecordStore.finalise

    def finalise(self, *args, **kwargs):
        done = real(self, *args, **kwargs)
        if not verdicts and not getattr(finalise, "lost", False):
            finalise.lost = True  # type: ignore[attr-defined]
            raise RedisUnavailable("connection reset while reading the reply")
        verdicts.append(done[0])
        return done

    monkeypatch.setattr(RecordStore, "finalise", finalise)
    return verdicts


@pytest.mark.timeout(60)
def test_a_promotion_whose_reply_is_lost_is_enqueued_once(r, inprocess_worker,
                                                          lose_first_reply) -> None:
    submit(r, "hungry", graph(extra=OOM))
    w = inprocess_worker(burst=True, gpu_ladder="cpu:0,t4:16")
    w.thread.join(30)
    assert lose_first_reply == [Finalised.WRITTEN]  # the retry: written already
    rec = record(r, "hungry")
    assert rec["status"] == "queued" and rec["attempt"] == 2
    promoted = r.xrange(keys.runs_stream("t4"))
    assert len(promoted) == 1  # not twice
    assert json.loads(promoted[0][1]["run"])["attempt"] == 2
    statuses = [e["status"] for e in events(r, "hungry") if e["type"] == "status"]
    assert statuses == ["queued", "running", "queued"]
    assert r.xlen(keys.runs_stream("cpu")) == 0  # the entry acked and deleted


@pytest.mark.timeout(60)
def test_a_final_write_whose_reply_is_lost_is_written_once(r, inprocess_worker,
                                                           lose_first_reply) -> None:
    submit(r, "plain", graph())
    w = inprocess_worker(burst=True)
    w.thread.join(30)
    assert lose_first_reply == [Finalised.WRITTEN]  # not "terminal already": it is ours
    assert record(r, "plain")["status"] == "succeeded"
    statuses = [e["status"] for e in events(r, "plain") if e["type"] == "status"]
    assert statuses == ["queued", "running", "succeeded"]
    assert r.xlen(keys.runs_stream("cpu")) == 0
