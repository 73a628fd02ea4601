"""``runflow-worker prepare DEPLOYED.json [--models]``: ready a worker for a workflow before
traffic, and check a deployment.

It does what a run's first part does, and nothing more: builds the workflow's environment
(or takes ``RUNFLOW_COMFYUI_DIR``), starts ComfyUI in it once so every custom node pack is
imported (a declared pack that fails to import is found now, not on a caller's run), and
with ``--models`` fetches the models and resources into the store, with progress bars on
stderr. A JSON report goes to stdout. Exit 0 only if all of it worked; 1 when a step failed;
2 for a DEPLOYED.json that breaks the contract (the caller's inputs are not asked for).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from runflow_worker.cli.inputs import load_deployed
from runflow_worker.cli.progress import CliControl
from runflow_worker.errors import RunRejected
from runflow_worker.run import contract as c
from runflow_worker.run.storage import LocalStorage
from runflow_worker.settings import Settings


def add_parser(subparsers: Any) -> None:
    """Register ``prepare`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "prepare", help="build a workflow's environment, import its custom nodes once and "
                        "(--models) fetch its models; exit 0 only if all of it worked")
    p.add_argument("deployed", type=Path, help="DEPLOYED.json (a workflow or a run message)")
    p.add_argument("--models", action="store_true",
                   help="also fetch the workflow's models and resources into the store")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=prepare_command)


def workflow_message(path: Path) -> c.RunMessage:
    """The deployed workflow of ``path`` as a run message without inputs, checked by the
    contract's rules except those about the caller's inputs. Raises RunRejected."""
    data = load_deployed(path)
    message = c.parse_message({"run_id": f"prepare-{uuid.uuid4().hex[:12]}",
                               "workflow": data["workflow"]})
    try:
        c.check_message(message)
    except RunRejected as exc:
        # Preparing needs no caller: a required input nobody gave is no fault of the file.
        own = [v for v in exc.violations if not v.field.startswith("input.")]
        if own:
            raise RunRejected(own) from None
    return message


def prepare_command(args: argparse.Namespace, settings: Settings) -> int:
    """Prepare the workflow of ``args.deployed``; print the report; return the exit code."""
    from runflow_worker.run.assembly import build_pipeline

    try:
        message = workflow_message(args.deployed)
    except RunRejected as exc:
        print(json.dumps({"status": "failed", "error": exc.as_error()}, indent=2))
        return 2
    control = CliControl(args.quiet)
    previous = signal.signal(signal.SIGINT, lambda *_: control.canceled.set())
    if not args.quiet:
        what = "environment and models" if args.models else "environment"
        print(f"preparing the {what} of {args.deployed}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as outputs:  # nothing is uploaded; storage unused
        pipeline = build_pipeline(settings, storage=LocalStorage(Path(outputs)))
        try:
            result = pipeline.prepare(message, control, models=args.models)
        finally:
            control.bars.close()
            pipeline.close()
            signal.signal(signal.SIGINT, previous)
    ok = result.status is c.RunStatus.SUCCEEDED
    report: dict[str, Any] = {
        "status": "ready" if ok else "failed",
        "models": args.models,
        "environment": result.environment,
        "warnings": result.warnings,
        "timings_ms": result.timings_ms,
    }
    if result.failure is not None:
        report["error"] = result.failure.as_error()
    print(json.dumps(report, indent=2))
    if not args.quiet:
        print("ready" if ok else f"failed: {report['error']['message']}", file=sys.stderr)
    return 0 if ok else 1
