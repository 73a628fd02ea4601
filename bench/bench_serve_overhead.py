"""Micro-benchmark of what ``serve`` adds per warm run over the pipeline, and its Redis traffic.

The fake ComfyUI child of the tests runs a toy graph (a string input saved as an output), so
what is timed is the daemon's own share: the wake-up on the stream, the begin and finalise
scripts, the event publisher, the hand-offs between threads.

Rows, their warm runs interleaved in a new random order each round, in one invocation:

- **serve[i]**: a ``runflow-worker serve`` daemon from source tree ``--trees``'s i-th
  entry (default: this checkout), each on its own queue of one Redis; time from just before
  the enqueue to the terminal status event (a blocking ``XREAD``);
- **pipeline**: ``Pipeline.execute`` of this checkout in the benchmark's process (no Redis,
  no daemon), the same graph and fake child.

``serve[i] - pipeline`` (medians) is the daemon's overhead; the paired difference between
two trees' runs of the same round compares them under the same load. ``--queued N`` also
times each daemon draining N runs queued at once (ms per run), the trees alternating.

``--count N``: an in-process ``Worker`` of this checkout whose Redis connections record
every request (``tests/support/redis_count.py``); prints what its N-th warm run sent, per
thread (one line per round trip), and the counts.

    python bench/bench_serve_overhead.py [--runs 200] [--trees DIR [DIR ...]] [--count 5]
                                         [--queued 20]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_serve import events_tail, start_redis, wait_terminal

from bench.stats import pct
from runflow_worker.run.contract import RunStatus, parse_message
from runflow_worker.serve import keys
from runflow_worker.serve.submit import enqueue_message
from tests.fakes import SERVE_CHILD
from tests.support import factories

FAKE_CHILD = SERVE_CHILD


def message() -> Any:
    """A fresh run message of the tests' toy graph (two nodes: two progress events a run)."""
    return parse_message(factories.message(run_id=uuid.uuid4().hex,
                                           input={"prompt": uuid.uuid4().hex},
                                           timeout_s=600))


class Serve:
    """A ``serve`` daemon of one source tree, on its own queue."""

    def __init__(self, tree: Path, env: dict[str, str], gpu_class: str, client: Any,
                 log_path: Path) -> None:
        self.gpu_class = gpu_class
        self.client = client
        self.cursor = events_tail(client)
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runflow_worker.cli.main", "serve"], cwd=tree,
            env={**env, "PYTHONPATH": str(tree), "RUNFLOW_GPU_CLASS": gpu_class},
            stdout=self._log, stderr=subprocess.STDOUT)

    def run(self) -> float:
        """One run, enqueue to terminal event, in ms."""
        msg = message()
        t = time.perf_counter()
        enqueue_message(self.client, msg, self.gpu_class, events_maxlen=100_000)
        self.cursor = wait_terminal(self.client, msg.run_id, self.cursor, timeout_s=120)
        elapsed_ms = (time.perf_counter() - t) * 1000
        rec = json.loads(self.client.get(keys.run_record(msg.run_id)))
        if rec["status"] != RunStatus.SUCCEEDED.value:
            raise RuntimeError(f"run {msg.run_id} {rec['status']}: {rec.get('error')}")
        return elapsed_ms

    def drain(self, n: int) -> float:
        """``n`` runs queued at once, first enqueue to the last terminal event: ms per run."""
        msgs = [message() for _ in range(n)]
        t = time.perf_counter()
        for msg in msgs:
            enqueue_message(self.client, msg, self.gpu_class, events_maxlen=100_000)
        self.cursor = wait_terminal(self.client, msgs[-1].run_id, self.cursor, timeout_s=120)
        return (time.perf_counter() - t) * 1000 / n

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        self._log.close()


class InProcess:
    """``Pipeline.execute`` of the toy graph in this process."""

    def __init__(self, work: Path) -> None:
        from runflow_worker.run.pipeline import Pipeline, PipelineConfig
        from runflow_worker.run.storage import LocalStorage

        comfy = work / "fake-comfyui"
        comfy.mkdir(exist_ok=True)
        self.pipeline = Pipeline(PipelineConfig(work_dir=work / "inproc", comfyui_dir=comfy,
                                                cpu=True, child_entry=FAKE_CHILD,
                                                sandbox=False),
                                 storage=LocalStorage(work / "inproc-out"), blobs=None,
                                 fetch_input=None)

    def run(self) -> float:
        from runflow_worker.run.pipeline import StopReason

        class Control:
            def stop_reason(self) -> StopReason | None:
                return None

            def admit(self) -> None:
                pass

            def emit(self, kind: str, data: dict[str, Any]) -> None:
                pass

        msg = message()
        t = time.perf_counter()
        result = self.pipeline.execute(msg, Control(), picked_up_monotonic=time.monotonic())
        elapsed_ms = (time.perf_counter() - t) * 1000
        if result.status is not RunStatus.SUCCEEDED:
            raise RuntimeError(f"pipeline run failed: {result.failure}")
        return elapsed_ms

    def close(self) -> None:
        self.pipeline.close()


def count_requests(redis_url: str, work: Path, runs: int) -> dict[str, Any]:
    """Run ``runs`` warm runs through an in-process Worker whose connections count; list
    what the last one sent."""
    import redis

    from runflow_worker.run.pipeline import Pipeline, PipelineConfig
    from runflow_worker.run.storage import LocalStorage
    from runflow_worker.serve.daemon import Worker
    from runflow_worker.settings import Settings
    from tests.support.redis_count import CommandLog, counting_client, describe

    comfy = work / "count-comfyui"
    comfy.mkdir(exist_ok=True)
    settings = Settings(redis_url=redis_url, lease_s=60.0, idle_exit_s=0.0, http_port=0,
                        cache_dir=work / "count-cache", gpu_ladder="cpu:0,count:0")
    pipeline = Pipeline(PipelineConfig(work_dir=work / "count-work", comfyui_dir=comfy, cpu=True,
                                       child_entry=FAKE_CHILD, sandbox=False),
                        storage=LocalStorage(work / "count-out"), blobs=None, fetch_input=None)
    log = CommandLog()
    worker = Worker(settings, pipeline, gpu_class="count",
                    client=counting_client(redis_url, log))
    log.name_scripts(store=worker.store, queue=worker.queue)
    thread = threading.Thread(target=worker.work, name="runflow-serve", daemon=True)
    thread.start()
    client = redis.Redis.from_url(redis_url, decode_responses=True, protocol=2)
    cursor = events_tail(client)
    run_ids = []
    try:
        for _ in range(runs + 1):
            msg = message()
            enqueue_message(client, msg, "count", events_maxlen=100_000)
            cursor = wait_terminal(client, msg.run_id, cursor, timeout_s=60)
            rec = json.loads(client.get(keys.run_record(msg.run_id)))
            if rec["status"] != RunStatus.SUCCEEDED.value:
                raise RuntimeError(f"run {msg.run_id} {rec['status']}: {rec.get('error')}")
            run_ids.append(msg.run_id)
        # The window of the last run ends at the loop's next read.
        deadline = time.monotonic() + 5
        while not log.next_read_sent(run_ids[-1]) and time.monotonic() < deadline:
            time.sleep(0.01)
        windows = [log.run_window(run_id) for run_id in run_ids[1:]]
    finally:
        worker.shutdown.request_warm(1.0)
        thread.join(10)
        pipeline.close()
    per_run = [{"round_trips": len(w), "commands": sum(len(q.commands) for q in w),
                "run_thread": sum(q.thread == w[0].thread for q in w)} for w in windows]
    print(f"Redis requests of warm run {runs} (ms from its delivering read):")
    print(describe(windows[-1]))
    for key in ("round_trips", "commands", "run_thread"):
        values = [r[key] for r in per_run]
        print(f"  {key}: median {statistics.median(values)}, range {min(values)}-{max(values)}")
    return {"per_run": per_run, "last": [q.label for q in windows[-1]]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200, help="warm runs per row")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--trees", type=Path, nargs="*", default=[ROOT],
                        help="source trees to run serve from (default: this checkout)")
    parser.add_argument("--count", type=int, default=0, metavar="N",
                        help="count the Redis requests of N warm in-process runs first")
    parser.add_argument("--queued", type=int, default=0, metavar="N",
                        help="also time N runs queued at once (per-run time to drain them)")
    parser.add_argument("--queued-rounds", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import redis

    work = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    redis_proc, redis_url = start_redis(work)
    client = redis.Redis.from_url(redis_url, decode_responses=True, protocol=2)
    result: dict[str, Any] = {"runs": args.runs, "trees": [str(t) for t in args.trees]}
    rows: dict[str, Any] = {}
    try:
        if args.count:
            result["count"] = count_requests(redis_url, work, args.count)
        classes = [f"tree-{i}" for i in range(len(args.trees))]
        env = {k: v for k, v in os.environ.items() if not k.startswith("RUNFLOW_")}
        (work / "fake-comfyui").mkdir(exist_ok=True)
        env.update({
            "RUNFLOW_REDIS_URL": redis_url,
            "RUNFLOW_GPU_LADDER": ",".join(["cpu:0"] + [f"{c}:0" for c in classes]),
            "RUNFLOW_CACHE_DIR": str(work / "cache"),
            "RUNFLOW_COMFYUI_DIR": str(work / "fake-comfyui"),
            "RUNFLOW_STORAGE_URL": (work / "outputs").as_uri(), "RUNFLOW_HTTP_PORT": "0",
            "RUNFLOW_IDLE_EXIT_S": "0", "RUNFLOW_LOG_LEVEL": "WARNING",
            "RUNFLOW_RUNNER_ENTRY": FAKE_CHILD, "RUNFLOW_SANDBOX": "none",
            "RUNFLOW_DEVICE": "cpu",
        })
        for i, (tree, cls) in enumerate(zip(args.trees, classes, strict=True)):
            rows[f"serve[{i}]"] = Serve(tree.resolve(), env, cls, client, work / f"serve-{i}.log")
        rows["pipeline"] = InProcess(work)
        times: dict[str, list[float]] = {name: [] for name in rows}
        for _ in range(args.warmup):
            for row in rows.values():
                row.run()
        for _ in range(args.runs):
            order = list(rows)
            random.shuffle(order)
            for name in order:
                times[name].append(rows[name].run())
        base = statistics.median(times["pipeline"])
        print(f"{args.runs} warm runs per row, interleaved; ms")
        print(f"{'row':<12} {'median':>8} {'p10':>8} {'p90':>8} {'- pipeline':>11}")
        summary: dict[str, Any] = {}
        for name, values in times.items():
            med = statistics.median(values)
            summary[name] = {"median_ms": round(med, 3), "p10_ms": round(pct(values, 0.1), 3),
                             "p90_ms": round(pct(values, 0.9), 3),
                             "over_pipeline_ms": round(med - base, 3)}
            print(f"{name:<12} {med:8.2f} {pct(values, 0.1):8.2f} {pct(values, 0.9):8.2f} "
                  f"{med - base:11.2f}")
        for i in range(1, len(args.trees)):
            diffs = [b - a for a, b in zip(times["serve[0]"], times[f"serve[{i}]"], strict=True)]
            paired = statistics.median(diffs)
            summary[f"serve[{i}] - serve[0], paired median"] = round(paired, 3)
            print(f"serve[{i}] - serve[0], median of paired differences: {paired:+.2f} ms")
        result["rows"] = summary
        if args.queued:
            serves = {k: v for k, v in rows.items() if k.startswith("serve")}
            drains: dict[str, list[float]] = {name: [] for name in serves}
            for _ in range(args.queued_rounds):
                order = list(serves)
                random.shuffle(order)
                for name in order:
                    drains[name].append(serves[name].drain(args.queued))
            print(f"{args.queued} runs queued at once, {args.queued_rounds} rounds: ms per run")
            for name, values in drains.items():
                print(f"{name:<12} median {statistics.median(values):6.2f}  "
                      f"range {min(values):.2f}-{max(values):.2f}")
            result["queued"] = {name: {"median_ms_per_run": round(statistics.median(v), 3)}
                                for name, v in drains.items()}
    finally:
        for row in rows.values():
            row.close()
        client.close()
        redis_proc.terminate()
        redis_proc.wait(10)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
