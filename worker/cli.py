"""The ``runflow-worker`` command line: serve, run, submit, status, cache, doctor."""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from worker import cache_cli, doctor_cli, run_cli, serve_cli
from worker.settings import Settings


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="runflow-worker",
        description="GPU worker that runs deployed ComfyUI workflows (configuration: "
        "RUNFLOW_* environment variables, see the README)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve_cli.add_parser(sub)
    run_cli.add_parser(sub)
    cache_cli.add_parser(sub)
    doctor_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"runflow-worker: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    return int(args.func(args, settings) or 0)


if __name__ == "__main__":
    sys.exit(main())
