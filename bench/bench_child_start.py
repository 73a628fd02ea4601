"""Benchmark: the ComfyUI child's start, against bare ComfyUI's import and initialisation.

What a cold start of the worker waits for is mostly its child's start: a fresh interpreter
importing and initialising ComfyUI (``runtime.comfy.ComfyEmbedding.init``). This times that
part alone, without Redis, the daemon or the worker's own start, for one or more source
trees (two commits: ``git worktree add /tmp/before <commit>``) beside bare ComfyUI:

- **bare**: ``bench/bare_comfyui.py`` launched to its ``ready`` line (interpreter start,
  ComfyUI's import, ``init_extra_nodes`` without custom or API nodes), then one graph;
- **TREE**: a driver process importing that tree's ``runtime.runner`` (outside the timer)
  times ``Runner.start()`` (spawn to ``Ready``: interpreter start, boot, ComfyUI's import
  and initialisation, ComfyUI's own ``custom_nodes/`` and the project's node pack), then
  one job of the same graph.

The graph: EmptyImage -> ImageInvert -> SaveImage (built-in nodes only; a graph naming
more node classes may load more at its first run). The rows alternate in a new random
order each round, so the load of a shared machine hits them alike. Real ComfyUI
(``RUNFLOW_TEST_COMFYUI``); ``--sandbox bwrap`` runs the tree's child in the sandbox
(``RUNFLOW_TEST_SANDBOX_READ_ONLY``: extra read-only paths, as in the tests), CPU::

    RUNFLOW_TEST_COMFYUI=<checkout> python bench/bench_child_start.py [TREE ...]
        [--rounds 5] [--sandbox none|bwrap]

Without a TREE, this checkout is the one tree.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

GRAPH = {"1": {"class_type": "EmptyImage",
               "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 0}},
         "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
         "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0],
                                                     "filename_prefix": "bench"}}}

# Runs in a fresh interpreter with PYTHONPATH=<tree>: times that tree's child start.
_DRIVER = r"""
import json, os, sys, time
from pathlib import Path
from runflow_worker.runtime import protocol as p
from runflow_worker.runtime.runner import Runner, RunnerConfig
from runflow_worker.runtime.sandbox import SandboxPlan
comfy, work, sandboxed, read_only, graph = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "1", \
    [x for x in sys.argv[4].split(",") if x], json.loads(sys.argv[5])
root = work / "child"
for d in ("in", "out", "tmp", "child"):
    (work / d).mkdir(parents=True, exist_ok=True)
plan = SandboxPlan(read_only=tuple(read_only), writable=(str(root),), fresh=(str(root),),
                   chdir=str(root)) if sandboxed else None
runner = Runner(RunnerConfig(comfyui_dir=comfy, base_dir=str(root / "base"), cpu=True,
                             custom_node_dirs=(os.path.join(comfy, "custom_nodes"),),
                             sandbox=plan, child_entry="runflow_worker.runtime.child:main",
                             startup_timeout_s=600))
t0 = time.perf_counter()
runner.start()
t1 = time.perf_counter()
out = runner.execute(p.Execute("bench:1:1", graph, str(work / "in"), str(work / "out"),
                               str(work / "tmp")))
t2 = time.perf_counter()
runner.stop()
assert isinstance(out, p.Done), out
print(json.dumps({"start_s": t1 - t0, "first_s": t2 - t1, "total_s": t2 - t0}))
"""


def bare_once(comfy: Path, work: Path) -> dict[str, float]:
    """Bare ComfyUI: launch to ready, then the graph; seconds."""
    work.mkdir(parents=True)
    with (work / "stderr.txt").open("w") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "bare_comfyui.py"),
                                 str(comfy), str(work / "base")], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    line = proc.stdout.readline()
    t1 = time.perf_counter()
    if not line:
        proc.wait(60)
        raise RuntimeError(f"bare ComfyUI exited: {(work / 'stderr.txt').read_text()[-2000:]}")
    ready = json.loads(line)
    assert ready.get("ready"), ready
    proc.stdin.write(json.dumps({"graph": GRAPH, "image": "", "name": "unused.png"}) + "\n")
    proc.stdin.flush()
    answer = json.loads(proc.stdout.readline())
    t2 = time.perf_counter()
    proc.stdin.close()
    proc.wait(60)
    assert answer.get("ok"), answer
    return {"start_s": t1 - t0, "first_s": t2 - t1, "total_s": t2 - t0}


def tree_once(tree: Path, comfy: Path, work: Path, sandboxed: bool) -> dict[str, float]:
    """The tree's child: ``Runner.start()``, then the graph; seconds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNFLOW_")}
    env["PYTHONPATH"] = str(tree)
    read_only = os.environ.get("RUNFLOW_TEST_SANDBOX_READ_ONLY", "")
    out = subprocess.run([sys.executable, "-c", _DRIVER, str(comfy), str(work),
                          "1" if sandboxed else "0", read_only, json.dumps(GRAPH)],
                         cwd=tree, env=env, capture_output=True, text=True, timeout=600,
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{tree}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="*", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sandbox", choices=("none", "bwrap"), default="none")
    parser.add_argument("--no-bare", action="store_true", help="leave out the bare row")
    args = parser.parse_args()
    if not os.environ.get("RUNFLOW_TEST_COMFYUI"):
        sys.exit("set RUNFLOW_TEST_COMFYUI to a ComfyUI checkout")
    comfy = Path(os.environ["RUNFLOW_TEST_COMFYUI"]).resolve()
    trees = [t.resolve() for t in (args.trees or [ROOT])]
    rows = ([] if args.no_bare else ["bare"]) + [str(t) for t in trees]
    results: dict[str, list[dict[str, float]]] = {row: [] for row in rows}
    work = Path(tempfile.mkdtemp(prefix="bench-child-"))
    try:
        for n in range(args.rounds):
            order = random.sample(rows, len(rows))
            for row in order:
                where = work / f"{n}-{rows.index(row)}"
                one = (bare_once(comfy, where) if row == "bare" else
                       tree_once(Path(row), comfy, where, args.sandbox == "bwrap"))
                results[row].append(one)
                print(f"round {n}: {row}: start {one['start_s']:.3f} s, first graph "
                      f"{one['first_s'] * 1000:.1f} ms", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({row: {key: round(statistics.median(r[key] for r in runs), 3)
                            for key in ("start_s", "first_s", "total_s")}
                      | {"all_start_s": [round(r["start_s"], 3) for r in runs]}
                      for row, runs in results.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
