"""Benchmark: one environment build with pip and with uv, cold cache and warm cache.

Builds, with ``Environments.prepare`` exactly as a run does, an environment whose one custom
node pack has heavy requirements (by default a set like a popular image-processing pack's:
scikit-image, matplotlib, opencv-python-headless, pandas, piexif, dill; none of them in the
image). ComfyUI and the pack are local git repositories (no requirements of their own for
ComfyUI), so the figure is the requirements' install: resolution, downloads, unpacking.

Each round builds, for each installer in turn (interleaved, so a change in the machine's
load hits both alike):

- cold: an empty download cache (``PIP_CACHE_DIR`` / ``UV_CACHE_DIR`` pointing at a new
  directory) and a new environment root: what a fresh worker pays;
- warm: the same cache again, a new environment root: what a worker that built another
  environment with these packages, or rebuilds after eviction, pays.

Reported: median and best of the rounds.

This needs the package index (the network). Both installers get the same one: the machine's
pip configuration (``pip.conf``, ``PIP_INDEX_URL``, ``PIP_FIND_LINKS``...) is set aside, since
uv does not read it and a local mirror there would hand pip files uv downloads; ``UV_*``
settings likewise. ``--index-url`` names another index for both. Run from the repository
root::

    python bench/bench_env_build.py [--requirements "a b c"] [--rounds 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from runflow_worker.cache.environments import Environments, EnvironmentSpec, NodePin
from runflow_worker.cache.git import GitMirrors
from runflow_worker.cache.installer import PIP, UV, find_uv

COMFY = "https://git.example/comfyanonymous/ComfyUI"
PACK = "https://git.example/acme/ComfyUI-HeavyPack"
DEFAULT_REQUIREMENTS = ("scikit-image", "matplotlib", "opencv-python-headless", "pandas",
                        "piexif", "dill")


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "GIT_AUTHOR_NAME": "bench",
                                           "GIT_AUTHOR_EMAIL": "bench@example.invalid",
                                           "GIT_COMMITTER_NAME": "bench",
                                           "GIT_COMMITTER_EMAIL": "bench@example.invalid"},
                          ).stdout.strip()


def _repo(path: Path, files: dict[str, str]) -> str:
    """A repository at ``path`` with ``files`` committed; returns the commit."""
    path.mkdir(parents=True)
    _git(path, "init", "--quiet")
    for name, text in files.items():
        (path / name).write_text(text)
    _git(path, "add", "-A")
    _git(path, "commit", "--quiet", "-m", "bench")
    return _git(path, "rev-parse", "HEAD")


def _build(work: Path, installer: str, cache: Path, spec: EnvironmentSpec,
           mirrors: dict[str, Path], uv_bin: str | None,
           index_url: str | None) -> tuple[float, int]:
    """One build into a new environment root; ``(seconds, bytes installed)``."""
    root = work / f"envs-{installer}-{time.monotonic_ns()}"
    os.environ["PIP_CACHE_DIR" if installer == PIP else "UV_CACHE_DIR"] = str(cache)
    envs = Environments(root, GitMirrors(work / "git", mirrors), installer=installer,
                        uv_bin=uv_bin, pip_index_url=index_url)
    start = time.perf_counter()
    env = envs.prepare(spec)
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in (env.root / "python").rglob("*") if p.is_file())
    shutil.rmtree(root, ignore_errors=True)
    return seconds, size


def main() -> None:
    """Run the benchmark and print a Markdown table (and JSON with ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requirements", default=" ".join(DEFAULT_REQUIREMENTS),
                        help="the pack's requirements, space-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--installers", default="uv,pip")
    parser.add_argument("--index-url", help="the index both installers use (default: theirs)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    for name in [n for n in os.environ if n.startswith(("PIP_", "UV_"))]:
        del os.environ[name]  # one index for both (see the module docstring)
    os.environ["PIP_CONFIG_FILE"] = os.devnull
    os.environ["UV_NO_CONFIG"] = "1"
    uv_bin = find_uv()
    installers = [i for i in args.installers.split(",") if i]
    if UV in installers and uv_bin is None:
        sys.exit("uv is not installed")
    requirements = "\n".join(args.requirements.split()) + "\n"
    with tempfile.TemporaryDirectory(prefix="bench-env-") as tmp:
        work = Path(tmp)
        comfy_commit = _repo(work / "origins" / "ComfyUI", {"main.py": "# ComfyUI\n"})
        pack_commit = _repo(work / "origins" / "ComfyUI-HeavyPack",
                            {"__init__.py": "NODE_CLASS_MAPPINGS = {}\n",
                             "requirements.txt": requirements})
        mirrors = {COMFY: work / "origins" / "ComfyUI",
                   PACK: work / "origins" / "ComfyUI-HeavyPack"}
        spec = EnvironmentSpec(COMFY, comfy_commit,
                               (NodePin("ComfyUI-HeavyPack", PACK, pack_commit),))
        load_before = os.getloadavg()[0]
        times: dict[str, dict[str, list[float]]] = {i: {"cold": [], "warm": []}
                                                    for i in installers}
        sizes: dict[str, int] = {}
        for n in range(args.rounds):
            for installer in installers:
                cache = work / f"cache-{installer}-{n}"  # new: cold
                cold, sizes[installer] = _build(work, installer, cache, spec, mirrors, uv_bin,
                                                args.index_url)
                warm, _ = _build(work, installer, cache, spec, mirrors, uv_bin, args.index_url)
                shutil.rmtree(cache, ignore_errors=True)
                times[installer]["cold"].append(cold)
                times[installer]["warm"].append(warm)
                print(f"round {n + 1} {installer}: cold {cold:.1f} s, warm {warm:.1f} s",
                      file=sys.stderr)
        load_after = os.getloadavg()[0]
    results = {i: {"cold_median_s": statistics.median(t["cold"]), "cold_best_s": min(t["cold"]),
                   "warm_median_s": statistics.median(t["warm"]), "warm_best_s": min(t["warm"]),
                   "installed_mib": sizes[i] / 2**20, "rounds": t}
               for i, t in times.items()}
    uv_version = subprocess.run([uv_bin, "--version"], capture_output=True, text=True,
                                timeout=30).stdout.strip() if uv_bin else None
    pip_version = subprocess.run([sys.executable, "-m", "pip", "--version"],
                                 capture_output=True, text=True, timeout=60).stdout.split()[1]
    print(f"Machine: nproc {os.cpu_count()}, Python {platform.python_version()}, pip "
          f"{pip_version}, {uv_version or 'no uv'}; 1-minute load {load_before:.2f} before, "
          f"{load_after:.2f} after; {args.rounds} rounds. Requirements: {args.requirements}.\n")
    print("| installer | cold cache s (median) | cold best s | warm cache s (median) | "
          "warm best s | installed MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for installer, r in results.items():
        print(f"| {installer} | {r['cold_median_s']:.1f} | {r['cold_best_s']:.1f} | "
              f"{r['warm_median_s']:.1f} | {r['warm_best_s']:.1f} | {r['installed_mib']:.0f} |")
    if PIP in results and UV in results:
        cold = results[PIP]["cold_median_s"] / results[UV]["cold_median_s"]
        warm = results[PIP]["warm_median_s"] / results[UV]["warm_median_s"]
        print(f"\npip / uv (medians): cold {cold:.1f}x, warm {warm:.1f}x")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "requirements": args.requirements,
                                         "uv": uv_version, "pip": pip_version}, indent=2))


if __name__ == "__main__":
    main()
