"""Run callbacks: the terminal record POSTed to ``callback_url``, signed per Standard Webhooks.

The body is the terminal record without ``billing``. Headers ``webhook-id`` (stable across
retries of one run attempt: ``msg_<run_id>_<attempt>``, so a receiver can drop duplicates),
``webhook-timestamp`` and ``webhook-signature`` come from the ``standardwebhooks`` library
with the operator's ``RUNFLOW_WEBHOOK_SECRET``.

Callbacks survive the worker. The job (URL, body) is queued in Redis in the same script
that writes the terminal record (``runflow:callback:<id>`` plus its due time in the sorted
set ``runflow:callbacks``), so a run with a terminal record always has its callback queued.
Every worker's delivery threads take due jobs: a job is claimed by moving its due time past
the longest delivery, delivered, then deleted on a 2xx; a failure (network error, non-2xx)
reschedules it with doubling backoff, up to ``RUNFLOW_CALLBACK_ATTEMPTS`` deliveries in all.
A worker killed mid-delivery leaves the job to come due again for any worker: delivery is
at least once. Neither a failing nor a slow receiver ever delays the next run.

Callback URLs get the same SSRF policy as input URLs: the project's ``cache.fetcher``
(https only, public addresses unless ``RUNFLOW_URL_ALLOW``, no DNS rebinding, no
redirects). A refused URL is not retried. URLs are never logged with their query.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

import redis
from standardwebhooks import Webhook

from runflow_worker.logs import redact
from runflow_worker.run.contract import RunRecord
from runflow_worker.serve import keys
from runflow_worker.serve.metrics import Metrics
from runflow_worker.serve.recordstore import CallbackJob
from runflow_worker.settings import Settings

log = logging.getLogger(__name__)

DELIVERY_THREADS = 4
"""Concurrent deliveries: one stalled receiver leaves the others flowing."""
DELIVERY_DEADLINE_S = 60.0
"""Longest single delivery attempt, connect to last response byte."""
CLAIM_S = DELIVERY_DEADLINE_S + 30.0
"""How long a claimed job is hidden from other workers (beyond any delivery attempt)."""
POLL_S = 0.5
"""How often idle delivery threads look for due jobs (a terminal write wakes them at once)."""

# KEYS: due set, job. ARGV: job id, now ms, claimed-until ms. The job's fields, or nil when
# it is not due (another worker claimed it) or gone (delivered meanwhile).
_CLAIM_LUA = """
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not s or tonumber(s) > tonumber(ARGV[2]) then return false end
local h = redis.call('HGETALL', KEYS[2])
if #h == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return false
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return h
"""


class Poster(Protocol):
    """POSTs bytes and returns the HTTP status (``cache.fetcher.Fetcher`` is one)."""

    def post(self, url: str, content: bytes, headers: Mapping[str, str] | None = None, *,
             deadline_s: float | None = None) -> int:
        """Send ``content``; return the status code; raise on network or policy errors."""


def build_poster(settings: Settings) -> Poster:
    """The SSRF-safe HTTP client for callbacks, configured from the settings."""
    from runflow_worker.cache.fetcher import Fetcher
    from runflow_worker.cache.urlpolicy import URLPolicy

    # The system's trust too (SSL_CERT_FILE / SSL_CERT_DIR); never a download credential.
    return Fetcher(URLPolicy(settings.url_allow), ca_bundle=settings.ca_trust,
                   timeout_s=settings.fetch_timeout_s, deadline_s=DELIVERY_DEADLINE_S,
                   max_bytes=1 << 20)


def _refused(exc: Exception) -> bool:
    """True when the URL policy refused the URL (retrying cannot help)."""
    try:
        from runflow_worker.cache.errors import URLRefused
    except ImportError:  # pragma: no cover - cache is part of this project
        return False
    return isinstance(exc, URLRefused)


def callback_payload(record: RunRecord) -> str:
    """The callback body: the terminal record as JSON, without ``billing``."""
    data = record.model_dump(mode="json", exclude={"billing"})
    return json.dumps(data, separators=(",", ":"))


class CallbackSender:
    """Delivers the callback jobs queued in Redis, from background threads (see the module
    docstring). ``attach`` gives it the worker's Redis client and starts the threads."""

    def __init__(self, poster: Poster, secret: str, *, attempts: int, backoff_s: float,
                 metrics: Metrics | None = None, threads: int = DELIVERY_THREADS) -> None:
        self.poster = poster
        self.webhook = Webhook(secret)
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.metrics = metrics
        self.delivered = 0
        """Callbacks acknowledged with a 2xx by this sender."""
        self.failed = 0
        """Callbacks this sender gave up (after every attempt, or refused by the URL policy)."""
        self._client: redis.Redis | None = None
        self._claim: Any = None
        self._busy = 0
        self._woken = False
        self._closed = False
        self._cond = threading.Condition()
        self._threads = [threading.Thread(target=self._run, name=f"runflow-callback-{i}",
                                          daemon=True) for i in range(threads)]

    def attach(self, client: redis.Redis) -> None:
        """Deliver jobs from ``client``'s Redis (the worker's connection); starts the threads."""
        if self._client is not None:
            return
        self._client = client
        self._claim = client.register_script(_CLAIM_LUA)
        for t in self._threads:
            t.start()

    @staticmethod
    def job_for(url: str, record: RunRecord) -> CallbackJob:
        """The job to queue with ``record``'s terminal write, due at once."""
        return CallbackJob(f"msg_{record.id}_{record.attempt}", url, callback_payload(record),
                           _now_ms())

    def wake(self) -> None:
        """Look for due jobs now (a terminal write just queued one)."""
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def pending(self) -> int:
        """Callback jobs queued in Redis (for any worker), in flight included."""
        if self._client is None:
            return 0
        return int(self._client.zcard(keys.CALLBACKS_DUE))

    def close(self, timeout_s: float = 10.0) -> int:
        """Deliver for up to ``timeout_s`` what comes due meanwhile, then stop; return the jobs
        left queued (other workers deliver them).

        Never waits past ``timeout_s``, not even for a delivery in flight: its job is still in
        Redis (claimed jobs stay in the due set, hidden for ``CLAIM_S``; only a 2xx, a refusal
        or the last attempt deletes them), so it comes due again for any worker.
        """
        deadline = time.monotonic() + max(0.0, timeout_s)
        while self._client is not None and time.monotonic() < deadline:
            due_by_ms = _now_ms() + int((deadline - time.monotonic()) * 1000)
            try:
                coming = int(self._client.zcount(keys.CALLBACKS_DUE, "-inf", due_by_ms))
            except redis.RedisError:
                break
            with self._cond:
                if not coming and not self._busy:
                    break
                self._woken = True
                self._cond.notify_all()
                self._cond.wait(timeout=min(0.1, max(0.0, deadline - time.monotonic())))
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            if t.is_alive():
                # Bounded by the time left (0 on a cold stop): a stalled receiver may hold a
                # thread for DELIVERY_DEADLINE_S, and the threads are daemons.
                t.join(timeout=max(0.0, deadline - time.monotonic()))
        try:
            left = self.pending()
        except redis.RedisError:
            left = 0
        if left:
            log.info("%d callbacks left queued for other workers", left,
                     extra={"event": "callbacks_left", "count": left})
        return left

    # ------------------------------------------------------------------ threads

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
            try:
                job = self._claim_due()
            except redis.RedisError as exc:
                log.warning("cannot read callback jobs: %s", exc,
                            extra={"event": "callback_queue_unavailable"})
                job = None
            if job is None:
                with self._cond:
                    if not self._woken and not self._closed:
                        self._cond.wait(timeout=POLL_S)
                    self._woken = False
                continue
            with self._cond:
                self._busy += 1
            try:
                self._attempt(*job)
            except Exception:  # a delivery thread must never die
                log.exception("callback delivery crashed", extra={"run_id": job[1].get("run_id")})
            finally:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()

    def _claim_due(self) -> tuple[str, dict[str, str]] | None:
        assert self._client is not None
        now = _now_ms()
        for job_id in self._client.zrangebyscore(keys.CALLBACKS_DUE, "-inf", now, start=0,
                                                 num=len(self._threads)):
            fields = self._claim(keys=[keys.CALLBACKS_DUE, keys.callback_job(job_id)],
                                 args=[job_id, now, now + int(CLAIM_S * 1000)])
            if fields:
                return job_id, dict(zip(fields[::2], fields[1::2], strict=True))
        return None

    def _attempt(self, job_id: str, job: dict[str, str]) -> None:
        tries = int(job.get("tries") or 0) + 1
        url, payload, run_id = job.get("url", ""), job.get("payload", ""), job.get("run_id")
        # Whole seconds: the signed timestamp and the header must be the same number.
        now = datetime.fromtimestamp(int(time.time()), UTC)
        headers = {
            "content-type": "application/json",
            "webhook-id": job_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": self.webhook.sign(job_id, now, payload),
        }
        extra = {"run_id": run_id, "event": "callback", "attempt_no": tries,
                 "url": redact(url)}
        try:
            status = self.poster.post(url, payload.encode(), headers,
                                      deadline_s=DELIVERY_DEADLINE_S)
            problem = None if 200 <= status < 300 else f"HTTP {status}"
        except Exception as exc:  # noqa: BLE001 - any failure is a failed delivery
            if _refused(exc):
                self._finish(job_id, "refused")
                log.error("callback URL refused by the URL policy: %s", exc, extra=extra)
                return
            problem = f"{type(exc).__name__}: {exc}"
        if problem is None:
            self._finish(job_id, "delivered")
            log.info("callback delivered", extra={**extra, "status_code": status})
            return
        if tries >= self.attempts:
            self._finish(job_id, "failed")
            log.error("callback failed after %d attempts: %s", tries, problem, extra=extra)
            return
        self._count("retry")
        delay_s = self.backoff_s * (2 ** (tries - 1))
        log.warning("callback attempt failed (%s); retrying in %.1f s", problem, delay_s,
                    extra=extra)
        assert self._client is not None
        with self._client.pipeline(transaction=True) as pipe:
            pipe.hset(keys.callback_job(job_id), "tries", tries)
            pipe.zadd(keys.CALLBACKS_DUE, {job_id: _now_ms() + int(delay_s * 1000)})
            pipe.execute()

    def _finish(self, job_id: str, outcome: str) -> None:
        """Remove a job that needs no more deliveries and count how it ended."""
        assert self._client is not None
        with self._client.pipeline(transaction=True) as pipe:
            pipe.zrem(keys.CALLBACKS_DUE, job_id)
            pipe.delete(keys.callback_job(job_id))
            pipe.execute()
        self._count(outcome)
        with self._cond:
            if outcome == "delivered":
                self.delivered += 1
            else:
                self.failed += 1

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.callbacks.labels(outcome).inc()


def _now_ms() -> int:
    return int(time.time() * 1000)


def build_sender(settings: Settings, metrics: Metrics | None = None) -> CallbackSender | None:
    """The callback sender, or None (with a warning) when no webhook secret is configured."""
    if settings.webhook_secret is None or not settings.webhook_secret.get_secret_value():
        log.warning("RUNFLOW_WEBHOOK_SECRET is not set: run callbacks are disabled",
                    extra={"event": "callbacks_disabled"})
        return None
    return CallbackSender(build_poster(settings), settings.webhook_secret.get_secret_value(),
                          attempts=settings.callback_attempts,
                          backoff_s=settings.callback_backoff_s, metrics=metrics)
