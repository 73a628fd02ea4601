"""Benchmark: an environment switch between two environments already built on the volume,
against the ComfyUI child's start alone.

Two prepared environments (``<cache>/envs/<key>/``, READY, each with its own ComfyUI
checkout cloned from ``RUNFLOW_TEST_COMFYUI``; no custom nodes, no packages of their own)
stand for two deployments' environments. ``Pipeline.execute`` (what ``serve`` does per run,
without Redis) then runs a small graph (EmptyImage -> Runflow output) in environment 1
(its first child start), again in 1 (warm), and then alternately in 2 and 1: each of those
runs switches environment (``Environments.prepare`` finds it built, the warm child is
stopped, the other environment's child started). Reported per kind of run, medians: the
run's billed ``cold_start_seconds`` (what it waited for its child), its ``environment``
phase and its wall time. A last pipeline is made the way ``serve`` boots: ``prestart`` picks
the most recently used environment and the first run in it finds the child there.

    RUNFLOW_TEST_COMFYUI=<checkout> python bench/bench_env_switch.py [--switches 4]
        [--sandbox bwrap|none] [--json OUT] [--no-bytecode]

``RUNFLOW_TEST_SANDBOX_READ_ONLY`` is passed on as ``RUNFLOW_SANDBOX_READ_ONLY`` (paths the
sandboxed child may also read).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runflow_worker.cache.bytecode import compile_environment
from runflow_worker.cache.environments import Environments, EnvironmentSpec
from runflow_worker.cache.git import GitMirrors
from runflow_worker.run.contract import RunStatus, parse_message
from runflow_worker.run.pipeline import Pipeline, PipelineConfig, StopReason
from runflow_worker.run.storage import LocalStorage

ORIGINS = ("https://git.example/one/ComfyUI", "https://git.example/two/ComfyUI")


class _Control:
    def stop_reason(self) -> StopReason | None:
        return None

    def admit(self) -> None:
        pass

    def emit(self, kind: str, data: dict[str, Any]) -> None:
        pass


def _git(*args: str, cwd: Path | None = None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True, timeout=300).stdout.strip()


def build_environments(comfy: Path, envs_root: Path, *,
                       bytecode: bool = True) -> tuple[str, list[str]]:
    """Two READY environments (one per origin) of ``comfy``'s commit; (commit, their keys).
    ``bytecode``: compiled as a build compiles them (``cache.bytecode``); without it, as
    builds left them before that step."""
    commit = _git("rev-parse", "HEAD", cwd=comfy)
    keys = []
    for origin in ORIGINS:
        key = EnvironmentSpec(origin, commit).key
        env_dir = envs_root / key
        env_dir.mkdir(parents=True)
        _git("clone", "--quiet", "--shared", "--no-checkout", str(comfy),
             str(env_dir / "ComfyUI"))
        _git("checkout", "--quiet", commit, cwd=env_dir / "ComfyUI")
        (env_dir / "python").mkdir()
        if bytecode:
            compile_environment(env_dir, sys.executable, wrap=lambda args, env: args)
        (env_dir / "READY").write_text("")
        keys.append(key)
    return commit, keys


def workflow(origin: str, commit: str) -> dict[str, Any]:
    """A small graph pinned to the environment of ``origin``."""
    return {
        "owner": "bench", "slug": "switch", "version": "1",
        "environment": {"comfyui": {"origin": origin, "commit": commit}},
        "workflow_json": {
            "1": {"class_type": "EmptyImage",
                  "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 0}},
            "2": {"class_type": "RunflowOutputImage",
                  "inputs": {"output_id": "result", "value": ["1", 0]}}},
    }


def make_pipeline(work: Path, sandbox: bool) -> Pipeline:
    read_only = tuple(Path(p) for p in
                      os.environ.get("RUNFLOW_TEST_SANDBOX_READ_ONLY", "").split(os.pathsep) if p)
    envs = Environments(work / "cache" / "envs", GitMirrors(work / "cache" / "git", {}))
    config = PipelineConfig(work_dir=work / "cache" / "work", comfyui_dir=None, cpu=True,
                            sandbox=sandbox, sandbox_read_only=read_only,
                            sandbox_hidden=(work / "cache",))
    return Pipeline(config, storage=LocalStorage(work / "outputs"), environments=envs)


def run_once(pipeline: Pipeline, wf: dict[str, Any]) -> dict[str, float]:
    """One run; its billed cold start, environment phase and wall time (seconds)."""
    msg = parse_message({"run_id": uuid.uuid4().hex, "attempt": 1, "workflow": wf,
                         "input": {}, "timeout_s": 600})
    t = time.perf_counter()
    result = pipeline.execute(msg, _Control(), picked_up_monotonic=time.monotonic())
    wall = time.perf_counter() - t
    if result.status is not RunStatus.SUCCEEDED:
        raise RuntimeError(f"run failed: {result.failure}")
    return {"cold_start_s": result.cold_start_s,
            "environment_s": result.timings_ms.get("environment", 0) / 1000, "wall_s": wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--switches", type=int, default=4)
    parser.add_argument("--sandbox", choices=("bwrap", "none"), default="bwrap")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--no-bytecode", action="store_true",
                        help="environments without bytecode (as builds left them before)")
    args = parser.parse_args()
    comfy = os.environ.get("RUNFLOW_TEST_COMFYUI")
    if not comfy:
        sys.exit("set RUNFLOW_TEST_COMFYUI to a ComfyUI checkout")
    sandbox = args.sandbox == "bwrap"
    rows: dict[str, list[dict[str, float]]] = {"first_start": [], "warm": [], "switch": [],
                                               "prestarted_first_run": []}
    with tempfile.TemporaryDirectory(prefix="bench-switch-") as tmp:
        work = Path(tmp)
        commit, _keys = build_environments(Path(comfy), work / "cache" / "envs",
                                          bytecode=not args.no_bytecode)
        wfs = [workflow(origin, commit) for origin in ORIGINS]
        pipeline = make_pipeline(work, sandbox)
        try:
            rows["first_start"].append(run_once(pipeline, wfs[0]))
            rows["warm"].append(run_once(pipeline, wfs[0]))
            for n in range(args.switches):
                rows["switch"].append(run_once(pipeline, wfs[(n + 1) % 2]))
                print(f"switch {n + 1}: {rows['switch'][-1]}", file=sys.stderr)
        finally:
            pipeline.close()
        # As serve boots: the child of the most recently used environment starts at once.
        pipeline = make_pipeline(work, sandbox)
        try:
            starting = pipeline.prestart()
            if starting is None or not starting.result(timeout=600):
                raise RuntimeError("the pre-start did not start a child")
            rows["prestarted_first_run"].append(run_once(pipeline, wfs[args.switches % 2]))
        finally:
            pipeline.close()
    result: dict[str, Any] = {"sandbox": args.sandbox, "switches": args.switches}
    for name, values in rows.items():
        result[name] = {key: round(statistics.median(v[key] for v in values), 3)
                        for key in ("cold_start_s", "environment_s", "wall_s")}
        result[name]["all"] = values
    print(json.dumps({k: v for k, v in result.items()}, indent=2, default=str))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
