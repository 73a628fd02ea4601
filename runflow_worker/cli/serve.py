"""``runflow-worker serve``, ``submit`` and ``status``: the queue side of the command line.

- ``serve [--burst] [--max-runs N] [--gpu-class C]``: the daemon (exit 0 on every stop).
- ``submit DEPLOYED.json [--input K=V ...] [--wait]``: enqueue a run, print its id; with
  ``--wait`` follow its events on stderr and print the final record; exit 0 only when it
  succeeded. A run id that already has a record is refused (exit 2, nothing enqueued).
- ``status RUN_ID``: print the run record.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from runflow_worker.cli.progress import describe_event
from runflow_worker.errors import ConfigError, QueueError, RunRejected
from runflow_worker.run.contract import RunMessage, RunStatus, check_message
from runflow_worker.serve import keys
from runflow_worker.settings import Settings

log = logging.getLogger(__name__)

"""Test hook: ``1`` makes ``serve`` never renew its lease (to prove reclaims work)."""
WAIT_BLOCK_MS = 1000
"""How long ``submit --wait`` blocks on the events stream before re-reading the record."""


def add_parser(subparsers: Any) -> None:
    """Register ``serve``, ``submit`` and ``status`` on the CLI's subparsers."""
    p = subparsers.add_parser("serve", help="run queued runs from Redis (the daemon)")
    p.add_argument("--burst", action="store_true",
                   help="exit once the stream is empty (after reclaiming expired entries)")
    p.add_argument("--max-runs", type=int, metavar="N", help="exit after N runs")
    p.add_argument("--gpu-class", metavar="C", help="class to serve (default: detected)")
    p.set_defaults(func=serve_command)

    p = subparsers.add_parser("submit", help="enqueue a run of a deployed workflow")
    p.add_argument("deployed", type=Path, help="DEPLOYED.json (a workflow or a run message)")
    p.add_argument("--input", action="append", default=[], metavar="KEY=VALUE",
                   help="an input value, parsed per its declared type")
    p.add_argument("--inputs-json", type=Path, help="the run's `input` object as JSON")
    p.add_argument("--gpu-class", metavar="C", help="stream to enqueue on (default: detected)")
    p.add_argument("--wait", action="store_true",
                   help="follow progress on stderr, print the final record on stdout")
    p.add_argument("--run-id", help="run id (default: the message's, else a new one)")
    p.add_argument("--timeout-s", type=float, help="the run's timeout_s")
    p.add_argument("--callback-url", help="POST the terminal record here")
    p.set_defaults(func=submit_command)

    p = subparsers.add_parser("status", help="print a run record")
    p.add_argument("run_id")
    p.set_defaults(func=status_command)


# --------------------------------------------------------------------------- serve


def _build_pipeline(settings: Settings, device: str) -> Any:
    from runflow_worker.run.assembly import build_pipeline

    return build_pipeline(settings, cpu=device == "cpu", prestart=True)


def serve_command(args: argparse.Namespace, settings: Settings) -> int:
    """Run the daemon until it stops: 0 on every orderly stop, 2 on bad configuration (a
    GPU class without a usable CUDA device included), 3 when ComfyUI cannot start through
    the worker's own fault (``RUNFLOW_MAX_UNFIT_STARTS``)."""
    from runflow_worker.serve.shutdown import ShutdownState

    # Before anything slow: a SIGTERM while the pipeline is being built is a stop request,
    # not a kill.
    shutdown = ShutdownState()
    shutdown.install_signal_handlers(settings.grace_s)

    from runflow_worker.logs import configure_logging
    from runflow_worker.run.gpu import resolve_device, resolve_gpu_class
    from runflow_worker.run.sandboxing import refuse_without_sandbox

    configure_logging(settings.log_level)
    try:
        gpu_class = resolve_gpu_class(settings, args.gpu_class)
        device = resolve_device(settings, gpu_class)
    except ConfigError as exc:
        print(f"runflow-worker serve: {exc}", file=sys.stderr)
        return 2
    refusal = refuse_without_sandbox(settings, "serve")
    if refusal is not None:
        print(refusal, file=sys.stderr)
        return 2
    if args.max_runs is not None and args.max_runs < 1:
        print("runflow-worker serve: --max-runs must be at least 1", file=sys.stderr)
        return 2
    # The ComfyUI child starts first (``prestart``): its import (seconds) overlaps the rest
    # of the boot, the daemon's own imports, the cache's parts, Redis, the first dequeue.
    pipeline = _build_pipeline(settings, device)
    try:
        from runflow_worker.serve.callbacks import build_sender
        from runflow_worker.serve.daemon import Worker
        from runflow_worker.serve.metrics import Metrics

        metrics = Metrics()
        callbacks = build_sender(settings, metrics)
        worker = Worker(settings, pipeline, gpu_class=gpu_class, metrics=metrics,
                        callbacks=callbacks, shutdown=shutdown,
                        renew_leases=settings.lease_renewal)
        return worker.work(burst=args.burst, max_runs=args.max_runs)
    finally:
        pipeline.close()  # also stops a pre-started child the worker never got to use


# --------------------------------------------------------------------------- submit


def build_submit_message(args: argparse.Namespace) -> RunMessage:
    """The run message for ``submit`` (RunRejected when it breaks a SPEC §3 rule)."""
    from runflow_worker.cli.inputs import message_from_args

    message = message_from_args(args)
    check_message(message)
    return message


def submit_command(args: argparse.Namespace, settings: Settings) -> int:
    """Enqueue a run; print its id, or with ``--wait`` its final record (0 iff succeeded).

    Exit 2 when nothing was enqueued because of what was asked (a SPEC §3 violation, a bad
    argument, a run id that already has a record), 1 on a Redis error or a run that did not
    succeed.
    """
    from runflow_worker.run.gpu import resolve_gpu_class
    from runflow_worker.serve.queue import connect
    from runflow_worker.serve.recordstore import RunExists
    from runflow_worker.serve.submit import enqueue_message, events_tail, follow_run

    try:
        message = build_submit_message(args)
        gpu_class = resolve_gpu_class(settings, args.gpu_class)
    except RunRejected as exc:
        print(json.dumps({"error": exc.as_error()}, indent=2), file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"runflow-worker submit: {exc}", file=sys.stderr)
        return 2
    client = connect(settings.redis_url, block_s=WAIT_BLOCK_MS / 1000)
    try:
        # The events cursor is taken before the XADD, so no event of this run is missed.
        cursor = events_tail(client) if args.wait else "$"
        enqueue_message(client, message, gpu_class, events_maxlen=settings.events_maxlen)
        if not args.wait:
            print(message.run_id)
            return 0
        print(message.run_id, file=sys.stderr)
        record = follow_run(client, message.run_id, cursor, on_event=_print_event,
                            block_ms=WAIT_BLOCK_MS)
    except RunExists as exc:
        print(f"runflow-worker submit: {exc}", file=sys.stderr)
        return 2
    except QueueError as exc:
        print(f"runflow-worker submit: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        client.close()
    print(record.model_dump_json(indent=2))
    return 0 if record.status is RunStatus.SUCCEEDED else 1


def _print_event(fields: dict[str, str]) -> None:
    try:
        data = json.loads(fields.get("data") or "{}")
    except ValueError:
        data = {}
    kind = fields.get("type")
    if kind == "status":
        print(f"status: {fields.get('status')}", file=sys.stderr)
        return
    line = describe_event(kind, data)
    if line is not None:
        print(line, file=sys.stderr)


# --------------------------------------------------------------------------- status


def status_command(args: argparse.Namespace, settings: Settings) -> int:
    """Print the record of ``RUN_ID`` as JSON; exit 1 when there is none."""
    from runflow_worker.serve.queue import connect, redis_errors

    client = connect(settings.redis_url)
    try:
        with redis_errors("reading the run record"):
            raw = client.get(keys.run_record(args.run_id))
    except QueueError as exc:
        print(f"runflow-worker status: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    if not raw:
        print(f"runflow-worker status: no record for run {args.run_id}", file=sys.stderr)
        return 1
    print(json.dumps(json.loads(raw), indent=2))
    return 0
