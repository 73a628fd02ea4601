"""Real ComfyUI in the sandbox: a pack writing into its own folder at import loads, and the
child runs without capabilities, alone in its PID namespace, with the checkout unchanged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from runflow_worker.run.contract import RunStatus, parse_message
from tests.comfyui.scenario import COMFY, SANDBOX_READ_ONLY
from tests.fakes.control import RecordingControl
from tests.fakes.fetchers import url_path
from tests.support.factories import workflow

pytestmark = [pytest.mark.comfyui, pytest.mark.timeout(900),
              pytest.mark.skipif(shutil.which("bwrap") is None,
                                 reason="bubblewrap (bwrap) is not installed")]

PACK = '''
import json
import os

import folder_paths

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "written_at_import.txt"), "w") as fh:
    fh.write("written at import")


class RunflowSandboxProbe:
    CATEGORY = "runflow_test"
    FUNCTION = "run"
    RETURN_TYPES = ("STRING",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"checkout": ("STRING", {})}}

    def run(self, checkout):
        with open("/proc/self/status") as fh:
            caps = {l.split(":")[0]: l.split(":")[1].strip() for l in fh if l.startswith("Cap")}
        try:
            with open(os.path.join(checkout, "runflow_sandbox_probe.txt"), "w") as fh:
                fh.write("pwned")
            wrote_checkout = True
        except OSError:
            wrote_checkout = False
        with open(os.path.join(HERE, "written_at_import.txt")) as fh:
            own = fh.read()
        report = {"caps": caps, "own": own, "wrote_checkout": wrote_checkout,
                  "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit())}
        path = os.path.join(folder_paths.get_output_directory(), "probe.json")
        with open(path, "w") as fh:
            json.dump(report, fh)
        return ("probe.json",)


NODE_CLASS_MAPPINGS = {"RunflowSandboxProbe": RunflowSandboxProbe}
'''


def test_real_comfyui_runs_a_self_writing_pack_in_the_sandbox(tmp_path: Path) -> None:
    from runflow_worker.run.assembly import build_pipeline
    from runflow_worker.run.storage import LocalStorage
    from runflow_worker.settings import Settings

    nodes = tmp_path / "custom_nodes"
    (nodes / "sandbox_probe").mkdir(parents=True)
    (nodes / "sandbox_probe" / "__init__.py").write_text(PACK)
    settings = Settings(cache_dir=tmp_path / "cache", comfyui_dir=Path(COMFY),
                        gpu_class="cpu", extra_custom_nodes=(str(nodes),))
    assert settings.sandboxed
    pl = build_pipeline(settings, storage=LocalStorage(tmp_path / "store"), cpu=True,
                        sandbox_read_only=SANDBOX_READ_ONLY)
    graph = {"1": {"class_type": "RunflowSandboxProbe", "inputs": {"checkout": COMFY}},
             "2": {"class_type": "RunflowOutputFile", "inputs": {
                 "output_id": "probe", "output_name": "", "value": ["1", 0]}}}
    try:
        msg = parse_message({"run_id": "sandboxed", "workflow": workflow(graph), "input": {}})
        result = pl.execute(msg, RecordingControl())
        assert result.status is RunStatus.SUCCEEDED, result.failure
        assert "sandbox_probe" not in pl.supervisor.runner.ready.import_failures
        report = json.loads(url_path(result.output.outputs[0].url).read_text())
    finally:
        pl.close()
    for name in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
        assert int(report["caps"][name], 16) == 0, report["caps"]
    assert report["own"] == "written at import"
    assert report["wrote_checkout"]  # into the scratch layer...
    assert not (Path(COMFY) / "runflow_sandbox_probe.txt").exists()  # ...gone with it
    assert not (nodes / "sandbox_probe" / "written_at_import.txt").exists()
    assert len(report["pids"]) <= 4, report["pids"]  # the sandbox's init, ComfyUI, no worker
