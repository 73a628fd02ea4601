"""``serve`` spawns the baked checkout's child before it imports the pipeline
(``run.childconfig``, ``run.assembly.build_pipeline``): what comes before the spawn stays
light, the child is the one the first run gets, and it never outlives a failed start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runflow_worker.errors import ConfigError
from runflow_worker.run.assembly import build_pipeline
from runflow_worker.run.childconfig import BAKED, baked_child_config
from runflow_worker.run.config import PipelineConfig
from runflow_worker.run.rundirs import RunDirs
from runflow_worker.settings import Settings
from tests.fakes import FAKE_CHILD

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]

# Run in a fresh interpreter: which modules the command line and the assembly import, and
# whether the pipeline module was imported when the baked child's pre-start began.
_PROBE = r"""
import json, sys
import runflow_worker.cli.main, runflow_worker.run.assembly as assembly
heavy = sorted(m for m in ("runflow_worker.run.pipeline", "runflow_worker.serve.daemon",
                           "runflow_worker.serve.control", "redis", "httpx", "boto3")
               if m in sys.modules)
seen = {}
real = assembly.prestart_baked
def spy(*args, **kwargs):
    seen["pipeline_imported"] = "runflow_worker.run.pipeline" in sys.modules
    return real(*args, **kwargs)
assembly.prestart_baked = spy
from runflow_worker.settings import Settings
settings = Settings(cache_dir=sys.argv[1], comfyui_dir=sys.argv[2], sandbox="none",
                    storage_url="file://" + sys.argv[3])
pipeline = assembly.build_pipeline(settings, child_entry=sys.argv[4], prestart=True)
try:
    seen["ready"] = pipeline.supervisor.prestart_began.wait(30)
finally:
    pipeline.close()
print(json.dumps({"heavy": heavy, **seen}))
"""


def test_the_baked_child_starts_before_the_pipeline_is_imported(tmp_path: Path) -> None:
    checkout = tmp_path / "ComfyUI"
    checkout.mkdir()
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(tmp_path / "cache"), str(checkout),
         str(tmp_path / "out"), FAKE_CHILD],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
        text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    # The command line's imports leave out the pipeline, the daemon, Redis and the fetcher.
    assert probe["heavy"] == []
    assert probe["pipeline_imported"] is False
    assert probe["ready"] is True


def test_the_baked_childs_config(tmp_path: Path) -> None:
    checkout = tmp_path / "ComfyUI"
    config = PipelineConfig(work_dir=tmp_path / "work", comfyui_dir=checkout,
                            child_entry=FAKE_CHILD, sandbox=False)
    run_dirs = RunDirs(config.work_dir)
    try:
        assert baked_child_config(config, run_dirs) is None  # missing: the first run says so
        checkout.mkdir()
        child = baked_child_config(config, run_dirs)
        assert child is not None
        assert (child.env_key, child.comfyui_dir, child.custom_code) == (BAKED, str(checkout),
                                                                          False)
        assert child.base_dir == str(run_dirs.child_root / "base")
        assert baked_child_config(PipelineConfig(work_dir=config.work_dir, comfyui_dir=None),
                                  run_dirs) is None
    finally:
        run_dirs.close()


def _children() -> set[int]:
    """The live child processes of this process (Linux ``/proc``)."""
    mine = str(os.getpid())
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if fields[1] == mine and fields[0] != "Z":
                found.add(int(entry))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_a_failure_after_the_early_start_stops_the_child(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    # Storage is opened after the child was spawned (an S3 client is slow to make): when
    # that fails, the child and the run directories must go with the failure.
    import runflow_worker.run.assembly as assembly

    checkout = tmp_path / "ComfyUI"
    checkout.mkdir()
    spawned = []
    real = assembly.prestart_baked

    def spy(*args, **kwargs):
        started = real(*args, **kwargs)
        spawned.append(started)
        return started

    def no_storage(settings: Settings, storage_url: str | None = None) -> None:
        raise ConfigError("storage refused")

    monkeypatch.setattr(assembly, "prestart_baked", spy)
    monkeypatch.setattr(assembly, "build_storage", no_storage)
    before = _children()
    settings = Settings(cache_dir=tmp_path / "cache", comfyui_dir=checkout, sandbox="none")
    with pytest.raises(ConfigError, match="storage refused"):
        build_pipeline(settings, child_entry=FAKE_CHILD, prestart=True)
    assert spawned and spawned[0] is not None  # a child was being started
    assert _children() <= before
    assert not list((tmp_path / "cache").rglob("runs-*.lock"))  # the run directories went
