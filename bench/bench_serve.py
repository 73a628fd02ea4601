"""Benchmark of ``runflow-worker serve``: warm end-to-end latency, worker overhead, cold start.

What it measures, in one process tree on one machine:

1. **Cold start**: from starting ``runflow-worker serve`` (a fresh process) to the first
   run's terminal record, the run having been enqueued just before the process started.
2. **Warm serve**: ``--runs`` runs (default 30) through the running daemon, each with a
   fresh input image: time from just before the enqueue to the terminal status event
   (read with a blocking ``XREAD``, so no polling delay is added).
3. **Bare**: the same graph and inputs executed by ``Pipeline.execute`` in this process
   (same ComfyUI, same input fetch over HTTPS, same local storage), warm, no Redis;
   bare and serve runs alternate, so drift affects both alike.

The difference between 2 and 3 is the cost of the daemon: queue wake-up, records, events,
acks. Inputs are served by a local HTTPS server (a throwaway CA, 127.0.0.1 allowed).

Real ComfyUI: ``RUNFLOW_TEST_COMFYUI=<checkout>`` (graph: ``examples/image-transform``).
Without it, the fake ComfyUI child of the tests runs a toy graph, and the output says so.

    python bench/bench_serve.py [--runs 30] [--json results.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import socket
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

from tests.support.https_server import HTTPSServer, Mode
from worker import keys
from worker.contract import RunStatus, parse_message
from worker.serve_cli import enqueue_message

EXAMPLE = ROOT / "examples" / "image-transform" / "deployed.json"
FAKE_CHILD = "tests.serve.child:main"
COMMIT = "a125cd84b054a57729b5eecab930ca9408719832"


# --------------------------------------------------------------------------- set-up


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    import redis

    port = free_port()
    proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port),
                             "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.RedisError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    client.close()
    return proc, f"redis://127.0.0.1:{port}/0"


def png_bytes(seed: int, size: tuple[int, int] = (256, 192)) -> bytes:
    """A fresh random PNG (different content every run: no cache can help)."""
    from PIL import Image

    rnd = os.urandom(size[0] * size[1] * 3) if seed >= 0 else b""
    img = Image.frombytes("RGB", size, rnd)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def workflow(real: bool) -> dict[str, Any]:
    """The deployed workflow of the benchmark."""
    if real:
        if EXAMPLE.exists():
            return json.loads(EXAMPLE.read_text())
        graph = {
            "1": {"class_type": "RunflowInputImage", "inputs": {"input_id": "image"}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "ImageScale", "inputs": {
                "image": ["2", 0], "upscale_method": "bilinear", "width": 128, "height": 96,
                "crop": "disabled"}},
            "4": {"class_type": "RunflowOutputImage",
                  "inputs": {"output_id": "result", "value": ["3", 0]}},
        }
    else:
        graph = {
            "1": {"class_type": "RunflowInputString", "inputs": {"input_id": "prompt"}},
            "2": {"class_type": "FakeSave", "inputs": {"text": ["1", 0], "output_id": "out"}},
        }
    return {"owner": "bench", "slug": "serve", "version": "1", "workflow_json": graph,
            "environment": {"comfyui": {"origin": "https://github.com/comfyanonymous/ComfyUI",
                                        "commit": COMMIT}}}


class Inputs:
    """Fresh inputs per run: a new image on the HTTPS server (real) or a new string (fake)."""

    def __init__(self, server: HTTPSServer, real: bool) -> None:
        self.server = server
        self.real = real
        self.n = 0

    def next(self) -> dict[str, Any]:
        self.n += 1
        if not self.real:
            return {"prompt": f"run {self.n} {uuid.uuid4().hex}"}
        path = f"/img-{self.n}-{uuid.uuid4().hex[:8]}.png"
        self.server.add(path, png_bytes(self.n), mode=Mode.GOOD, content_type="image/png")
        return {"image": self.server.url(path)}


def message(wf: dict[str, Any], inputs: dict[str, Any]) -> Any:
    return parse_message({"run_id": uuid.uuid4().hex, "attempt": 1, "workflow": wf,
                          "input": inputs, "timeout_s": 600})


# --------------------------------------------------------------------------- measures


def wait_terminal(client: Any, run_id: str, cursor: str, timeout_s: float = 600) -> str:
    """Block on the events stream until the run's terminal status event; return its id."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reply = client.xread({keys.EVENTS_STREAM: cursor}, count=100, block=1000)
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                cursor = entry_id
                if fields.get("run_id") == run_id and fields.get("type") == "status" and (
                        fields.get("status") in ("succeeded", "failed", "canceled")):
                    return cursor
    raise TimeoutError(f"run {run_id} did not finish")


def events_tail(client: Any) -> str:
    last = client.xrevrange(keys.EVENTS_STREAM, count=1)
    return last[0][0] if last else "0-0"


def check_record(client: Any, run_id: str) -> dict[str, Any]:
    rec = json.loads(client.get(keys.run_record(run_id)))
    if rec["status"] != RunStatus.SUCCEEDED.value:
        raise RuntimeError(f"run {run_id} {rec['status']}: {rec.get('error')}")
    return rec


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary(values_ms: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(values_ms), 2),
            "p90_ms": round(pct(values_ms, 0.9), 2),
            "min_ms": round(min(values_ms), 2), "max_ms": round(max(values_ms), 2)}


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    redis_version = subprocess.run([shutil.which("redis-server") or "redis-server",
                                    "--version"], capture_output=True, text=True, check=False).stdout
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "system": f"{platform.system()} {platform.release()}",
            "redis": redis_version.split()[2].removeprefix("v=") if redis_version else None}
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()

    import redis

    comfy = os.environ.get("RUNFLOW_TEST_COMFYUI")
    real = bool(comfy)
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    comfy_dir = Path(comfy) if comfy else work / "fake-comfyui"
    comfy_dir.mkdir(exist_ok=True)
    redis_proc, redis_url = start_redis(work)
    server = HTTPSServer().start()
    ca = server.write_ca_bundle(work / "ca.pem")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNFLOW_")}
    env.update({
        "PYTHONPATH": str(ROOT), "RUNFLOW_REDIS_URL": redis_url, "RUNFLOW_GPU_CLASS": "cpu",
        "RUNFLOW_CACHE_DIR": str(work / "cache"), "RUNFLOW_COMFYUI_DIR": str(comfy_dir),
        "RUNFLOW_STORAGE_URL": (work / "outputs").as_uri(), "RUNFLOW_HTTP_PORT": "0",
        "RUNFLOW_IDLE_EXIT_S": "0", "RUNFLOW_URL_ALLOW": "127.0.0.1/32",
        "RUNFLOW_CA_BUNDLE": str(ca), "RUNFLOW_LOG_LEVEL": "WARNING",
    })
    if not real:
        env["RUNFLOW_RUNNER_ENTRY"] = FAKE_CHILD
        print("RUNFLOW_TEST_COMFYUI is not set: using the FAKE ComfyUI child and a toy graph",
              file=sys.stderr)
    wf = workflow(real)
    inputs = Inputs(server, real)
    client = redis.Redis.from_url(redis_url, decode_responses=True, protocol=2)
    proc = None
    try:
        # Cold start: enqueue, then start the process; stop at the first terminal record.
        first = message(wf, inputs.next())
        cursor = events_tail(client)
        enqueue_message(client, first, "cpu", events_maxlen=100_000)
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "serve"], cwd=ROOT,
                                env=env)
        cursor = wait_terminal(client, first.run_id, cursor)
        cold_s = time.perf_counter() - t0
        cold_rec = check_record(client, first.run_id)

        # Warm: serve and bare runs alternate, so drift (thermal, page cache, noisy
        # neighbours) hits both the same way.
        bare = BareRunner(env)
        try:
            bare.run(wf, inputs.next())  # its first run starts its ComfyUI child
            serve_ms: list[float] = []
            phases: list[dict[str, int]] = []
            bare_ms: list[float] = []
            bare_phases: list[dict[str, int]] = []
            for _ in range(args.runs):
                msg = message(wf, inputs.next())
                t = time.perf_counter()
                enqueue_message(client, msg, "cpu", events_maxlen=100_000)
                cursor = wait_terminal(client, msg.run_id, cursor)
                serve_ms.append((time.perf_counter() - t) * 1000)
                phases.append(check_record(client, msg.run_id)["timings_ms"])
                elapsed_ms, timings = bare.run(wf, inputs.next())
                bare_ms.append(elapsed_ms)
                bare_phases.append(timings)
        finally:
            bare.close()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
        client.close()
        server.close()
        redis_proc.kill()
        redis_proc.wait()
        shutil.rmtree(work, ignore_errors=True)

    inside_ms = [float(sum(v for k, v in ph.items() if k != "queue")) for ph in phases]
    result = {
        "comfyui": "real" if real else "fake child (RUNFLOW_TEST_COMFYUI unset)",
        "graph": str(EXAMPLE.relative_to(ROOT)) if real and EXAMPLE.exists() else "inline",
        "runs": args.runs, "machine": machine(),
        "cold_start_s": round(cold_s, 3),
        "cold_record_timings_ms": cold_rec["timings_ms"],
        "cold_start_seconds_billed": cold_rec["billing"]["attempts"][0]["cold_start_seconds"],
        "serve_end_to_end": summary(serve_ms),
        "bare_pipeline": summary(bare_ms),
        "overhead_median_ms": round(statistics.median(serve_ms) - statistics.median(bare_ms),
                                    2),
        "serve_minus_recorded_phases_median_ms": round(statistics.median(
            [s - i for s, i in zip(serve_ms, inside_ms)]), 2),
        "serve_phase_medians_ms": {k: statistics.median(ph.get(k, 0) for ph in phases)
                                   for k in phases[0]},
        "bare_phase_medians_ms": {k: statistics.median(ph.get(k, 0) for ph in bare_phases)
                                  for k in bare_phases[0]},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


class BareRunner:
    """The same graph through ``Pipeline.execute`` in this process: no Redis, no daemon."""

    def __init__(self, env: dict[str, str]) -> None:
        from worker.assembly import build_pipeline
        from worker.settings import Settings

        saved = dict(os.environ)
        os.environ.update({k: v for k, v in env.items() if k.startswith("RUNFLOW_")})
        try:
            settings = Settings()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        self.pipeline = build_pipeline(settings, cpu=True)

    def run(self, wf: dict[str, Any], inputs: dict[str, Any]) -> tuple[float, dict[str, int]]:
        """Run once; return the wall time in ms and the phase timings."""
        from worker.pipeline import StopReason

        class Control:
            def stop_reason(self) -> StopReason | None:
                return None

            def emit(self, kind: str, data: dict[str, Any]) -> None:
                pass

        msg = message(wf, inputs)
        t = time.perf_counter()
        result = self.pipeline.execute(msg, Control(), picked_up_monotonic=time.monotonic())
        elapsed_ms = (time.perf_counter() - t) * 1000
        if result.status is not RunStatus.SUCCEEDED:
            raise RuntimeError(f"bare run failed: {result.failure}")
        return elapsed_ms, result.timings_ms

    def close(self) -> None:
        """Stop its ComfyUI child."""
        self.pipeline.close()


if __name__ == "__main__":
    sys.exit(main())
