"""Messages that do not parse: one terminal record that still names the run, or a dead letter.

Whatever reading a message raises (a shape error, JSON nested too deeply, a bug) ends the
entry: a ``failed`` record when a run id can be read, else a dead letter. Never an entry left
pending and redelivered for ever.
"""

from __future__ import annotations

import json

import pytest

from runflow_worker.errors import ErrorCode, RunRejected
from runflow_worker.run.contract import RunMessage, parse_message_json
from runflow_worker.serve import keys
from runflow_worker.serve.salvage import parse_delivery, salvage_members
from tests.support import factories
from tests.support.queue import graph, is_terminal, record, terminal_events
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(60)

STREAM = keys.runs_stream("cpu")


def _nested(levels: int) -> str:
    """A JSON object ``levels`` deep (built as text: json.dumps would recurse)."""
    return '{"x":' * levels + "1" + "}" * levels


def _message_with_deep_metadata(run_id: str, levels: int) -> str:
    msg = factories.message(graph(), run_id=run_id, client_ref="ticket-4821",
                            metadata={"deep": "PLACEHOLDER"}, callback_url=None)
    return json.dumps(msg).replace('"PLACEHOLDER"', _nested(levels))


def _settled(r) -> bool:
    """True once nothing is pending and nothing is left to read."""
    pending = r.xpending(STREAM, keys.CONSUMER_GROUP)["pending"]
    return pending == 0 and r.xlen(STREAM) == 0


def test_unparseable_message_keeps_the_clients_references(r, inprocess_worker) -> None:
    msg = factories.message(graph(), run_id="bad1", client_ref="ticket-4821",
                            metadata={"pipeline": "ads"})
    msg["workflow"]["gpu_mode"] = "fastest"  # not auto|explicit: does not parse
    r.xadd(STREAM, {keys.RUN_FIELD: json.dumps(msg)})
    inprocess_worker()
    wait_for(lambda: is_terminal(r, "bad1"), 20, "the outcome")
    rec = record(r, "bad1")
    assert rec["status"] == "failed" and rec["error"]["code"] == "INVALID_WORKFLOW"
    assert rec["workflow"] == {"owner": "acme", "slug": "demo", "version": "v1"}
    assert rec["created_at"].startswith("2026-11-22T10:00:00")
    assert rec["client_ref"] == "ticket-4821" and rec["metadata"] == {"pipeline": "ads"}
    assert len(terminal_events(r, "bad1")) == 1


def test_ill_typed_fields_come_from_the_queued_record(r, inprocess_worker) -> None:
    queued = {"id": "bad2", "status": "queued", "attempt": 1, "client_ref": "ticket-7",
              "metadata": {"pipeline": "ads"}, "created_at": "2026-11-22T10:00:00Z",
              "workflow": {"owner": "acme", "slug": "x", "version": "1"}}
    r.set(keys.run_record("bad2"), json.dumps(queued))
    raw = {"run_id": "bad2", "workflow": {"owner": 5}, "client_ref": ["not", "a", "str"],
           "metadata": "not an object", "created_at": "yesterday"}
    r.xadd(STREAM, {keys.RUN_FIELD: json.dumps(raw)})
    inprocess_worker()
    wait_for(lambda: is_terminal(r, "bad2"), 20, "the outcome")
    rec = record(r, "bad2")
    assert rec["status"] == "failed"
    assert rec["workflow"] == queued["workflow"] and rec["client_ref"] == "ticket-7"
    assert rec["metadata"] == {"pipeline": "ads"}
    assert rec["created_at"].startswith("2026-11-22T10:00:00")


@pytest.mark.parametrize("levels", [5000, 400])
def test_deeply_nested_metadata_ends_in_one_terminal_record(r, inprocess_worker,
                                                           levels: int) -> None:
    # 5000 levels: json.loads itself overflows; 400: it parses, pydantic cannot serialise.
    run_id = f"deep-{levels}"
    r.xadd(STREAM, {keys.RUN_FIELD: _message_with_deep_metadata(run_id, levels)})
    r.xadd(STREAM, {keys.RUN_FIELD: "[" * 5000})  # no run id to read: a dead letter
    inprocess_worker()
    wait_for(lambda: is_terminal(r, run_id), 20, "the outcome of the deep message")
    wait_for(lambda: _settled(r), 20, "every entry to be settled")
    rec = record(r, run_id)
    assert rec["status"] == "failed" and rec["error"]["code"] == "INVALID_INPUT"
    assert rec["error"]["details"]["fields"] == ["message"]
    assert "nested too deeply" in rec["error"]["message"]
    assert rec["client_ref"] == "ticket-4821" and rec["workflow"]["slug"] == "demo"
    assert rec["metadata"] == {}  # too deep to keep
    assert len(terminal_events(r, run_id)) == 1
    dead = r.xrange(keys.DEAD_LETTER_STREAM)
    assert len(dead) == 1 and dead[0][1][keys.RUN_FIELD] == "[" * 5000


def test_parse_message_json_rejects_nesting_too_deep() -> None:
    with pytest.raises(RunRejected) as info:
        parse_message_json(_message_with_deep_metadata("deep", 5000))
    assert info.value.code is ErrorCode.INVALID_INPUT
    assert info.value.details["fields"] == ["message"]
    assert "nested too deeply" in info.value.message


def test_a_crash_while_parsing_finalises_the_entry(r, inprocess_worker, monkeypatch) -> None:
    def explode(raw: str) -> None:
        raise RuntimeError("a bug in the parser")

    monkeypatch.setattr("runflow_worker.serve.salvage.parse_message_json", explode)
    r.xadd(STREAM, {keys.RUN_FIELD: json.dumps(factories.message(graph(), run_id="crash"))})
    inprocess_worker()
    wait_for(lambda: is_terminal(r, "crash"), 20, "the outcome")
    wait_for(lambda: _settled(r), 20, "the entry to be acked")
    rec = record(r, "crash")
    assert rec["status"] == "failed" and rec["error"]["code"] == "INVALID_INPUT"
    assert "RuntimeError" in rec["error"]["message"]
    assert len(terminal_events(r, "crash")) == 1


def _delivered_three_times(r, payload: str) -> str:
    """Add ``payload`` as an entry that earlier holders took three times, then died."""
    r.xgroup_create(STREAM, keys.CONSUMER_GROUP, id="0", mkstream=True)
    entry = r.xadd(STREAM, {keys.RUN_FIELD: payload})
    r.xreadgroup(keys.CONSUMER_GROUP, "ghost", {STREAM: ">"}, count=1)
    r.xclaim(STREAM, keys.CONSUMER_GROUP, "ghost", 0, [entry], idle=60_000, retrycount=3,
             justid=True)
    return entry


@pytest.mark.parametrize(("payload", "code", "why"), [
    ('{"run_id": "poison", "workflow": 5}', "INVALID_WORKFLOW", "workflow"),
    (_message_with_deep_metadata("poison", 400), "INVALID_INPUT", "nested too deeply"),
], ids=["bad-shape", "too-deep-to-serialise"])
def test_unparseable_entry_past_max_deliveries_is_worker_lost_and_dead_lettered(
        r, inprocess_worker, payload: str, code: str, why: str) -> None:
    # Earlier holders died on it (three deliveries already): SPEC §2 says WORKER_LOST and
    # the dead letters; why it does not parse is kept in the error's details.
    entry = _delivered_three_times(r, payload)
    inprocess_worker()
    wait_for(lambda: is_terminal(r, "poison"), 20, "the outcome")
    wait_for(lambda: _settled(r), 20, "the entry to be acked")
    rec = record(r, "poison")
    assert rec["status"] == "failed" and rec["error"]["code"] == "WORKER_LOST"
    details = rec["error"]["details"]
    assert details["deliveries"] == 3 and details["rejection"]["code"] == code
    assert why in details["rejection"]["message"]
    [(_, dead)] = r.xrange(keys.DEAD_LETTER_STREAM)
    assert dead[keys.SOURCE_ID_FIELD] == entry and dead[keys.DEAD_REASON_FIELD] == "max_deliveries"
    [event] = terminal_events(r, "poison")
    assert event["data"] == {"error": "WORKER_LOST", "dead_letter": True}


def test_a_delivery_does_not_serialise_the_message_to_check_its_depth(monkeypatch) -> None:
    # The nesting depth is checked when a record is written (where it matters), not by a
    # second full pass over every message on every delivery.
    def no_dump(self, **kwargs):
        raise AssertionError("the whole message was serialised on delivery")

    monkeypatch.setattr(RunMessage, "model_dump_json", no_dump)
    message, rejection = parse_delivery(json.dumps(factories.message(graph(), run_id="ok")))
    assert rejection is None and message is not None and message.run_id == "ok"


def test_salvage_reads_members_around_an_unreadable_one() -> None:
    text = ('{"run_id": "a", "metadata": ' + _nested(5000) + ', "client_ref": "c\\"}",'
            ' "n": -1.5e3, "t": true, "w": {"owner": "o", "list": [1, "]", {"b": 2}]}')
    assert salvage_members(text + "}") == {
        "run_id": "a", "client_ref": 'c"}', "n": -1500.0, "t": True,
        "w": {"owner": "o", "list": [1, "]", {"b": 2}]}}
    assert salvage_members(text)["run_id"] == "a"  # cut short: the members before the cut
    assert salvage_members("not json") is None
    assert salvage_members("[1]") is None
    assert salvage_members("[" * 5000) is None


def test_an_out_of_memory_run_too_deep_to_re_enqueue_fails_out_of_memory(
        r, inprocess_worker) -> None:
    # Its records (no graph in them) are written fine, so it runs; only the re-enqueue would
    # serialise the whole message, and cannot: this attempt's OOM is final, with a warning.
    g = graph(extra={"7": {"class_type": "TestDeepValue", "inputs": {"value": "PLACEHOLDER"}},
                     "8": {"class_type": "FakeOOM", "inputs": {}}})
    raw = json.dumps(factories.message(g, run_id="deep-oom", callback_url=None))
    r.xadd(STREAM, {keys.RUN_FIELD: raw.replace('"PLACEHOLDER"', _nested(260))})
    w = inprocess_worker(burst=True, gpu_ladder="cpu:0,t4:16")
    w.thread.join(30)
    assert not w.thread.is_alive()
    rec = record(r, "deep-oom")
    assert rec["status"] == "failed" and rec["error"]["code"] == "OUT_OF_MEMORY"
    assert any("nested too deeply" in warning for warning in rec["warnings"])
    assert r.xlen(keys.runs_stream("t4")) == 0
    assert len(terminal_events(r, "deep-oom")) == 1
