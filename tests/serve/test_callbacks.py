"""Callbacks: signed per Standard Webhooks, retried with backoff, never delaying runs.

Receivers are local HTTPS servers (trustme CA) on 127.0.0.1, allowed by the URL policy.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from runflow_worker.serve import keys
from runflow_worker.serve.callbacks import CallbackSender, build_poster
from runflow_worker.settings import Settings
from tests.support.https_server import HTTPSServer, Mode
from tests.support.queue import graph, is_terminal, record, submit
from tests.support.waiting import wait_for

SECRET = "whsec_" + base64.b64encode(os.urandom(24)).decode()


class FlakyRoute:
    """A POST route answering 500 to its first ``failures`` requests, then 200."""

    mode = Mode.STATUS
    body = b"ok"
    redirect_after_hits = None
    next_version = None

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.hits = 0
        self.range_headers: list[str | None] = []
        self.gate = threading.Event()

    @property
    def status(self) -> int:
        return 500 if self.hits <= self.failures else 200

    def release(self) -> None:
        self.gate.set()


@pytest.fixture
def receiver(tmp_path: Path):
    with HTTPSServer() as server:
        server.ca_file = server.write_ca_bundle(tmp_path / "ca.pem")
        yield server


def _sender(receiver: HTTPSServer, *, allow: tuple[str, ...] = ("127.0.0.1/32",),
            attempts: int = 5, backoff_s: float = 0.05) -> CallbackSender:
    settings = Settings(url_allow=allow, ca_bundle=receiver.ca_file, fetch_timeout_s=30)
    return CallbackSender(build_poster(settings), SECRET, attempts=attempts,
                          backoff_s=backoff_s)


def _expected_payload(r, run_id: str) -> dict[str, Any]:
    rec = record(r, run_id)
    rec.pop("billing")
    return rec


@pytest.mark.timeout(60)
def test_callback_is_signed_and_carries_the_record_without_billing(
        r, inprocess_worker, receiver, caplog) -> None:
    receiver.add("/hook", b"ok", mode=Mode.STATUS, status=200)
    sender = _sender(receiver)
    submit(r, "called", callback_url=receiver.url("/hook?token=abc"))
    inprocess_worker(callbacks=sender)
    wait_for(lambda: sender.delivered == 1, 20, "the callback")
    [request] = receiver.requests_for("/hook")
    assert request.method == "POST"
    headers = {k.lower(): v for k, v in request.headers.items()}
    assert headers["webhook-id"] == "msg_called_1"
    payload = Webhook(SECRET).verify(request.body, headers)
    assert payload == _expected_payload(r, "called")
    assert payload["status"] == "succeeded" and "billing" not in payload
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + base64.b64encode(b"x" * 24).decode()).verify(request.body, headers)
    logged = "\n".join(rec.getMessage() + json.dumps(rec.__dict__, default=str)
                       for rec in caplog.records)
    assert SECRET not in logged and "token=abc" not in logged


@pytest.mark.timeout(60)
def test_receiver_failing_twice_gets_exactly_one_success(r, inprocess_worker,
                                                         receiver) -> None:
    route = FlakyRoute(failures=2)
    receiver.routes["/flaky"] = route
    sender = _sender(receiver)
    submit(r, "flaky", callback_url=receiver.url("/flaky"))
    inprocess_worker(callbacks=sender)
    wait_for(lambda: sender.delivered == 1, 20, "the third delivery to succeed")
    assert sender.close(timeout_s=5) == 0
    assert route.hits == 3
    assert sender.failed == 0
    ids = {req.headers.get("webhook-id") for req in receiver.requests_for("/flaky")}
    assert ids == {"msg_flaky_1"}  # one message id across retries


@pytest.mark.timeout(60)
def test_slow_receiver_does_not_delay_the_next_run(r, inprocess_worker, receiver) -> None:
    route = receiver.add("/slow", b"late body", mode=Mode.STALL, cut_at=0)
    sender = _sender(receiver)
    submit(r, "first", callback_url=receiver.url("/slow"))
    submit(r, "second", graph(sleep_s=0.2))
    inprocess_worker(callbacks=sender)
    wait_for(lambda: is_terminal(r, "second"), 20, "the run after the slow callback")
    assert not route.gate.is_set() and sender.delivered == 0 and sender.pending() == 1
    route.release()
    wait_for(lambda: sender.delivered == 1, 20, "the slow callback to complete")


@pytest.mark.timeout(60)
def test_callback_url_refused_by_policy_is_not_retried(r, inprocess_worker,
                                                       receiver) -> None:
    route = receiver.add("/hook", b"ok", mode=Mode.STATUS, status=200)
    sender = _sender(receiver, allow=())
    submit(r, "private", callback_url=receiver.url("/hook"))
    inprocess_worker(callbacks=sender)
    wait_for(lambda: sender.failed == 1, 20, "the refusal")
    assert route.hits == 0 and sender.delivered == 0
    assert record(r, "private")["status"] == "succeeded"


@pytest.mark.timeout(60)
def test_failing_receiver_is_given_up_after_the_configured_attempts(r, inprocess_worker,
                                                                    receiver) -> None:
    route = receiver.add("/down", b"no", mode=Mode.STATUS, status=503)
    sender = _sender(receiver, attempts=3, backoff_s=0.02)
    submit(r, "down", callback_url=receiver.url("/down"))
    inprocess_worker(callbacks=sender)
    wait_for(lambda: sender.failed == 1, 20, "the sender to give up")
    assert route.hits == 3 and sender.delivered == 0


@pytest.mark.timeout(90)
def test_callback_survives_a_killed_worker(r, spawn_worker, inprocess_worker,
                                           receiver) -> None:
    # The first worker writes the terminal record (the job is queued with it), fails one
    # delivery and is killed before its retry; another worker delivers the callback.
    route = FlakyRoute(failures=1)
    receiver.routes["/later"] = route
    submit(r, "orphan", callback_url=receiver.url("/later"))
    first = spawn_worker(env={"RUNFLOW_WEBHOOK_SECRET": SECRET,
                              "RUNFLOW_URL_ALLOW": "127.0.0.1/32",
                              "RUNFLOW_CA_BUNDLE": str(receiver.ca_file),
                              "RUNFLOW_CALLBACK_BACKOFF_S": "3"})
    job = keys.callback_job("msg_orphan_1")
    wait_for(lambda: r.hget(job, "tries") == "1", 30, "the first delivery to fail")
    first.signal(signal.SIGKILL)
    first.wait(10)
    assert is_terminal(r, "orphan") and route.hits == 1
    assert r.zcard(keys.CALLBACKS_DUE) == 1  # still queued: nothing lost with the worker
    sender = _sender(receiver)
    inprocess_worker(callbacks=sender)
    wait_for(lambda: sender.delivered == 1, 30, "the other worker's delivery")
    assert route.hits == 2
    assert r.zcard(keys.CALLBACKS_DUE) == 0 and not r.exists(job)
    ids = {req.headers.get("webhook-id") for req in receiver.requests_for("/later")}
    assert ids == {"msg_orphan_1"}


@pytest.mark.timeout(60)
def test_stalled_delivery_does_not_hold_the_exit_past_the_grace(r, inprocess_worker,
                                                                receiver) -> None:
    route = receiver.add("/stall", b"late body", mode=Mode.STALL, cut_at=0)
    sender = _sender(receiver)
    submit(r, "held", callback_url=receiver.url("/stall"))
    w = inprocess_worker(callbacks=sender, grace_s=1.0)
    wait_for(lambda: is_terminal(r, "held"), 20, "the outcome")
    wait_for(route.stalled.is_set, 20, "the delivery to hang in the receiver")
    try:
        w.worker.shutdown.request_warm(1.0)  # SIGTERM with RUNFLOW_GRACE_S=1
        # Without a bound the join waits out the 60 s delivery deadline.
        w.thread.join(10)
        assert not w.thread.is_alive() and w.exit_code == 0
        # Nothing lost: the claimed job is still queued, due again for any worker.
        assert r.zcard(keys.CALLBACKS_DUE) == 1 and r.exists(keys.callback_job("msg_held_1"))
        assert sender.delivered == 0 and sender.failed == 0
    finally:
        route.release()
