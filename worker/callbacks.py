"""Run callbacks: the terminal record POSTed to ``callback_url``, signed per Standard Webhooks.

The body is the terminal record without ``billing``. Headers ``webhook-id`` (stable across
retries of one run attempt), ``webhook-timestamp`` and ``webhook-signature`` come from the
``standardwebhooks`` library with the operator's ``RUNFLOW_WEBHOOK_SECRET``. Failed
deliveries (network error, non-2xx) are retried with doubling backoff, up to
``RUNFLOW_CALLBACK_ATTEMPTS`` deliveries in all. Everything happens on background threads
fed by a delay queue, so neither a failing nor a slow receiver ever delays the next run.

Callback URLs get the same SSRF policy as input URLs: the project's ``cache.fetcher``
(https only, public addresses unless ``RUNFLOW_URL_ALLOW``, no DNS rebinding, no
redirects). A refused URL is not retried. URLs are never logged with their query.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from standardwebhooks import Webhook

from worker.contract import RunRecord
from worker.logs import redact
from worker.metrics import Metrics
from worker.settings import Settings

log = logging.getLogger(__name__)

DELIVERY_THREADS = 4
"""Concurrent deliveries: one stalled receiver leaves the others flowing."""
DELIVERY_DEADLINE_S = 60.0
"""Longest single delivery attempt, connect to last response byte."""


class Poster(Protocol):
    """POSTs bytes and returns the HTTP status (``cache.fetcher.Fetcher`` is one)."""

    def post(self, url: str, content: bytes, headers: Mapping[str, str] | None = None, *,
             deadline_s: float | None = None) -> int:
        """Send ``content``; return the status code; raise on network or policy errors."""


def build_poster(settings: Settings) -> Poster:
    """The SSRF-safe HTTP client for callbacks, configured from the settings."""
    from cache.fetcher import Fetcher
    from cache.urlpolicy import URLPolicy

    return Fetcher(URLPolicy(settings.url_allow), ca_bundle=settings.ca_bundle,
                   timeout_s=settings.fetch_timeout_s, deadline_s=DELIVERY_DEADLINE_S,
                   max_bytes=1 << 20)


def _refused(exc: Exception) -> bool:
    """True when the URL policy refused the URL (retrying cannot help)."""
    try:
        from cache.errors import URLRefused
    except ImportError:  # pragma: no cover - cache is part of this project
        return False
    return isinstance(exc, URLRefused)


def callback_payload(record: RunRecord) -> str:
    """The callback body: the terminal record as JSON, without ``billing``."""
    data = record.model_dump(mode="json", exclude={"billing"})
    return json.dumps(data, separators=(",", ":"))


@dataclass(order=True)
class _Delivery:
    due: float
    seq: int
    url: str = ""
    msg_id: str = ""
    payload: str = ""
    run_id: str = ""
    attempt: int = 0


class CallbackSender:
    """Delivers signed callbacks from background threads with retries and backoff."""

    def __init__(self, poster: Poster, secret: str, *, attempts: int, backoff_s: float,
                 metrics: Metrics | None = None, threads: int = DELIVERY_THREADS) -> None:
        self.poster = poster
        self.webhook = Webhook(secret)
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.metrics = metrics
        self.delivered = 0
        """Callbacks acknowledged with a 2xx."""
        self.failed = 0
        """Callbacks given up after every attempt (or refused by the URL policy)."""
        self._heap: list[_Delivery] = []
        self._seq = itertools.count()
        self._busy = 0
        self._closed = False
        self._cond = threading.Condition()
        self._threads = [threading.Thread(target=self._run, name=f"runflow-callback-{i}",
                                          daemon=True) for i in range(threads)]
        for t in self._threads:
            t.start()

    def submit(self, url: str, record: RunRecord) -> None:
        """Queue the callback of a terminal ``record`` (returns at once)."""
        item = _Delivery(due=time.monotonic(), seq=next(self._seq), url=url,
                         msg_id=f"msg_{record.id}_{record.attempt}",
                         payload=callback_payload(record), run_id=record.id)
        with self._cond:
            if self._closed:
                return
            heapq.heappush(self._heap, item)
            self._cond.notify()

    def pending(self) -> int:
        """Callbacks queued, waiting for a retry or in flight."""
        with self._cond:
            return len(self._heap) + self._busy

    def close(self, timeout_s: float = 10.0) -> int:
        """Wait up to ``timeout_s`` for pending deliveries, then stop; return those left."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._cond:
            self._cond.wait_for(lambda: not self._heap and not self._busy,
                                timeout=max(0.0, deadline - time.monotonic()))
            left = len(self._heap) + self._busy
            self._closed = True
            self._heap.clear()
            self._cond.notify_all()
        if left:
            log.warning("%d callbacks not delivered before exit", left,
                        extra={"event": "callbacks_dropped", "count": left})
        return left

    # ------------------------------------------------------------------ threads

    def _next(self) -> _Delivery | None:
        with self._cond:
            while True:
                if self._closed:
                    return None
                if self._heap:
                    wait_s = self._heap[0].due - time.monotonic()
                    if wait_s <= 0:
                        self._busy += 1
                        return heapq.heappop(self._heap)
                    self._cond.wait(timeout=wait_s)
                else:
                    self._cond.wait()

    def _run(self) -> None:
        while (item := self._next()) is not None:
            try:
                self._attempt(item)
            except Exception:  # a delivery thread must never die
                log.exception("callback delivery crashed", extra={"run_id": item.run_id})
            finally:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()

    def _attempt(self, item: _Delivery) -> None:
        item.attempt += 1
        # Whole seconds: the signed timestamp and the header must be the same number.
        now = datetime.fromtimestamp(int(time.time()), UTC)
        headers = {
            "content-type": "application/json",
            "webhook-id": item.msg_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": self.webhook.sign(item.msg_id, now, item.payload),
        }
        extra = {"run_id": item.run_id, "event": "callback", "attempt_no": item.attempt,
                 "url": redact(item.url)}
        try:
            status = self.poster.post(item.url, item.payload.encode(), headers,
                                      deadline_s=DELIVERY_DEADLINE_S)
            problem = None if 200 <= status < 300 else f"HTTP {status}"
        except Exception as exc:  # noqa: BLE001 - any failure is a failed delivery
            if _refused(exc):
                self._count("refused")
                log.error("callback URL refused by the URL policy: %s", exc, extra=extra)
                with self._cond:
                    self.failed += 1
                return
            problem = f"{type(exc).__name__}: {exc}"
        if problem is None:
            self._count("delivered")
            with self._cond:
                self.delivered += 1
            log.info("callback delivered", extra={**extra, "status_code": status})
            return
        if item.attempt >= self.attempts:
            self._count("failed")
            with self._cond:
                self.failed += 1
            log.error("callback failed after %d attempts: %s", item.attempt, problem,
                      extra=extra)
            return
        self._count("retry")
        delay_s = self.backoff_s * (2 ** (item.attempt - 1))
        log.warning("callback attempt failed (%s); retrying in %.1f s", problem, delay_s,
                    extra=extra)
        item.due = time.monotonic() + delay_s
        with self._cond:
            if not self._closed:
                heapq.heappush(self._heap, item)
                self._cond.notify()

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.callbacks.labels(outcome).inc()


def build_sender(settings: Settings, metrics: Metrics | None = None) -> CallbackSender | None:
    """The callback sender, or None (with a warning) when no webhook secret is configured."""
    if settings.webhook_secret is None or not settings.webhook_secret.get_secret_value():
        log.warning("RUNFLOW_WEBHOOK_SECRET is not set: run callbacks are disabled",
                    extra={"event": "callbacks_disabled"})
        return None
    return CallbackSender(build_poster(settings), settings.webhook_secret.get_secret_value(),
                          attempts=settings.callback_attempts,
                          backoff_s=settings.callback_backoff_s, metrics=metrics)
