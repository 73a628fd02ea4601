"""``runflow-worker cache``: inspect and maintain the model store; builders of the cache objects.

- ``cache ls [--json]``: blobs, most recently used first, with size, last use, access
  (public, private to N owners, unrecorded) and pins.
- ``cache verify [SHA256 ...] [--no-quarantine]``: re-hash blobs; corrupt ones are moved to
  quarantine (exit 1 when any is corrupt); blobs without an access record are listed.
- ``cache gc [--max-bytes N] [--max-envs N]``: evict least recently used, unpinned blobs down
  to the budget (``RUNFLOW_CACHE_MAX_BYTES``, else 80% of the volume), and unused prepared
  environments beyond ``RUNFLOW_ENV_MAX_COUNT``, then the git mirrors no environment left
  uses; also the run directories of workers that were killed mid-run, the lock and pin
  files of dead processes and the access records of blobs no longer there.
- ``cache envs [--json]``: prepared environments, most recently used first.
- ``cache pull SHA256 URL [URL ...] [--size N]``: fetch a blob now, with a progress bar.

The cache objects are built from the settings in ``run.assembly``.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from runflow_worker.run.assembly import build_blob_store, build_environments
from runflow_worker.settings import Settings

if TYPE_CHECKING:
    from runflow_worker.cache.access import Access
    from runflow_worker.cache.blobs import BlobStore
    from runflow_worker.cache.environments import Environments


def add_parser(subparsers: Any) -> None:
    """Register ``cache ls | verify | gc | pull`` on the CLI's subparsers."""
    parser = subparsers.add_parser("cache", help="inspect and maintain the model store")
    actions = parser.add_subparsers(dest="cache_command", required=True, metavar="ACTION")

    p = actions.add_parser("ls", help="list blobs, most recently used first")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = actions.add_parser("verify", help="re-hash blobs and quarantine corrupt ones")
    p.add_argument("digests", nargs="*", metavar="SHA256", help="only these (default: all)")
    p.add_argument("--no-quarantine", action="store_true", help="report only")

    p = actions.add_parser("gc", help="evict least recently used blobs down to the budget "
                                      "and unused environments beyond their count")
    p.add_argument("--max-bytes", type=int, metavar="N",
                   help="budget for this run (default: RUNFLOW_CACHE_MAX_BYTES or 80%% of "
                        "the volume)")
    p.add_argument("--max-envs", type=int, metavar="N",
                   help="environments kept (default: RUNFLOW_ENV_MAX_COUNT; 0 keeps all)")

    p = actions.add_parser("envs", help="list prepared environments, most recently used first")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = actions.add_parser("pull", help="fetch one blob into the store")
    p.add_argument("sha256", metavar="SHA256")
    p.add_argument("urls", nargs="+", metavar="URL", help="sources, tried in order")
    p.add_argument("--size", type=int, metavar="BYTES", help="expected size (disk check)")

    parser.set_defaults(func=run_cache_command)


def run_cache_command(args: argparse.Namespace, settings: Settings) -> int:
    """Run a ``cache`` action; return the exit code (0 ok, 1 failed, 2 bad arguments)."""
    from runflow_worker.cache.errors import CacheError
    from runflow_worker.run.rundirs import WORK_SUBDIR, remove_abandoned_run_dirs

    try:
        store = build_blob_store(settings)
        action = args.cache_command
        if action == "ls":
            return _ls(store, as_json=args.json)
        if action == "verify":
            return _verify(store, args.digests, quarantine=not args.no_quarantine)
        if action == "gc":
            for name in remove_abandoned_run_dirs(settings.cache_dir / WORK_SUBDIR):
                print(f"removed run directories of a worker that is gone ({name})")
            return _gc(store, args.max_bytes, build_environments(settings), args.max_envs)
        if action == "envs":
            return _envs(build_environments(settings), as_json=args.json)
        if action == "pull":
            return _pull(store, args.sha256, args.urls, args.size)
    except ValueError as exc:
        print(f"runflow-worker cache: {exc}", file=sys.stderr)
        return 2
    except CacheError as exc:
        print(f"runflow-worker cache: {exc}", file=sys.stderr)
        return 1
    print(f"runflow-worker cache: unknown action {args.cache_command!r}", file=sys.stderr)
    return 2


def _iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ls(store: BlobStore, *, as_json: bool) -> int:
    from rich.filesize import decimal

    blobs = store.ls()
    if as_json:
        rows = [{"sha256": b.sha256, "size_bytes": b.size_bytes, "last_used": _iso(b.last_used),
                 "pinned": b.pinned, "public": b.access.public,
                 "proven_owners": b.access.owners, "path": str(b.path)} for b in blobs]
        print(json.dumps(rows, indent=2))
        return 0
    # Plain columns, one blob a line: full digests, easy to grep and cut.
    print(f"{'SHA256':<64}  {'SIZE':>10}  {'LAST USED':<20}  {'ACCESS':<10}  PINNED")
    for b in blobs:
        pinned = "yes" if b.pinned else ""
        print(f"{b.sha256}  {decimal(b.size_bytes):>10}  {_iso(b.last_used):<20}  "
              f"{_access(b.access):<10}  {pinned}")
    budget = f" of a {decimal(store.max_bytes)} budget" if store.max_bytes else ""
    print(f"{len(blobs)} blobs, {decimal(sum(b.size_bytes for b in blobs))}{budget}")
    return 0


def _access(access: Access) -> str:
    """``public``, ``private:N`` (N owners' sources showed it) or ``unrecorded``."""
    if access.public:
        return "public"
    return f"private:{access.owners}" if access.owners else "unrecorded"


def _verify(store: BlobStore, digests: list[str], *, quarantine: bool) -> int:
    result = store.verify(digests or None, quarantine=quarantine)
    for digest in result.unrecorded:
        print(f"unrecorded {digest} (handed to a run only once its source shows it)")
    for digest in result.corrupt:
        print(f"corrupt {digest}")
    for path in result.quarantined:
        print(f"quarantined {path}")
    print(f"{len(result.ok)} ok, {len(result.corrupt)} corrupt")
    return 1 if result.corrupt else 0


def _gc(store: BlobStore, max_bytes: int | None, envs: Environments,
        max_envs: int | None) -> int:
    from rich.filesize import decimal

    if max_envs is not None and max_envs < 0:
        raise ValueError("--max-envs must be 0 or more")
    result = store.gc(max_bytes)
    for digest in result.evicted:
        print(f"evicted {digest}")
    kept = f", {len(result.kept_pinned)} pinned kept" if result.kept_pinned else ""
    print(f"freed {decimal(result.freed_bytes)}; {decimal(result.total_bytes)} left{kept}")
    if result.stale_files_removed or result.access_records_removed:
        print(f"removed {result.stale_files_removed} stale lock/pin files, "
              f"{result.access_records_removed} access records of absent blobs")
    env_result = envs.gc(max_envs)
    for key in env_result.evicted:
        print(f"evicted environment {key}")
    for key in env_result.removed_incomplete:
        print(f"removed incomplete environment {key}")
    for name in env_result.mirrors_removed:
        print(f"removed git mirror {name} (no environment uses it)")
    kept = f", {len(env_result.kept_pinned)} in use kept" if env_result.kept_pinned else ""
    print(f"{env_result.remaining} environments left{kept}")
    return 0


def _envs(envs: Environments, *, as_json: bool) -> int:
    from rich.filesize import decimal

    infos = envs.ls()
    if as_json:
        rows = [{"key": i.key, "ready": i.ready, "last_used": _iso(i.last_used),
                 "size_bytes": i.size_bytes, "pinned": i.pinned, "path": str(i.path)}
                for i in infos]
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'KEY':<24}  {'SIZE':>10}  {'LAST USED':<20}  STATE")
    for i in infos:
        size = decimal(i.size_bytes) if i.size_bytes is not None else "?"
        state = ("in use" if i.pinned else "ready") if i.ready else (
            "building" if i.pinned else "incomplete")
        print(f"{i.key:<24}  {size:>10}  {_iso(i.last_used):<20}  {state}")
    limit = f" (keeping {envs.max_count})" if envs.max_count else ""
    print(f"{len(infos)} environments{limit}")
    return 0


def _pull(store: BlobStore, sha256: str, urls: list[str], size: int | None) -> int:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from runflow_worker.cache.blobs import check_digest

    digest = check_digest(sha256)
    columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True, console=_stderr_console()) as bar:
        task = bar.add_task(digest[:12], total=size)

        def progress(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        with store.pin([digest]):
            path = store.ensure(digest, urls, size, progress=progress)
    print(path)
    return 0


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)
