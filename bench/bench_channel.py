"""Micro-benchmark: the channel round trip of one job between the runner and its child.

``Runner.execute`` of a job, from the parent's send to the outcome in its hands, with the
real child's channel code (``runtime.child.main``: its reader thread, the hand-off to the
main thread, ``fit_child_message``; ``runtime.wire``; ``runtime.protocol``'s schema checks
on both sides) and a stand-in for ComfyUI that does no work: it answers every job with one
``NodeStarted`` per node of the graph, in order, then ``Done`` with one output file, the
messages a warm run of graph A (4 nodes) makes. What is measured is what the worker adds
around ComfyUI's own work, none of ComfyUI::

    python bench/bench_channel.py [--jobs 2000] [--nodes 4]

Unsandboxed, no ComfyUI needed. Prints the median, p10 and p90 in microseconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class _NoComfy:
    """Stands in for ``runtime.comfy.ComfyEmbedding``: events and an outcome, no work."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def init(self) -> Any:
        from runflow_worker.runtime import protocol as p

        return p.Ready(comfyui_commit=None, node_count=0, import_failures=(), init_s=0.0,
                       device="cpu")

    def execute(self, job: Any, send: Any) -> Any:
        from runflow_worker.runtime import protocol as p

        for node_id, node in job.graph.items():
            send(p.NodeStarted(job.job_id, node_id, node.get("class_type")))
        return p.Done(job.job_id, (p.OutputFile("4", "RunflowOutputImage", "out_00001_.png",
                                                "result"),), 0.001)

    def interrupt(self, job_id: str) -> None:
        """Nothing runs long enough to interrupt."""

    def collect_idle(self) -> None:
        """Nothing to collect."""


def child_main(conn: Any, config: dict[str, Any]) -> None:
    """The child entry: ``runtime.child.main`` with ComfyUI replaced by ``_NoComfy``."""
    from runflow_worker.runtime import comfy

    comfy.ComfyEmbedding = _NoComfy  # type: ignore[misc, assignment]
    from runflow_worker.runtime import child

    child.main(conn, config)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    from runflow_worker.runtime import protocol as p
    from runflow_worker.runtime.runner import Runner, RunnerConfig

    work = Path(tempfile.mkdtemp(prefix="bench-channel-"))
    graph = {str(n): {"class_type": f"Node{n}", "inputs": {"x": n, "image": [str(n - 1), 0]}}
             for n in range(1, args.nodes + 1)}
    runner = Runner(RunnerConfig(comfyui_dir=str(work), base_dir=str(work / "base"),
                                 custom_node_dirs=(), child_entry="bench.bench_channel:child_main",
                                 startup_timeout_s=600))
    runner.start()
    events = 0

    def on_event(_ev: Any) -> None:
        nonlocal events
        events += 1

    times: list[float] = []
    try:
        for n in range(args.jobs):
            job = p.Execute(f"bench-{n}:1:{n}", graph, str(work / "in"), str(work / "out"),
                            str(work / "tmp"), models_dir=str(work / "models"))
            start = time.perf_counter()
            outcome = runner.execute(job, on_event=on_event, should_interrupt=lambda: False)
            times.append(time.perf_counter() - start)
            assert isinstance(outcome, p.Done), outcome
    finally:
        runner.stop()
    assert events == args.jobs * args.nodes
    times = sorted(times[len(times) // 10:])  # the first tenth warms up
    figures = {"median_us": round(statistics.median(times) * 1e6),
               "p10_us": round(times[len(times) // 10] * 1e6),
               "p90_us": round(times[len(times) * 9 // 10] * 1e6)}
    print(json.dumps(figures) if args.json else
          f"round trip of one job ({args.nodes} node events + outcome): median "
          f"{figures['median_us']} us, p10 {figures['p10_us']} us, p90 {figures['p90_us']} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
