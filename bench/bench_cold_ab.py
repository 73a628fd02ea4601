"""Benchmark: ``serve``'s cold start, two source trees (two commits) alternating.

Each launch is ``python -m runflow_worker.cli.main serve --max-runs 1`` from one tree, with one run
(EmptyImage -> Runflow output, no input to fetch) queued before the launch; measured from
the launch to the run's terminal record in Redis (read every 5 ms). The trees alternate, the
order flipping each round, so the load of a shared machine hits both alike. Real ComfyUI
(``RUNFLOW_TEST_COMFYUI``; ``RUNFLOW_TEST_SANDBOX_READ_ONLY`` is passed on as
``RUNFLOW_SANDBOX_READ_ONLY``), sandboxed, CPU. A tree is a checkout of the project, e.g.
``git worktree add /tmp/before <commit>``::

    RUNFLOW_TEST_COMFYUI=<checkout> python bench/bench_cold_ab.py BEFORE_TREE AFTER_TREE
        [--rounds 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_serve import start_redis
from runflow_worker.run.contract import parse_message
from runflow_worker.serve import keys
from runflow_worker.serve.submit import enqueue_message


def workflow(comfy: Path) -> dict:
    """The run: an empty image saved as output, pinned to the checkout's commit."""
    commit = subprocess.run(["git", "-C", str(comfy), "rev-parse", "HEAD"], check=True,
                            capture_output=True, text=True).stdout.strip()
    return {"owner": "bench", "slug": "cold", "version": "1",
            "environment": {"comfyui": {"origin": "https://github.com/comfyanonymous/ComfyUI",
                                        "commit": commit}},
            "workflow_json": {
                "1": {"class_type": "EmptyImage",
                      "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 0}},
                "2": {"class_type": "RunflowOutputImage",
                      "inputs": {"output_id": "result", "value": ["1", 0]}}}}


def launch(tree: Path, client: redis.Redis, url: str, wf: dict, work: Path) -> dict:
    """One cold start of ``serve`` from ``tree``; its seconds to the terminal record."""
    run_id = uuid.uuid4().hex
    msg = parse_message({"run_id": run_id, "attempt": 1, "workflow": wf, "input": {},
                         "timeout_s": 600})
    enqueue_message(client, msg, "cpu", events_maxlen=10_000)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNFLOW_")}
    env.update(PYTHONPATH=str(tree), RUNFLOW_REDIS_URL=url, RUNFLOW_GPU_CLASS="cpu",
               RUNFLOW_COMFYUI_DIR=os.environ["RUNFLOW_TEST_COMFYUI"],
               RUNFLOW_SANDBOX_READ_ONLY=os.environ.get("RUNFLOW_TEST_SANDBOX_READ_ONLY", ""),
               RUNFLOW_CACHE_DIR=str(work / "cache"),
               RUNFLOW_STORAGE_URL=(work / "out").as_uri(), RUNFLOW_HTTP_PORT="0")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "runflow_worker.cli.main", "serve", "--max-runs", "1"],
                            cwd=tree, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        while True:
            raw = client.get(keys.run_record(run_id))
            if raw and json.loads(raw)["status"] in ("succeeded", "failed", "canceled"):
                break
            if proc.poll() is not None:
                raise RuntimeError(f"serve from {tree} exited {proc.returncode} early")
            time.sleep(0.005)
        seconds = time.perf_counter() - start
    finally:
        proc.wait(60)
    record = json.loads(raw)
    if record["status"] != "succeeded":
        raise RuntimeError(f"the run failed: {record.get('error')}")
    return {"s": seconds, "billed_s": record["billing"]["attempts"][0]["cold_start_seconds"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs=2, type=Path)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    if not os.environ.get("RUNFLOW_TEST_COMFYUI"):
        sys.exit("set RUNFLOW_TEST_COMFYUI to a ComfyUI checkout")
    comfy = Path(os.environ["RUNFLOW_TEST_COMFYUI"])
    results: dict[str, list[dict]] = {str(t): [] for t in args.trees}
    work = Path(tempfile.mkdtemp(prefix="bench-cold-"))
    server, url = start_redis(work)
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        wf = workflow(comfy)
        for n in range(args.rounds):
            order = args.trees if n % 2 == 0 else args.trees[::-1]
            for tree in order:
                one = launch(tree.resolve(), client, url, wf, work / f"w{len(results[str(tree)])}"
                             f"-{tree.name}")
                results[str(tree)].append(one)
                print(f"{tree}: {one['s']:.3f} s (billed {one['billed_s']:.3f} s)",
                      file=sys.stderr)
    finally:
        client.close()
        server.kill()
        server.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({tree: {"median_s": round(statistics.median(r["s"] for r in rows), 3),
                             "all_s": [round(r["s"], 3) for r in rows]}
                      for tree, rows in results.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
