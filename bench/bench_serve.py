"""Benchmark of ``runflow-worker serve`` against bare in-process ComfyUI.

Everything below runs side by side in one invocation on one machine, the warm runs of the
rows interleaved (a new random order each round) so drift (thermal, page cache, noisy
neighbours) hits every row alike and no row always follows the same other row:

- **bare**: ComfyUI in a plain process (``bench/bare_comfyui.py``): ``validate_prompt`` +
  ``PromptExecutor.execute`` of the same graph with ``LoadImage``/``SaveImage``, the
  caller's image written into its input folder. The baseline: what ComfyUI itself costs.
- **serve**: ``runflow-worker serve`` with Redis and local storage: time from just before
  the enqueue to the terminal status event (a blocking ``XREAD``: no polling delay added);
  the image is an https URL on a local TLS server, as a caller sends it.
- **pipeline**: the project's ``Pipeline.execute`` in this process, what ``runflow-worker
  run`` does per run (no Redis, no daemon): same graph, same https input, same storage.

Graphs: A = image -> invert -> scale -> output; B = image -> spandrel x2 upscaler (random
weights made locally, ``examples/upscale-x2``) -> output; a fresh 64x48 PNG per run.

Cold starts: bare launch to its first result; ``serve`` launched with a run already queued
to that run's terminal record; ``runflow-worker run`` launched to its exit.

``--sandbox`` chooses ``RUNFLOW_SANDBOX`` for the worker's rows (``bwrap`` or ``none``);
``--sandbox both`` runs two serve daemons, one of each, on two queues, alternating, and
reports both (the cost of the sandbox, measured in the same run).

``--baseline-tree DIR`` adds one more serve row per sandbox mode from another checkout of
this project (``git worktree add DIR <rev>``), its daemon on a queue of its own, its runs
interleaved with the others: a change measured against the code before it in one run.
``paired_vs_baseline_ms`` is the median of the per-round differences (each round's run of a
row minus its baseline's in the same round) with a 95% bootstrap interval.

Before each row's turn the benchmark waits until nothing else has been runnable on the
machine for 1 ms (``bench/quiesce.py``): what the row before left running once its own
window closed (bare ComfyUI's OpenMP threads spin on for 5-7 ms, a daemon tidies its run's
directories) never lands on the next row's run, and a change that moves work after its own
window shows as what it is. ``median_ms_by_previous_row`` gives each row's median by the row
run just before it: about equal when nothing reaches across. ``--no-settle`` starts each run
as soon as the last returned (the figures before this wait); ``--gap-ms N`` idles N ms more
before every warm run (a machine gone cold in between). ``--block N`` runs each row N
times back to back in each round (the rows' order still new every round) and counts all but
the first run of a block, which follows another row's: a busy worker's conditions, where
what a run leaves behind (bare ComfyUI's spinning OpenMP threads, a daemon's tidying) lands
on the same row's next run; ``--runs`` counts rounds, so a row gets ``runs * (N - 1)``
runs, paired with its baseline's by position.

Real ComfyUI: ``RUNFLOW_TEST_COMFYUI=<checkout>`` (and ``RUNFLOW_TEST_SANDBOX_READ_ONLY``,
passed on as ``RUNFLOW_SANDBOX_READ_ONLY``, where the machine's Python loads libraries from
outside its installation). Without it, the fake ComfyUI child of
the tests runs a toy graph, there is no bare row, and the output says so.

    python bench/bench_serve.py [--runs 30] [--graphs A,B] [--sandbox none] [--json out.json]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.quiesce import Quiesce
from bench.stats import graph_summary
from runflow_worker.run.contract import RunStatus, parse_message
from runflow_worker.serve import keys
from runflow_worker.serve.submit import enqueue_message
from tests.fakes import SERVE_CHILD
from tests.support.https_server import HTTPSServer, Mode

COMMIT = "a125cd84b054a57729b5eecab930ca9408719832"
UPSCALER = "compact-x2.safetensors"


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


def png_bytes(size: tuple[int, int] = (64, 48)) -> bytes:
    """A fresh random PNG (different content every run: no cache can help)."""
    from PIL import Image

    img = Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def upscaler_weights(mirror: Path) -> str:
    """Write graph B's upscaler weights into ``mirror`` (named by digest); return it."""
    sys.path.insert(0, str(ROOT / "examples" / "upscale-x2"))
    from make_weights import write_weights

    from runflow_worker.cache.hashing import sha256_file

    tmp = write_weights(mirror / "upscaler.tmp")
    digest = sha256_file(tmp)
    tmp.rename(mirror / digest)
    return digest


# Graph name -> (deployed graph with Runflow nodes, bare graph with LoadImage/SaveImage).
def graphs(upscaler_sha: str | None) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """The benchmark's graphs, as deployed workflows and as bare ComfyUI prompts."""
    env = {"comfyui": {"origin": "https://github.com/comfyanonymous/ComfyUI", "commit": COMMIT}}
    scale = {"upscale_method": "bilinear", "width": 128, "height": 96, "crop": "disabled"}
    a_core = {"2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
              "3": {"class_type": "ImageScale", "inputs": {"image": ["2", 0], **scale}}}
    b_core = {"2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": UPSCALER}},
              "3": {"class_type": "ImageUpscaleWithModel",
                    "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]}}}
    out: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    for name, core in (("A", a_core), ("B", b_core)):
        if name == "B" and upscaler_sha is None:
            continue
        deployed = {
            "owner": "bench", "slug": f"graph-{name}", "version": "1", "environment": env,
            "workflow_json": {
                "1": {"class_type": "RunflowInputImage", "inputs": {"input_id": "image"}},
                **core,
                "4": {"class_type": "RunflowOutputImage",
                      "inputs": {"output_id": "result", "value": ["3", 0]}}},
            "inputs": [{"input_id": "image", "type": "IMAGE", "required": True}],
            "models": ({f"upscale_models/{UPSCALER}": {"sha256": upscaler_sha}}
                       if name == "B" else {}),
        }
        bare = {"1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}}, **core,
                "4": {"class_type": "SaveImage",
                      "inputs": {"images": ["3", 0], "filename_prefix": f"bare-{name}"}}}
        out[name] = (deployed, bare)
    return out


def fake_workflow() -> dict[str, Any]:
    """The toy graph the fake child runs when no real ComfyUI is given."""
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
        self.server.add(path, png_bytes(), mode=Mode.GOOD, content_type="image/png")
        return {"image": self.server.url(path)}


def message(wf: dict[str, Any], inputs: dict[str, Any]) -> Any:
    return parse_message({"run_id": uuid.uuid4().hex, "attempt": 1, "workflow": wf,
                          "input": inputs, "timeout_s": 600})


# --------------------------------------------------------------------------- measures


def wait_terminal(client: Any, run_id: str, cursor: str, timeout_s: float = 900,
                  proc: subprocess.Popen[bytes] | None = None) -> str:
    """Block on the events stream until the run's terminal status event; return its id.
    ``proc``: the daemon, whose exit ends the wait at once (a daemon that cannot start
    would otherwise leave the benchmark waiting ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with status {proc.returncode} before run "
                               f"{run_id} ended (its log is above)")
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


# --------------------------------------------------------------------------- rows


class Bare:
    """Bare ComfyUI in its own plain process (``bench/bare_comfyui.py``)."""

    def __init__(self, comfy: Path, base: Path, model_dir: Path) -> None:
        t = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "bare_comfyui.py"), str(comfy), str(base),
             "--models", f"upscale_models={model_dir}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.ready = json.loads(self.proc.stdout.readline())
        self.launch_s = time.perf_counter() - t
        self.n = 0

    def run(self, bare_graph: dict[str, Any]) -> tuple[float, dict[str, float]]:
        """One run with a fresh image; return (total ms, phases)."""
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.n += 1
        name = f"in-{self.n}.png"
        graph = json.loads(json.dumps(bare_graph))
        graph["1"]["inputs"]["image"] = name
        job = {"graph": graph, "name": name, "image": base64.b64encode(png_bytes()).decode()}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline())
        if not answer["ok"]:
            raise RuntimeError(f"bare run failed: {answer}")
        return answer["ms"]["total"], answer["ms"]

    def first_result_s(self, bare_graph: dict[str, Any]) -> float:
        """Launch to first result: the launch plus the first run."""
        ms, _ = self.run(bare_graph)
        return self.launch_s + ms / 1000

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(60)


class Serve:
    """One ``runflow-worker serve`` daemon on its own queue (GPU class)."""

    def __init__(self, env: dict[str, str], gpu_class: str, client: Any,
                 root: Path = ROOT) -> None:
        self.root = root
        self.env = {**env, "RUNFLOW_GPU_CLASS": gpu_class, "PYTHONPATH": str(root)}
        self.gpu_class = gpu_class
        self.client = client
        self.proc: subprocess.Popen[bytes] | None = None
        self.cursor = events_tail(client)

    def cold(self, wf: dict[str, Any], inputs: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        """Enqueue a run, then launch the daemon; seconds to the run's terminal record."""
        msg = message(wf, inputs)
        self.cursor = events_tail(self.client)
        enqueue_message(self.client, msg, self.gpu_class, events_maxlen=100_000)
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "runflow_worker.cli.main", "serve"],
                                     cwd=self.root,
                                     env=self.env)
        self.cursor = wait_terminal(self.client, msg.run_id, self.cursor, proc=self.proc)
        return time.perf_counter() - t0, check_record(self.client, msg.run_id)

    def run(self, wf: dict[str, Any], inputs: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        """Submit to terminal event, in ms; and the record's phases."""
        msg = message(wf, inputs)
        t = time.perf_counter()
        enqueue_message(self.client, msg, self.gpu_class, events_maxlen=100_000)
        self.cursor = wait_terminal(self.client, msg.run_id, self.cursor, proc=self.proc)
        elapsed_ms = (time.perf_counter() - t) * 1000
        return elapsed_ms, check_record(self.client, msg.run_id)["timings_ms"]

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(60)


class InProcess:
    """The same graph through ``Pipeline.execute`` in this process: no Redis, no daemon."""

    def __init__(self, env: dict[str, str]) -> None:
        from runflow_worker.run.assembly import build_pipeline
        from runflow_worker.settings import Settings

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
        from runflow_worker.run.pipeline import StopReason

        class Control:
            def stop_reason(self) -> StopReason | None:
                return None

            def admit(self) -> None:
                pass

            def emit(self, kind: str, data: dict[str, Any]) -> None:
                pass

        msg = message(wf, inputs)
        t = time.perf_counter()
        result = self.pipeline.execute(msg, Control(), picked_up_monotonic=time.monotonic())
        elapsed_ms = (time.perf_counter() - t) * 1000
        self.pipeline.tidy()  # as the daemon does once the outcome is written (untimed)
        if result.status is not RunStatus.SUCCEEDED:
            raise RuntimeError(f"pipeline run failed: {result.failure}")
        return elapsed_ms, result.timings_ms

    def close(self) -> None:
        """Stop its ComfyUI child."""
        self.pipeline.close()


def run_cli_cold(env: dict[str, str], wf: dict[str, Any], inputs: dict[str, Any],
                 work: Path) -> float:
    """``runflow-worker run`` from launch to exit (a fresh process, a fresh ComfyUI)."""
    deployed = work / f"deployed-{uuid.uuid4().hex[:6]}.json"
    deployed.write_text(json.dumps(wf))
    args = [sys.executable, "-m", "runflow_worker.cli.main", "run", str(deployed), "--out",
            str(work / "run-out")]
    for key, value in inputs.items():
        args += ["--input", f"{key}={value}"]
    t = time.perf_counter()
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - t
    if done.returncode != 0:
        raise RuntimeError(f"runflow-worker run failed: {done.stdout[-2000:]} "
                           f"{done.stderr[-2000:]}")
    return elapsed


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--graphs", default="A,B", help="comma-separated: A, B")
    parser.add_argument("--sandbox", choices=("bwrap", "none", "both"), default=None,
                        help="RUNFLOW_SANDBOX of the worker's rows (default: as set)")
    parser.add_argument("--cold-repeats", type=int, default=1,
                        help="cold starts of each kind, alternating (medians reported)")
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--baseline-tree", type=Path,
                        help="another checkout of this project (e.g. `git worktree add`): "
                             "one more serve row, '<label>@baseline', from that code, on "
                             "its own queue, interleaved with the others (a paired A/B)")
    parser.add_argument("--gap-ms", type=float, default=0.0,
                        help="idle time before each warm run, on top of the wait for an "
                             "idle machine (a machine gone cold in between)")
    parser.add_argument("--no-settle", action="store_true",
                        help="start each row's run as soon as the last row's returned, "
                             "whatever that row left running (bench/quiesce.py)")
    parser.add_argument("--block", type=int, default=1,
                        help="warm runs of a row back to back in each round, all but the "
                             "first counted (default 1: rows interleaved run by run)")
    args = parser.parse_args()
    if args.block < 1:
        parser.error("--block must be at least 1")

    import redis

    comfy = os.environ.get("RUNFLOW_TEST_COMFYUI")
    real = bool(comfy)
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    comfy_dir = Path(comfy) if comfy else work / "fake-comfyui"
    comfy_dir.mkdir(exist_ok=True)
    mirror = work / "mirror"
    mirror.mkdir()
    upscaler_sha = upscaler_weights(mirror) if real else None
    bare_models = work / "bare-models"
    bare_models.mkdir()
    if upscaler_sha:
        shutil.copy(mirror / upscaler_sha, bare_models / UPSCALER)
    redis_proc, redis_url = start_redis(work)
    server = HTTPSServer().start()
    ca = server.write_ca_bundle(work / "ca.pem")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNFLOW_")}
    env.update({
        "PYTHONPATH": str(ROOT), "RUNFLOW_REDIS_URL": redis_url,
        "RUNFLOW_GPU_LADDER": "cpu:0,cpu-b:0,cpu-c:0,cpu-d:0",
        "RUNFLOW_CACHE_DIR": str(work / "cache"), "RUNFLOW_COMFYUI_DIR": str(comfy_dir),
        "RUNFLOW_STORAGE_URL": (work / "outputs").as_uri(), "RUNFLOW_HTTP_PORT": "0",
        "RUNFLOW_IDLE_EXIT_S": "0", "RUNFLOW_URL_ALLOW": "127.0.0.1/32",
        "RUNFLOW_CA_BUNDLE": str(ca), "RUNFLOW_LOG_LEVEL": "WARNING",
        "RUNFLOW_MODEL_MIRRORS": str(mirror), "RUNFLOW_GPU_CLASS": "cpu",
        "RUNFLOW_DEVICE": "cpu",  # ComfyUI on the CPU, said explicitly
    })
    if os.environ.get("RUNFLOW_TEST_SANDBOX_READ_ONLY"):  # what this machine's Python loads
        env["RUNFLOW_SANDBOX_READ_ONLY"] = os.environ["RUNFLOW_TEST_SANDBOX_READ_ONLY"]
    sandboxes = {"both": ["bwrap", "none"], None: [None]}.get(args.sandbox, [args.sandbox])
    if not real:
        env["RUNFLOW_RUNNER_ENTRY"] = SERVE_CHILD
        print("RUNFLOW_TEST_COMFYUI is not set: using the FAKE ComfyUI child and a toy graph "
              "(no bare row)", file=sys.stderr)
    wanted = [g.strip().upper() for g in args.graphs.split(",") if g.strip()]
    all_graphs = graphs(upscaler_sha) if real else {"fake": (fake_workflow(), {})}
    chosen = {k: v for k, v in all_graphs.items() if not real or k in wanted}
    inputs = Inputs(server, real)
    client = redis.Redis.from_url(redis_url, decode_responses=True, protocol=2)
    result: dict[str, Any] = {
        "comfyui": "real" if real else "fake child (RUNFLOW_TEST_COMFYUI unset)",
        "runs": args.runs, "block": args.block, "gap_ms": args.gap_ms, "machine": machine(),
        "graphs": {}, "cold_start": {}}
    daemons: dict[str, Serve] = {}
    settle = None if args.no_settle else Quiesce()
    bare: Bare | None = None
    inproc: InProcess | None = None
    try:
        first_wf, first_bare = next(iter(chosen.values()))
        colds: dict[str, list[float]] = {}
        # Cold starts first, one at a time, on an otherwise idle machine.
        if real:
            bare = Bare(comfy_dir, work / "bare-base", bare_models)
            colds["bare_launch_to_first_result_s"] = [bare.first_result_s(first_bare)]
            result["cold_start"]["bare_comfyui_init_s"] = bare.ready["init_s"]
        # Cold starts repeat ``--cold-repeats`` times, the modes alternating; each repeat
        # but the last stops its daemon (the last ones serve the warm runs).
        for repeat in range(args.cold_repeats):
            for i, sandbox in enumerate(sandboxes):
                denv = dict(env)
                if sandbox is not None:
                    denv["RUNFLOW_SANDBOX"] = sandbox
                label = f"serve[{sandbox}]" if sandbox else "serve"
                trees = [(label, ROOT, ("cpu", "cpu-b")[i])]
                if args.baseline_tree:
                    trees.append((f"{label}@baseline", args.baseline_tree.resolve(),
                                  ("cpu-c", "cpu-d")[i]))
                for tlabel, root, gpu_class in trees:
                    if tlabel in daemons:
                        daemons.pop(tlabel).close()
                    daemon = daemons[tlabel] = Serve(denv, gpu_class, client, root)
                    cold_s, rec = daemon.cold(first_wf, inputs.next())
                    colds.setdefault(f"{tlabel}_launch_to_first_record_s", []).append(cold_s)
                    colds.setdefault(f"{tlabel}_cold_start_seconds_billed", []).append(
                        rec["billing"]["attempts"][0]["cold_start_seconds"])
                    result["cold_start"][f"{tlabel}_record_timings_ms"] = rec["timings_ms"]
                colds.setdefault(f"run_cli[{sandbox or 'default'}]_launch_to_exit_s",
                                 []).append(run_cli_cold(denv, first_wf, inputs.next(), work))
            if real and repeat:
                bare.close()
                bare = Bare(comfy_dir, work / "bare-base", bare_models)
                colds.setdefault("bare_launch_to_first_result_s", []).append(
                    bare.first_result_s(first_bare))
        for key, values in colds.items():
            result["cold_start"][key] = round(statistics.median(values), 3)
            result["cold_start"][key + "_all"] = [round(v, 3) for v in values]
        inproc = InProcess({**env, **({"RUNFLOW_SANDBOX": sandboxes[0]} if sandboxes[0]
                                      else {})})
        for name, (wf, bare_graph) in chosen.items():
            # Warm-up of every row for this graph (model loads, first-run caches).
            for daemon in daemons.values():
                daemon.run(wf, inputs.next())
            inproc.run(wf, inputs.next())
            if bare is not None:
                bare.run(bare_graph)
            rows: dict[str, list[float]] = {label: [] for label in daemons}
            rows["pipeline"] = []
            phases: dict[str, list[dict[str, float]]] = {label: [] for label in rows}
            if bare is not None:
                rows["bare"], phases["bare"] = [], []
            steps: list[tuple[str, Callable[[], tuple[float, dict[str, Any]]]]] = [
                (label, lambda d=daemon: d.run(wf, inputs.next()))
                for label, daemon in daemons.items()]
            steps.append(("pipeline", lambda: inproc.run(wf, inputs.next())))
            if bare is not None:
                steps.append(("bare", lambda: bare.run(bare_graph)))
            after: dict[str, dict[str, list[float]]] = {label: {} for label in rows}
            previous = "warm-up"
            for _ in range(args.runs):
                # A new order every round: no row always follows the same other row.
                for label, step in random.sample(steps, len(steps)):
                    for k in range(args.block):
                        if args.gap_ms:
                            time.sleep(args.gap_ms / 1000)  # the last row's after-work ends
                        if settle is not None and k == 0:
                            settle.wait()  # what the last row left running has ended
                        ms, ph = step()
                        if k or args.block == 1:  # a block's first run follows another row
                            rows[label].append(ms)
                            phases[label].append(ph)
                            after[label].setdefault(previous, []).append(ms)
                        previous = label
            result["graphs"][name] = graph_summary(rows, phases, after)
        if settle is not None:
            result["settle"] = settle.summary()
    finally:
        for daemon in daemons.values():
            daemon.close()
        if inproc is not None:
            inproc.close()
        if bare is not None:
            bare.close()
        client.close()
        server.close()
        redis_proc.kill()
        redis_proc.wait()
        shutil.rmtree(work, ignore_errors=True)

    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
