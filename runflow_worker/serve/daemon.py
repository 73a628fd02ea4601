"""The serve daemon: one run at a time from the GPU class's Redis stream (SPEC §2, §7, §8).

Loop (``Worker.work``)::

    boot (connect, create the group, load the scripts)
        -> [reclaim an expired entry | read a new one | take the one the last terminal
            write read ahead] -> perform_run
        -> exit on burst (stream empty), --max-runs, idle window, or signals

One delivery (``Worker.perform_run``), top-down; each step in its own module::

    parse (serve.salvage) -> begin the attempt: fence token, running record
    (run.record builds it, serve.recordstore writes it; its reply read only when the run
    first needs it, serve.beginahead) -> execute (run.pipeline; the LeaseKeeper renews the
    lease and watches the cancel flag) -> build the terminal record
    (run.record) -> write it: finalise | promote | release (serve.recordstore)
        -> one Outcome, logged and counted in one place (serve.outcomes)

Signals follow rq: the first SIGTERM is a *warm* stop (take no new run, let the current one
finish within ``grace_s``, else interrupt it and release it: pending again, for another
worker at once); a second SIGTERM or SIGINT is a *cold* stop (interrupt now, release it).
Both exit 0.

A worker on which ComfyUI cannot start through no fault of the run (``run.fitness``:
CUDA unusable, the cache volume full, the baked checkout missing) releases each such run
untouched, reports not ready on ``/readyz``, and after ``RUNFLOW_MAX_UNFIT_STARTS`` such
starts in a row exits ``EXIT_UNFIT`` so its orchestrator replaces it: it never fails the
queue's runs one after the other (a black hole).

Redis outages never kill the daemon: reads back off (capped, jittered) and retry; a run
that already executed keeps its outcome in memory and retries the terminal write until
Redis is back, so it is written once and never executed again by this worker.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis

from runflow_worker.errors import QueueError, RunRejected, RunReleased
from runflow_worker.run.contract import RunMessage, RunRecord
from runflow_worker.run.gpu import next_larger_class
from runflow_worker.run.pipeline import Pipeline, RunResult
from runflow_worker.run.record import (
    AttemptStart,
    BootCharge,
    canceled_record,
    dead_letter_record,
    promoted_run,
    released_record,
    running_record,
    terminal_record,
    worker_lost,
)
from runflow_worker.run.sandboxing import UNSANDBOXED
from runflow_worker.serve import keys
from runflow_worker.serve.beginahead import PendingBegin
from runflow_worker.serve.boot import process_age_s
from runflow_worker.serve.callbacks import CallbackSender
from runflow_worker.serve.control import LeaseKeeper, ServeControl, ShutdownState
from runflow_worker.serve.events import EventPublisher
from runflow_worker.serve.health import HealthServer
from runflow_worker.serve.intake import MAX_BLOCK_S, Intake
from runflow_worker.serve.metrics import Metrics
from runflow_worker.serve.outcomes import Ending, Outcome, log_started, report_ending
from runflow_worker.serve.queue import (
    Backoff,
    Delivery,
    GroupMissing,
    RunQueue,
    connect,
    load_scripts,
    retry_write,
)
from runflow_worker.serve.recordstore import (
    Begin,
    CallbackJob,
    DeadLetter,
    Event,
    Finalised,
    NotSerialisable,
    Promotion,
    RecordStore,
)
from runflow_worker.serve.salvage import parse_delivery, salvage_record, unreadable
from runflow_worker.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

EVENT_FLUSH_TIMEOUT_S = 2.0
"""How long the run's last write waits for a batch of its progress events already on its way
(the events not sent yet go with that write)."""
PERMANENT_ERROR_RETRIES = 5
"""Terminal-write attempts after a non-connection Redis error before giving up."""
TERMINAL_WRITE_RETRY_CAP_S = 1.0
"""Longest wait between tries of a terminal write while Redis is away (short: once Redis is
back, the outcome should land before anything else happens to the run)."""
EXIT_UNFIT = 3
"""Exit code of ``serve`` after ``RUNFLOW_MAX_UNFIT_STARTS`` starts failed through the
worker's own fault (0 is every orderly stop, 2 bad configuration)."""


class Worker:
    """One serve daemon: a consumer of ``runflow:runs:<gpu_class>`` running one run at a time."""

    def __init__(self, settings: Settings, pipeline: Pipeline, *, gpu_class: str,
                 client: redis.Redis | None = None, consumer: str | None = None,
                 renew_leases: bool = True, metrics: Metrics | None = None,
                 callbacks: CallbackSender | None = None, http_port: int | None = None,
                 shutdown: ShutdownState | None = None) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.gpu_class = gpu_class
        self.consumer = consumer or keys.consumer_name(os.uname().nodename, os.getpid(),
                                                       os.urandom(3).hex())
        self.client = client or connect(settings.redis_url, block_s=MAX_BLOCK_S)
        self.queue = RunQueue(self.client, gpu_class, self.consumer, lease_s=settings.lease_s)
        self.store = RecordStore(self.client, events_maxlen=settings.events_maxlen)
        self.metrics = metrics or Metrics()
        self.callbacks = callbacks
        if callbacks is not None:
            callbacks.attach(self.client)
        self.shutdown = shutdown or ShutdownState()
        self.publisher = EventPublisher(self.store)
        self.keeper = LeaseKeeper(self.queue, lease_s=settings.lease_s, renew=renew_leases)
        self.http_port = settings.http_port if http_port is None else http_port
        self.health: HealthServer | None = None
        self.settings_warnings: tuple[str, ...] = (
            () if settings.sandboxed else (UNSANDBOXED,))
        """What ``/readyz`` tells besides readiness (an unsandboxed worker)."""
        self.intake = Intake(self.queue, lease_s=settings.lease_s,
                             idle_exit_s=settings.idle_exit_s)
        self.boot_charge = BootCharge()
        """The container's boot, billed to the first run that does GPU work."""
        self.runs_performed = 0
        self._redis_ok = False
        self._alive = False
        self.unfit_starts = 0
        """ComfyUI starts in a row that failed through this worker's fault (reset by a run
        that reaches its outcome)."""
        self.unfit_reason: str | None = None
        self.exit_code = 0
        total_bytes = getattr(pipeline.blobs, "total_bytes", None)
        if callable(total_bytes):
            # Scanned when /metrics is scraped, never on the run path.
            self.metrics.cache_bytes.set_function(lambda: _safe_call(total_bytes))
        self._previous_handlers: dict[int, Any] = {}

    # ------------------------------------------------------------------ main loop

    def work(self, *, burst: bool = False, max_runs: int | None = None) -> int:
        """Serve until burst-empty, ``max_runs``, the idle window or a signal; return 0."""
        self._install_signal_handlers()
        self._alive = True
        try:
            self._start_health()
            if not self._boot():
                return 0
            self.boot_charge.boot_s = process_age_s()
            log.info("serving %s as %s", self.queue.stream, self.consumer,
                     extra={"event": "worker_started", "gpu_class": self.gpu_class,
                            "consumer": self.consumer,
                            "boot_s": round(self.boot_charge.boot_s, 3)})
            reason = self._loop(burst=burst, max_runs=max_runs)
            log.info("worker stopping: %s", reason,
                     extra={"event": "worker_stopping", "reason": reason,
                            "runs": self.runs_performed, "exit_code": self.exit_code})
            return self.exit_code
        finally:
            self._alive = False
            self.intake.give_back_read_ahead()
            self._close()

    def _loop(self, *, burst: bool, max_runs: int | None) -> str:
        backoff = Backoff()
        idle_since = time.monotonic()
        idle_exit_s = self.settings.idle_exit_s
        while True:
            if self.shutdown.hard:
                return "stop requested (cold)"
            if self.shutdown.requested:
                return "stop requested (warm)"
            if self.unfit_starts >= self.settings.max_unfit_starts:
                self.exit_code = EXIT_UNFIT
                return (f"ComfyUI cannot start here ({self.unfit_reason}); "
                        f"{self.unfit_starts} runs released")
            if max_runs is not None and self.runs_performed >= max_runs:
                return f"performed {self.runs_performed} runs (--max-runs)"
            try:
                delivery = self.intake.next_delivery(burst=burst, idle_since=idle_since)
            except GroupMissing:
                log.warning("consumer group missing; recreating it",
                            extra={"event": "group_missing", "stream": self.queue.stream})
                self._wait_after_redis_error(backoff, lambda: self.queue.ensure_group())
                continue
            except QueueError as exc:
                self._redis_ok = False
                self.metrics.redis_errors.inc()
                log.warning("queue read failed: %s", exc, extra={"event": "redis_error"})
                self._wait_after_redis_error(backoff, self.queue.ensure_group)
                continue
            self._redis_ok = True
            backoff.reset()
            if delivery is None:
                if burst:
                    return "burst: the stream is empty"
                if idle_exit_s and time.monotonic() - idle_since >= idle_exit_s:
                    return f"idle for {idle_exit_s:g} s (scale to zero)"
                continue
            if self.shutdown.requested:
                self.intake.give_back(delivery)
                continue
            self.intake.reads_on = max_runs is None or self.runs_performed + 1 < max_runs
            self.intake.burst = burst
            try:
                self.perform_run(delivery)
            except QueueError as exc:
                # The entry stays pending with us and is reclaimed after the lease.
                self.metrics.redis_errors.inc()
                log.warning("run of entry %s interrupted by a Redis error: %s",
                            delivery.entry_id, exc, extra={"event": "redis_error"})
                self._wait_after_redis_error(backoff, None)
            except Exception:
                # A bug, not the run's fault: the entry stays pending, is redelivered after
                # the lease and, if it keeps failing, dead-lettered. The daemon lives on.
                log.exception("internal error on entry %s", delivery.entry_id,
                              extra={"event": "internal_error", "entry_id": delivery.entry_id})
                self._wait_after_redis_error(backoff, None)
            self._observe_pipeline()
            self.runs_performed += 1
            idle_since = time.monotonic()

    # ------------------------------------------------------------------ one run

    def perform_run(self, delivery: Delivery) -> Outcome:
        """Take one delivery to exactly one outcome (``serve.outcomes``); log and count it.

        parse -> (dead letter) -> begin the attempt -> execute -> build the record
        (``run.record``) -> write it (``serve.recordstore``: finalise, promote or release).
        """
        start = AttemptStart.now(enqueued_unix_ms=delivery.enqueued_unix_ms)
        self.metrics.busy.set(1)
        try:
            if delivery.reclaimed:
                self.metrics.reclaims.inc()
            self.metrics.queue_wait_seconds.observe((start.queue_ms or 0) / 1000)
            ending = self._take_to_ending(delivery, start)
        finally:
            self.metrics.busy.set(0)
        # The outcome is written: the run's directories go now, off its path.
        self.pipeline.tidy()
        report_ending(ending, self.metrics, gpu_class=self.gpu_class,
                      max_unfit_starts=self.settings.max_unfit_starts)
        if (ending.outcome in (Outcome.FINALISED, Outcome.DEAD_LETTERED)
                and ending.record is not None and self.callbacks is not None):
            self.callbacks.wake()  # its job was queued with the record: deliver it now
        return ending.outcome

    def _take_to_ending(self, delivery: Delivery, start: AttemptStart) -> Ending:
        """Parse the message, begin its attempt, run it and write its outcome."""
        over_limit = delivery.deliveries > self.settings.max_deliveries
        message, rejection = parse_delivery(delivery.payload)
        if message is None:
            # Over the limit too: the earlier deliveries crashed on it, so it is both
            # finalised and copied to the dead letters.
            return self.reject_unparseable_run(delivery, start, rejection, dead_letter=over_limit)
        try:
            if over_limit:
                return self.dead_letter_run(delivery, start, message)
            # Sent now, its reply read when the run first needs it (``serve.beginahead``).
            pending = self.store.send_begin(
                delivery, message.run_id, message.attempt,
                running=running_record(message, started_at=start.started_at),
                event_data={"gpu_class": self.gpu_class, "worker": self.consumer,
                            "deliveries": delivery.deliveries,
                            "reclaimed": delivery.reclaimed})
        except NotSerialisable as exc:
            # Parsed, but nested deeper than the record serialiser allows (found at the
            # first record written, not by serialising every message): a rejection.
            return self.reject_unparseable_run(delivery, start, unreadable(exc.__cause__),
                                               dead_letter=over_limit)
        try:
            return self._run_attempt(delivery, start, message, pending)
        finally:
            pending.close()

    def _run_attempt(self, delivery: Delivery, start: AttemptStart, message: RunMessage,
                     pending: PendingBegin) -> Ending:
        """Execute the attempt whose begin is on its way and write its outcome, its lease
        kept from the begin's reply on."""
        control = ServeControl(self.shutdown, self.publisher)
        control.admission = lambda: self._admit(delivery, message, pending)
        # The lease is kept (from the begin's reply on) until the outcome is written: a
        # terminal write that waits for Redis must not let another worker reclaim (and
        # re-execute) the run.
        self.keeper.watch(delivery, message.run_id, pending.running_token, control)
        try:
            result, events = self.execute_run(message, control, start.monotonic_s)
            begin, token = pending.outcome()  # a failed begin: the entry stays pending
            if begin in (Begin.TERMINAL, Begin.SUPERSEDED):
                return Ending(Outcome.SKIPPED, delivery, run_id=message.run_id,
                              attempt=message.attempt, reason=begin.value)
            if begin is Begin.CANCELED:
                record = canceled_record(message, started_at=start.started_at,
                                         gpu_class=self.gpu_class, queue_ms=start.queue_ms)
                return self._write_terminal(delivery, token, record, Outcome.FINALISED,
                                            event_data=self._finished_event(record),
                                            callback=self._callback_job(message.callback_url,
                                                                        record))
            if not control.admitted:  # ended before it needed the reply (a bad input, say)
                log_started(delivery, message.run_id, message.attempt)
            if control.lease_lost:
                # Another pickup holds the run: its events would be refused like any write.
                return Ending(Outcome.FENCED, delivery, run_id=message.run_id,
                              attempt=message.attempt, reason="lease_lost")
            if result.released:
                self.keeper.unwatch()  # a renewal would undo the release's idle time
                return self.release_run(delivery, message, token, unfit=result.unfit,
                                        events=events)
            self.unfit_starts, self.unfit_reason = 0, None
            return self.finalise_run(delivery, start, token, message, result, events=events)
        finally:
            self.keeper.unwatch()

    def _admit(self, delivery: Delivery, message: RunMessage, pending: PendingBegin) -> None:
        """The begin's reply, on the pipeline's thread when the run first needs it: a begun
        run gets its events bound to its token; any other ends the pipeline
        (``RunReleased``), and ``_run_attempt`` reads the reply again to end it."""
        try:
            begin, token = pending.outcome()
        except QueueError as exc:
            raise RunReleased(f"the run could not begin: {exc}") from exc
        if begin is not Begin.RUNNING:
            raise RunReleased(f"the run is not to be run here ({begin.value})")
        log_started(delivery, message.run_id, message.attempt)
        self.publisher.bind(message.run_id, message.attempt, token)

    def execute_run(self, message: RunMessage, control: ServeControl,
                    picked_up: float) -> tuple[RunResult, list[Event]]:
        """Run the pipeline with this pickup's control; return its result and the progress
        events not written yet, which the run's last write carries before its status event
        (``serve.events``). The control's admission binds the events to the pickup."""
        try:
            result = self.pipeline.execute(message, control, picked_up_monotonic=picked_up)
        except BaseException:
            # No last write follows (the entry stays pending): write them as they are.
            self.publisher.flush(EVENT_FLUSH_TIMEOUT_S)
            self.publisher.unbind()
            raise
        return result, self.publisher.finish(EVENT_FLUSH_TIMEOUT_S)

    def finalise_run(self, delivery: Delivery, start: AttemptStart, token: int,
                     message: RunMessage, result: RunResult, *,
                     events: Sequence[Event] = ()) -> Ending:
        """Write the attempt's terminal record (or its OOM re-enqueue) with its event and
        the ack, after ``events`` (its progress events not written yet)."""
        record = terminal_record(message, result, started_at=start.started_at,
                                 gpu_class=self.gpu_class, gpu_seconds=start.gpu_seconds(),
                                 cold_start_s=self.boot_charge.cold_start_s(result),
                                 queue_ms=start.queue_ms)
        target = self._promotion_target(message) if result.oom else None
        if target is not None:
            following, queued = promoted_run(message, record)
            try:
                promotion = Promotion.of(keys.runs_stream(target), following)
            except NotSerialisable:
                # Too deeply nested to be re-enqueued (its records, without the graph,
                # were fine): this attempt's out-of-memory failure is final.
                record.warnings.append(f"not re-enqueued on {target}: the run message is "
                                       "nested too deeply to serialise")
            else:
                return self._write_terminal(
                    delivery, token, queued, Outcome.PROMOTED, about=record,
                    event_data={"reason": "out_of_memory", "from": self.gpu_class,
                                "gpu_class": target},
                    promotion=promotion, promoted_to=target, events=events)
        return self._write_terminal(delivery, token, record, Outcome.FINALISED,
                                    event_data=self._finished_event(record),
                                    callback=self._callback_job(message.callback_url, record),
                                    events=events)

    def release_run(self, delivery: Delivery, message: RunMessage, token: int, *,
                    unfit: str | None = None, events: Sequence[Event] = ()) -> Ending:
        """Leave an interrupted run pending so another worker takes it at once, its record
        back to ``queued`` (after ``events``, its progress events not written yet).

        ``unfit``: the release is not a stop's but a failed start's that was this worker's
        fault; it counts towards ``RUNFLOW_MAX_UNFIT_STARTS`` and makes the worker not
        ready until a run reaches its outcome here again.
        """
        if unfit is not None:
            self.unfit_starts += 1
            self.unfit_reason = unfit
        error = None
        try:
            released = self.store.release(
                delivery, token, released_record(message),
                event_data={"released": True, "worker": self.consumer},
                consumer=self.consumer, idle_ms=self.queue.lease_ms, events=events)
        except QueueError as exc:
            released, error = False, str(exc)
        return Ending(Outcome.RELEASED, delivery, run_id=message.run_id,
                      attempt=message.attempt, released=released, reason=error,
                      unfit=unfit, unfit_starts=self.unfit_starts)

    def dead_letter_run(self, delivery: Delivery, start: AttemptStart,
                        message: RunMessage) -> Ending:
        """Copy an entry delivered too often to the dead letters and fail it WORKER_LOST."""
        record = dead_letter_record(message, deliveries=delivery.deliveries,
                                    max_deliveries=self.settings.max_deliveries,
                                    started_at=start.started_at, gpu_class=self.gpu_class,
                                    queue_ms=start.queue_ms)
        return self._finalise_unexecuted(delivery, record, message.callback_url,
                                         dead_letter=True)

    def reject_unparseable_run(self, delivery: Delivery, start: AttemptStart,
                               exc: RunRejected | None, *, dead_letter: bool = False) -> Ending:
        """Fail an entry whose message does not parse (or dead-letter it without a run id).

        With ``dead_letter`` (past ``max_deliveries``) the run fails ``WORKER_LOST`` like
        any run whose holders kept dying (SPEC §2), the rejection kept in the error's
        details, and the entry is copied to the dead letters in the same step.
        """
        exc = exc or unreadable(None)
        error = (worker_lost(delivery.deliveries, self.settings.max_deliveries, rejection=exc)
                 if dead_letter else exc)
        record, callback_url = salvage_record(
            delivery.payload, error, gpu_class=self.gpu_class, started_at=start.started_at,
            queue_ms=start.queue_ms, read_record=self.store.read)
        if record is None:
            self.queue.dead_letter_unidentified(delivery, reason=f"unparseable: {exc.message}"[:500])
            return Ending(Outcome.DEAD_LETTERED, delivery)
        return self._finalise_unexecuted(delivery, record, callback_url, dead_letter=dead_letter)

    def _finalise_unexecuted(self, delivery: Delivery, record: RunRecord,
                             callback_url: str | None, *, dead_letter: bool) -> Ending:
        """Write the terminal ``record`` of a run that never executed (+ the dead letter)."""
        begin, token = self.store.begin_attempt(delivery, record.id, record.attempt,
                                                running=None, event_data={})
        if begin in (Begin.TERMINAL, Begin.SUPERSEDED):
            return Ending(Outcome.SKIPPED, delivery, run_id=record.id,
                          attempt=record.attempt, reason=begin.value)
        event_data: dict[str, Any] = {"error": (record.error or {}).get("code")}
        if dead_letter:
            event_data["dead_letter"] = True
        return self._write_terminal(
            delivery, token, record, Outcome.DEAD_LETTERED if dead_letter else Outcome.FINALISED,
            event_data=event_data,
            dead_letter=DeadLetter(reason="max_deliveries") if dead_letter else None,
            callback=self._callback_job(callback_url, record))

    def _write_terminal(self, delivery: Delivery, token: int, record: RunRecord,
                        outcome: Outcome, *, event_data: dict[str, Any],
                        about: RunRecord | None = None, dead_letter: DeadLetter | None = None,
                        promotion: Promotion | None = None, callback: CallbackJob | None = None,
                        promoted_to: str | None = None, events: Sequence[Event] = ()) -> Ending:
        """Write ``record`` (terminal, or the promotion's ``queued``) until Redis takes it;
        the ending is ``outcome`` once written. ``about``: the attempt's terminal record
        when ``record`` is the promotion's; ``events``: the attempt's progress events not
        written yet, written by the same script, before its status event."""
        about = about or record
        done = self._retry_terminal_write(about.id, lambda: self.store.finalise(
            delivery, token, record, event_data=event_data, dead_letter=dead_letter,
            promotion=promotion, callback=callback, events=events,
            events_attempt=about.attempt,
            read_next=(self.consumer if self.intake.may_read_ahead(
                stopping=self.shutdown.requested) else None)))
        ids = {"run_id": about.id, "attempt": about.attempt}
        if isinstance(done, QueueError):
            return Ending(Outcome.ABANDONED, delivery, **ids, reason=str(done))
        verdict, self.intake.read_ahead = done
        if verdict is Finalised.FENCED:
            return Ending(Outcome.FENCED, delivery, **ids, reason="refused")
        if verdict is Finalised.ALREADY_TERMINAL:
            return Ending(Outcome.SKIPPED, delivery, **ids, reason="terminal")
        return Ending.of_record(outcome, delivery, about, promoted_to=promoted_to)

    # ------------------------------------------------------------------ helpers

    def _promotion_target(self, message: RunMessage) -> str | None:
        """The class an out-of-memory run moves up to (None: the top of its ladder)."""
        wf = message.workflow
        return next_larger_class(
            self.gpu_class, self.settings.ladder,
            explicit=wf.gpu_explicit_models if wf.gpu_mode == "explicit" else None)

    def _finished_event(self, record: RunRecord) -> dict[str, Any]:
        """The ``data`` of an executed run's terminal status event."""
        return {"error": record.error and record.error.get("code"),
                "duration_ms": record.duration_ms, "worker": self.consumer}

    def _retry_terminal_write(self, run_id: str, write: Callable[[], T]) -> T | QueueError:
        """Run ``write`` until Redis takes it; the error given up on after a cold stop or
        ``PERMANENT_ERROR_RETRIES`` non-connection errors (the outcome is abandoned)."""
        def on_error(exc: QueueError, retrying: bool, failures: int) -> None:
            self.metrics.redis_errors.inc()
            if retrying and failures == 0:
                log.warning("outcome of run %s waits for Redis: %s", run_id, exc,
                            extra={"run_id": run_id, "event": "finalise_retry"})

        return retry_write(write, give_up=lambda: self.shutdown.hard, on_error=on_error,
                           sleep=lambda s: self.shutdown.sleep(s, until_cold=True),
                           cap_s=TERMINAL_WRITE_RETRY_CAP_S,
                           permanent_retries=PERMANENT_ERROR_RETRIES)

    def _callback_job(self, url: str | None, record: RunRecord) -> CallbackJob | None:
        """The callback to queue with ``record``'s terminal write (None: nothing to send)."""
        if not url or self.callbacks is None:
            return None
        return self.callbacks.job_for(url, record)

    def _observe_pipeline(self) -> None:
        """Feed the runner's restarts and the blob store's hits and misses into the metrics."""
        stats = getattr(self.pipeline.blobs, "stats", None)
        self.metrics.observe_totals(runner_restarts=self.pipeline.supervisor.restarts,
                                    cache_hits=int(getattr(stats, "hits", 0)),
                                    cache_misses=int(getattr(stats, "misses", 0)))

    def _boot(self) -> bool:
        """Create the group and load the scripts, retrying while Redis is away; False if
        stopped meanwhile."""
        backoff = Backoff()
        while not self.shutdown.requested:
            try:
                self.queue.ensure_group()
                load_scripts(self.client, [*self.store.scripts, *self.queue.scripts])
                self._redis_ok = True
                return True
            except QueueError as exc:
                self.metrics.redis_errors.inc()
                if backoff.failures == 0:
                    log.warning("waiting for Redis: %s", exc, extra={"event": "redis_error"})
                self.shutdown.sleep(backoff.next_delay_s())
        return False

    def _wait_after_redis_error(self, backoff: Backoff, then: Callable[[], None] | None) -> None:
        """Back off (a stop request cuts the wait short), then try ``then`` once."""
        self.shutdown.sleep(backoff.next_delay_s())
        if then is not None and not self.shutdown.requested:
            try:
                then()
            except QueueError:
                pass

    def _start_health(self) -> None:
        if not self.http_port:
            return
        self.health = HealthServer(self.metrics, alive=lambda: self._alive,
                                   ready=lambda: (self._redis_ok and self.unfit_reason is None
                                                  and not self.shutdown.requested),
                                   port=self.http_port,
                                   warnings=self.settings_warnings).start()

    def _install_signal_handlers(self) -> None:
        # Signal handlers only work in the main thread (tests run workers in threads too).
        if threading.current_thread() is threading.main_thread():
            self._previous_handlers = self.shutdown.install_signal_handlers(
                self.settings.grace_s)

    def _close(self) -> None:
        self.keeper.close()
        self.publisher.close()
        if self.health is not None:
            self.health.close()
        if self.callbacks is not None:
            left = self.shutdown.grace_left_s()
            self.callbacks.close(timeout_s=min(left, self.settings.grace_s))
        for sig, previous in self._previous_handlers.items():
            signal.signal(sig, previous)
        self._previous_handlers.clear()


def _safe_call(fn: Callable[[], int]) -> float:
    try:
        return float(fn())
    except Exception:  # noqa: BLE001 - a metric must never break a scrape
        return 0.0
