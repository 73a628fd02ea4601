"""Micro-benchmarks of the worker's own per-run pieces around ComfyUI, in this process.

- ``inputs``: ``run.inputs.materialise_inputs`` of one IMAGE input, a fresh 64x48 PNG on a
  local TLS server (``tests.support.https_server``, in a process of its own), through the
  input fetcher the pipeline uses (``run.assembly.make_input_fetcher``: the URL policy, the
  kept-alive connection, the file written and hashed, the image checked, renamed);
- ``upload``: ``run.outputs.store_outputs`` of one small PNG into ``LocalStorage`` (opened
  without following links, hashed, copied, renamed, its URL);
- ``policy``: ``URLPolicy.check_url`` of a new address-literal https URL, twice, as each
  input pays it (``cache.sources`` refuses early, then the fetcher checks its request).

Each piece runs ``--runs`` times after a warm-up; medians, p10 and p90 in microseconds. No
ComfyUI, no Redis::

    python bench/bench_warm_parts.py [--runs 1000] [--only inputs,upload,policy] [--json]
        [--dir DIR]

``--dir`` puts the files there (e.g. a tmpfs, to keep the disk's journal out of the
figures when comparing the worker's own code).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from PIL import Image

from runflow_worker.run.contract import InputDef, InputType


def png_bytes(n: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (n % 256, 90, 160)).save(buf, "PNG")
    return buf.getvalue()


def figures(times: list[float]) -> dict[str, float]:
    times = sorted(times)
    return {"median_us": round(statistics.median(times) * 1e6, 1),
            "p10_us": round(times[len(times) // 10] * 1e6, 1),
            "p90_us": round(times[len(times) * 9 // 10] * 1e6, 1)}


def timed(runs: int, once: Callable[[int], None]) -> dict[str, float]:
    for n in range(max(runs // 10, 5)):
        once(-n - 1)
    times = []
    for n in range(runs):
        start = time.perf_counter()
        once(n)
        times.append(time.perf_counter() - start)
    return figures(times)


def _serve_images(conn: Any, count: int, ca_path: str) -> None:
    """The TLS server, in a process of its own (so it takes no turn on this one's GIL):
    ``count`` PNGs at ``/in-<n>.png`` (n from ``-count`` on); its base URL sent on ``conn``,
    serving until ``conn`` says stop."""
    from tests.support.https_server import HTTPSServer

    with HTTPSServer() as server:
        for n in range(-count, count):
            server.add(f"/in-{n}.png", png_bytes(n))
        server.write_ca_bundle(Path(ca_path))
        conn.send(server.url("/"))
        conn.recv()


def bench_inputs(runs: int, work: Path) -> dict[str, float]:
    from runflow_worker.cache.fetcher import Fetcher
    from runflow_worker.cache.urlpolicy import URLPolicy
    from runflow_worker.run.assembly import make_input_fetcher
    from runflow_worker.run.inputs import materialise_inputs
    from runflow_worker.settings import Settings

    ours, theirs = multiprocessing.Pipe()
    server = multiprocessing.get_context("fork").Process(
        target=_serve_images, args=(theirs, runs, str(work / "ca.pem")), daemon=True)
    server.start()
    try:
        base = ours.recv()
        fetcher = Fetcher(URLPolicy(allow=("127.0.0.1/32",)), ca_bundle=work / "ca.pem")
        fetch = make_input_fetcher(Settings(cache_dir=work / "cache"), fetcher)
        defs = {"image": InputDef(input_id="image", type=InputType.IMAGE)}

        def once(n: int) -> None:
            input_dir = work / "runs" / uuid.uuid4().hex / "input"
            input_dir.mkdir(parents=True)  # made ahead of the run, as run directories are
            materialise_inputs(defs, {"image": f"{base}in-{n}.png"}, input_dir, fetch,
                               max_bytes=1 << 30, max_pixels=1 << 26, cancel=lambda: False)

        return timed(runs, once)
    finally:
        ours.send("stop")
        server.join(10)


def bench_upload(runs: int, work: Path) -> dict[str, float]:
    from runflow_worker.run.outputs import store_outputs
    from runflow_worker.run.storage import LocalStorage
    from runflow_worker.runtime.protocol import OutputFile

    root = work / "child"
    out = root / "runs" / "r" / "output"
    out.mkdir(parents=True)
    (out / "result_00001_.png").write_bytes(png_bytes(7))
    (work / "store").mkdir()
    storage = LocalStorage(work / "store")
    files = [OutputFile("9", "RunflowOutputImage", "result_00001_.png", "result")]

    def once(_n: int) -> None:
        store_outputs(files, out, uuid.uuid4().hex, storage, should_stop=lambda: False,
                      written=[], keep_if_late=lambda: False, trusted_root=root)

    return timed(runs, once)


def bench_policy(runs: int, _work: Path) -> dict[str, float]:
    from runflow_worker.cache.urlpolicy import URLPolicy

    policy = URLPolicy(allow=("127.0.0.1/32",))

    def once(n: int) -> None:
        url = f"https://127.0.0.1:43215/in-{n}.png"
        policy.check_url(url)
        policy.check_url(url)

    return timed(runs, once)


BENCHES = {"inputs": bench_inputs, "upload": bench_upload, "policy": bench_policy}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--only", default=",".join(BENCHES))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    results = {}
    for name in args.only.split(","):
        work = Path(tempfile.mkdtemp(prefix=f"bench-{name}-", dir=args.dir))
        try:
            results[name] = BENCHES[name](args.runs, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(results))
    else:
        for name, f in results.items():
            print(f"{name:8s} median {f['median_us']:8.1f} us  p10 {f['p10_us']:8.1f} us  "
                  f"p90 {f['p90_us']:8.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
