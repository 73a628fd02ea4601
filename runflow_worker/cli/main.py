"""The ``runflow-worker`` command line: serve, run, submit, status, prepare, cache, doctor."""

from __future__ import annotations

import argparse
import importlib.metadata
import sys

from runflow_worker.cli import cache, doctor, prepare, run, serve
from runflow_worker.errors import ConfigError
from runflow_worker.logs import redact
from runflow_worker.runtime.spawn import guard_parent
from runflow_worker.settings import Settings


def package_version() -> str:
    """The installed package's version (``unknown`` when run from a checkout not installed)."""
    try:
        return importlib.metadata.version("runflow-worker")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="runflow-worker",
        description="GPU worker that runs deployed ComfyUI workflows (configuration: "
        "RUNFLOW_* environment variables, see the README)",
    )
    parser.add_argument("--version", action="version",
                        version=f"runflow-worker {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (serve, run, prepare, cache, doctor):
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code.

    Bad configuration (a ``RUNFLOW_*`` variable, or a ConfigError a command raises while
    starting) is one line on stderr naming the variable, and exit code 2: every command
    fails the same way, before doing anything. Every command runs with this process made
    non-dumpable (``runtime.spawn.guard_parent``).
    """
    args = build_parser().parse_args(argv)
    try:
        settings = Settings()
    except ConfigError as exc:  # InvalidSettings: names each variable, never a secret
        print(f"runflow-worker: invalid configuration: {exc}", file=sys.stderr)
        return 2
    # Non-dumpable before any command starts foreign code: pip's build code and install.py
    # run before the first ComfyUI child (whose spawn() would otherwise be the first guard),
    # and a process of this user could read this one's /proc/<pid>/environ meanwhile.
    guard_parent()
    try:
        return int(args.func(args, settings) or 0)
    except ConfigError as exc:
        print(f"runflow-worker {args.command}: {redact(str(exc))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
