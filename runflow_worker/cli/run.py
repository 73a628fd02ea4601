"""``runflow-worker run``: one deployed workflow, once, locally (no Redis).

Progress goes to stderr, the run record as JSON to stdout, outputs into ``--out``
(``file://`` URLs). Exit 0 only when the run succeeded.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any

from runflow_worker.cli.inputs import message_from_args
from runflow_worker.cli.progress import CliControl
from runflow_worker.errors import RunRejected
from runflow_worker.run.contract import RunStatus
from runflow_worker.run.storage import LocalStorage
from runflow_worker.settings import Settings


def add_parser(subparsers: Any) -> None:
    """Register ``run`` on the CLI's subparsers."""
    p = subparsers.add_parser("run", help="run a deployed workflow once, locally")
    p.add_argument("deployed", type=Path, help="DEPLOYED.json (a workflow or a run message)")
    p.add_argument("--input", action="append", default=[], metavar="KEY=VALUE",
                   help="an input value, parsed per its declared type; @path is a local file")
    p.add_argument("--inputs-json", type=Path, help="the run's `input` object as JSON")
    p.add_argument("--out", type=Path, default=Path("runflow-out"),
                   help="directory for the outputs (default: ./runflow-out)")
    p.add_argument("--run-id", help="run id (default: a new one)")
    p.add_argument("--timeout-s", type=float, help="stop the run after this many seconds")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=run_command)


def run_command(args: argparse.Namespace, settings: Settings) -> int:
    """Run once and print the record; exit code 0 only for a succeeded run.

    The GPU class is resolved as ``serve`` resolves it (``RUNFLOW_GPU_CLASS`` on the ladder,
    else NVML detection, else ``cpu``); a class not on the ladder is a ConfigError (exit 2).
    """
    from runflow_worker.run.assembly import build_pipeline
    from runflow_worker.run.gpu import resolve_gpu_class
    from runflow_worker.run.record import AttemptStart, terminal_record
    from runflow_worker.run.sandboxing import refuse_without_sandbox

    refusal = refuse_without_sandbox(settings, "run")
    if refusal is not None:
        print(refusal, file=sys.stderr)
        return 2
    gpu_class = resolve_gpu_class(settings)
    start = AttemptStart.now()
    try:
        message = message_from_args(args)
    except RunRejected as exc:
        record = {"id": args.run_id, "status": "failed", "error": exc.as_error()}
        print(json.dumps(record, indent=2))
        return 2
    control = CliControl(args.quiet)
    previous = signal.signal(signal.SIGINT, lambda *_: control.canceled.set())
    pipeline = build_pipeline(settings, storage=LocalStorage(args.out.resolve()),
                              allow_local_files=True)
    try:
        result = pipeline.execute(message, control,
                                             picked_up_monotonic=start.monotonic_s)
    finally:
        control.bars.close()
        pipeline.close()
        signal.signal(signal.SIGINT, previous)
    record = terminal_record(message, result, started_at=start.started_at, gpu_class=gpu_class,
                             gpu_seconds=start.gpu_seconds(), cold_start_s=result.cold_start_s)
    print(record.model_dump_json(indent=2))
    return 0 if record.status is RunStatus.SUCCEEDED else 1

