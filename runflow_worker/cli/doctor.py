"""``runflow-worker doctor``: can this worker run? GPU, ComfyUI, Redis, storage, cache,
sandbox.

Each check prints one line (``ok``/``FAIL`` and what it found, ``WARN`` for a pass the
operator must read: ``Advisory``); the exit code is 0 only when every check passed. Secrets
never appear: URLs are printed without credentials.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from runflow_worker.settings import Settings


def add_parser(subparsers: Any) -> None:
    """Register ``doctor`` on the CLI's subparsers."""
    p = subparsers.add_parser("doctor", help="check GPU, ComfyUI, Redis, storage and cache")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.set_defaults(func=doctor_command)


class Advisory(str):
    """A check's finding that passes but that the operator must read (shown as ``WARN``)."""


def _shown(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def check_gpu(settings: Settings) -> str:
    """The GPU NVML sees and the class this worker would serve."""
    from runflow_worker.run.gpu import detect_gpu, resolve_gpu_class

    info = detect_gpu()
    found = f"{info.name}, {info.vram_gib:.0f} GiB" if info else "no GPU (NVML)"
    return f"{found}; serves class {resolve_gpu_class(settings)}"


def check_comfyui(settings: Settings) -> str:
    """The baked ComfyUI checkout exists and its commit; without one, that environments can
    be built (git is there)."""
    from runflow_worker.cache.bytecode import has_bytecode
    from runflow_worker.runtime.comfy import git_commit

    path = settings.comfyui_dir
    if path is None:
        git = shutil.which("git")
        if git is None:
            raise RuntimeError("RUNFLOW_COMFYUI_DIR is not set and git, needed to build "
                               "the pinned environments, is not on the PATH")
        return (f"no baked checkout: each run's pinned environment is built under "
                f"{settings.cache_dir / 'envs'} (git at {git})")
    if not (path / "nodes.py").is_file() or not (path / "comfy").is_dir():
        raise RuntimeError(f"{path} is not a ComfyUI checkout")
    found = f"{path} at {git_commit(str(path)) or 'an unknown commit'}"
    if not has_bytecode(path / "nodes.py"):
        # The sandboxed child never writes bytecode (docs/environments.md, "Bytecode").
        return Advisory(f"{found}, without bytecode: every ComfyUI start compiles it anew "
                        f"(python -m compileall {path}, as Dockerfile.cuda does)")
    return found


def check_redis(settings: Settings) -> str:
    """Redis answers PING."""
    import redis

    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=3,
                                  socket_timeout=3)
    try:
        client.ping()
        version = client.info("server").get("redis_version", "?")
    finally:
        client.close()
    return f"{_shown(settings.redis_url)} (redis {version})"


def check_storage(settings: Settings) -> str:
    """The output storage accepts writes (local) or its bucket exists (S3)."""
    url = settings.effective_storage_url
    parts = urlsplit(url)
    if parts.scheme == "file":
        root = Path(parts.path)
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".doctor-"):
            pass
        return f"{_shown(url)} writable"
    if parts.scheme == "s3":
        import boto3

        boto3.client("s3", endpoint_url=settings.s3_endpoint_url).head_bucket(
            Bucket=parts.netloc)
        return f"bucket {parts.netloc} reachable"
    raise RuntimeError(f"unsupported storage URL scheme {parts.scheme!r}")


def check_cache(settings: Settings) -> str:
    """The cache directory is writable; its free space and budget."""
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=settings.cache_dir, prefix=".doctor-"):
        pass
    usage = shutil.disk_usage(settings.cache_dir)
    budget = settings.effective_cache_max_bytes()
    return (f"{settings.cache_dir}: {usage.free / 2**30:.1f} GiB free, "
            f"budget {budget / 2**30:.1f} GiB")


def check_sandbox(settings: Settings) -> str:
    """A sandbox starts (``RUNFLOW_SANDBOX=bwrap``); with ``none``, passes and says the
    worker is unsandboxed."""
    from runflow_worker.run.sandboxing import check_sandbox as check

    return check(settings)


CHECKS: dict[str, Callable[[Settings], str]] = {
    "gpu": check_gpu, "comfyui": check_comfyui, "redis": check_redis,
    "storage": check_storage, "cache": check_cache, "sandbox": check_sandbox,
}


def doctor_command(args: argparse.Namespace, settings: Settings) -> int:
    """Run every check; exit 0 only if all passed."""
    results: list[dict[str, Any]] = []
    for name, check in CHECKS.items():
        try:
            detail = check(settings)
            results.append({"check": name, "ok": True, "detail": str(detail)})
            if isinstance(detail, Advisory) or (name == "sandbox" and not settings.sandboxed):
                results[-1]["warning"] = True  # passes, but the operator must see it
        except Exception as exc:  # noqa: BLE001 - every failure is a finding, not a crash
            results.append({"check": name, "ok": False,
                            "detail": f"{type(exc).__name__}: {exc}"})
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            mark = "FAIL" if not r["ok"] else "WARN" if r.get("warning") else "ok  "
            print(f"{mark} {r['check']:<8} {r['detail']}")
    return 0 if all(r["ok"] for r in results) else 1
