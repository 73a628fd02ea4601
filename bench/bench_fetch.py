"""Benchmark: ``BlobStore.ensure`` against curl, over loopback TLS.

Serves one file (1 GiB by default, sent with its ``Content-Length`` as any file server does)
with ``openssl s_server -HTTP`` using a ``trustme`` certificate on 127.0.0.1, then times, interleaved over several rounds:

- ``BlobStore.ensure``: download + sha256 in the same pass + fsync + publish, written past
  the page cache (``O_DIRECT``, the default);
- ``BlobStore.ensure`` with direct I/O off: the same through the page cache;
- ``Fetcher.fetch_to_file`` through the page cache without fsync: the same transfer and
  hash, to show what durability costs;
- ``curl -o FILE`` then ``sha256sum FILE``: the sequential baseline;
- ``curl -o FILE`` then ``openssl dgst -sha256 FILE``: the same with a faster hasher;
- ``curl -o FILE`` then ``sync FILE``: durable like the store, no hashing;
- ``curl -o FILE`` alone: the transfer plus the disk write, no hashing;
- ``curl -o /dev/null``: the transfer alone.

Before each timed command the previous output is deleted and dirty pages are flushed
(``os.sync``), so no contender pays for another's writeback. Wall time is reported as the
median and the best of the rounds, CPU time (user + system of the measuring process or the
commands) as the median. Run from the repository root::

    python bench/bench_fetch.py [--size-mib 1024] [--rounds 5] [--dir DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import trustme

from runflow_worker.cache.blobs import BlobStore
from runflow_worker.cache.fetcher import Fetcher
from runflow_worker.cache.sources import Sources
from runflow_worker.cache.urlpolicy import URLPolicy

CHUNK_BYTES = 8 << 20


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or the platform's answer)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_response_file(path: Path, size_bytes: int) -> str:
    """Write a complete HTTP response with ``size_bytes`` random body bytes to ``path`` (what
    ``openssl s_server -HTTP`` sends as it is); return the body's hex sha256."""
    digest = hashlib.sha256()
    with path.open("wb") as f:
        f.write(b"HTTP/1.0 200 ok\r\nContent-Type: application/octet-stream\r\n"
                b"Content-Length: %d\r\n\r\n" % size_bytes)
        left = size_bytes
        while left:
            chunk = os.urandom(min(CHUNK_BYTES, left))
            digest.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(workdir: Path, ca: trustme.CA) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``openssl s_server -HTTP`` serving ``workdir``; return it and its port."""
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(workdir / "server.pem"))
    port = free_port()
    server = subprocess.Popen(
        ["openssl", "s_server", "-HTTP", "-quiet", "-accept", f"127.0.0.1:{port}",
         "-cert", "server.pem"],
        cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, port
        except OSError:
            time.sleep(0.05)  # waiting for a subprocess to listen: nothing to wait on
    server.kill()
    raise RuntimeError("openssl s_server did not start")


class Timing:
    """Wall and CPU seconds of one measured call."""

    def __init__(self, wall_s: float, cpu_s: float) -> None:
        self.wall_s = wall_s
        self.cpu_s = cpu_s


def timed(fn: Callable[[], None], *, children: bool) -> Timing:
    """Run ``fn``; return its wall time and the CPU time of this process or its children."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    before = resource.getrusage(who)
    start = time.perf_counter()
    fn()
    wall_s = time.perf_counter() - start
    after = resource.getrusage(who)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Timing(wall_s, cpu_s)


def main() -> int:
    """Run the benchmark and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", type=Path, help="work directory (default: a new temp dir)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    for tool in ("openssl", "curl", "sha256sum"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is required")

    workdir = Path(tempfile.mkdtemp(prefix="bench-fetch-", dir=args.dir))
    serve_dir = workdir / "srv"
    serve_dir.mkdir()
    size_bytes = args.size_mib * 2**20
    print(f"writing {args.size_mib} MiB of random data ...", flush=True)
    digest = make_response_file(serve_dir / "data.http", size_bytes)
    ca = trustme.CA()
    ca_file = workdir / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server, port = start_server(serve_dir, ca)
    url = f"https://127.0.0.1:{port}/data.http"
    out = workdir / "out.bin"
    store_root = workdir / "store"
    fetcher = Fetcher(URLPolicy(["127.0.0.1/32"]), ca_bundle=ca_file, timeout_s=60)
    buffered_fetcher = Fetcher(URLPolicy(["127.0.0.1/32"]), ca_bundle=ca_file, timeout_s=60,
                               direct_io=False)
    curl = ["curl", "-sS", "--fail", "--cacert", str(ca_file), url]

    def reset() -> None:
        out.unlink(missing_ok=True)
        shutil.rmtree(store_root, ignore_errors=True)
        os.sync()

    def run_store(via: Fetcher) -> Callable[[], None]:
        def go() -> None:
            store = BlobStore(store_root, sources=Sources(fetcher=via))
            path = store.ensure(digest, [url], size_bytes)
            assert path.stat().st_size == size_bytes
        return go

    def run_fetch_no_fsync() -> None:
        result = buffered_fetcher.fetch_to_file(url, out, fsync=False)
        assert result.sha256 == digest

    def run(cmd: list[str]) -> None:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)

    def curl_then(hasher: list[str]) -> Callable[[], None]:
        def go() -> None:
            run([*curl, "-o", str(out)])
            line = subprocess.run([*hasher, str(out)], check=True, capture_output=True,
                                  text=True).stdout
            assert digest in line
        return go

    contenders: dict[str, tuple[Callable[[], None], bool]] = {
        "BlobStore.ensure (hash in the same pass, O_DIRECT, fsync, publish)": (
            run_store(fetcher), False),
        "BlobStore.ensure, direct I/O off (through the page cache)": (
            run_store(buffered_fetcher), False),
        "Fetcher.fetch_to_file (page cache, no fsync)": (run_fetch_no_fsync, False),
        "curl -o FILE, then sha256sum FILE": (curl_then(["sha256sum"]), True),
        "curl -o FILE, then openssl dgst -sha256 FILE": (
            curl_then(["openssl", "dgst", "-sha256", "-r"]), True),
        "curl -o FILE, then sync FILE (durable, no hash)": (
            lambda: (run([*curl, "-o", str(out)]), run(["sync", str(out)])), True),
        "curl -o FILE (no hash)": (lambda: run([*curl, "-o", str(out)]), True),
        "curl -o /dev/null (transfer only)": (lambda: run([*curl, "-o", os.devnull]), True),
    }
    results: dict[str, list[Timing]] = {name: [] for name in contenders}
    load_before = os.getloadavg()[0]
    try:
        for round_no in range(1, args.rounds + 1):
            print(f"round {round_no}/{args.rounds}", flush=True)
            for name, (fn, children) in contenders.items():
                reset()
                results[name].append(timed(fn, children=children))
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(workdir, ignore_errors=True)

    load_after = os.getloadavg()[0]
    curl_alone = statistics.median(t.wall_s for t in results["curl -o FILE (no hash)"])
    rows = []
    for name, timings in results.items():
        median_s = statistics.median(t.wall_s for t in timings)
        rows.append({
            "contender": name,
            "median_s": round(median_s, 3),
            "best_s": round(min(t.wall_s for t in timings), 3),
            "median_cpu_s": round(statistics.median(t.cpu_s for t in timings), 3),
            "mib_per_s": round(args.size_mib / median_s, 1),
            "vs_curl_alone": round(median_s / curl_alone, 2),
        })
    machine = {"nproc": os.cpu_count(), "cpu": cpu_model(), "python": platform.python_version(),
               "openssl": subprocess.run(["openssl", "version"], capture_output=True, check=False,
                                         text=True).stdout.strip(),
               "size_mib": args.size_mib, "rounds": args.rounds,
               "loadavg_1min_before_after": [round(load_before, 2), round(load_after, 2)]}
    print(f"\nnproc {machine['nproc']}, {machine['cpu']}, Python {machine['python']}, "
          f"{machine['openssl']}; {args.size_mib} MiB, {args.rounds} rounds; "
          f"load average {load_before:.2f} before, {load_after:.2f} after\n")
    print("| contender | median s | best s | CPU s (median) | MiB/s | x curl alone |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['contender']} | {r['median_s']:.2f} | {r['best_s']:.2f} | "
              f"{r['median_cpu_s']:.2f} | {r['mib_per_s']:.0f} | {r['vs_curl_alone']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
