"""Real ComfyUI: a declared custom node pack that raises at import fails the run
ENVIRONMENT_FAILED, naming it and its error, before the graph runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from runflow_worker.errors import ErrorCode
from runflow_worker.run.contract import RunStatus, parse_message
from tests.comfyui.scenario import COMFY, SANDBOX_READ_ONLY
from tests.fakes.control import RecordingControl
from tests.support.factories import workflow

pytestmark = [pytest.mark.comfyui, pytest.mark.timeout(900)]

RAISING = '''def _patch_sampling():
    raise RuntimeError("this pack cannot patch the samplers here")


_patch_sampling()
NODE_CLASS_MAPPINGS = {}
'''


def test_a_declared_pack_raising_at_import_fails_the_run(tmp_path: Path) -> None:
    from runflow_worker.run.assembly import build_pipeline
    from runflow_worker.run.storage import LocalStorage
    from runflow_worker.settings import Settings

    packs = tmp_path / "packs"
    (packs / "ComfyUI-Raises").mkdir(parents=True)
    (packs / "ComfyUI-Raises" / "__init__.py").write_text(RAISING)
    settings = Settings(cache_dir=tmp_path / "cache", comfyui_dir=Path(COMFY), gpu_class="cpu",
                        extra_custom_nodes=(str(packs),))
    pipeline = build_pipeline(settings, storage=LocalStorage(tmp_path / "store"),
                              allow_local_files=True, cpu=True,
                              sandbox_read_only=SANDBOX_READ_ONLY)
    graph = {"1": {"class_type": "RunflowInputString", "inputs": {"input_id": "prompt"}},
             "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    wf = workflow(graph)
    wf["custom_nodes"] = {"ComfyUI-Raises": {
        "origin": "https://github.com/acme/ComfyUI-Raises", "commit": "c" * 40, "dirty": False}}
    msg = parse_message({"run_id": "pack-raises", "workflow": wf,
                         "input": {"prompt": "hello"}})
    try:
        result = pipeline.execute(msg, RecordingControl())
    finally:
        pipeline.close()
    assert result.status is RunStatus.FAILED
    error = result.failure.as_error()
    assert error["code"] == ErrorCode.ENVIRONMENT_FAILED.value, error
    assert "'ComfyUI-Raises'" in error["message"]
    assert error["message"].endswith(
        "'ComfyUI-Raises': RuntimeError: this pack cannot patch the samplers here")
    excerpt = error["details"]["import_errors"]["ComfyUI-Raises"]
    assert "Traceback" in excerpt and "_patch_sampling" in excerpt
    assert "execute" not in result.timings_ms
    assert "ComfyUI-Raises" in result.environment["import_failures"]
