"""A hostile custom node pack in real ComfyUI: it writes a crafted pickle frame on every
socket it holds, at import and while a node runs. The worker never runs it: the run fails
(a protocol violation), the canary the pickle would create never appears, and the next run
succeeds on a fresh ComfyUI."""

from __future__ import annotations

from pathlib import Path

import pytest

from runflow_worker.errors import ErrorCode
from runflow_worker.run.contract import RunStatus
from tests.comfyui.scenario import COMFY, SANDBOX_READ_ONLY, img_graph, run, write_png

pytestmark = [pytest.mark.comfyui, pytest.mark.timeout(900)]

PACK = '''
import os, pickle, stat, struct

CANARY = {canary!r}
# A file beside the pack, which the test removes after the first start: the pack sees its
# own folder (read-only) inside the sandbox, nothing else of the test's.
ATTACK_AT_IMPORT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "attack-at-import")


class _Canary:
    def __reduce__(self):
        return (open, (CANARY, "w"))


def attack():
    """A multiprocessing.connection frame (4-byte length, pickle) on every socket."""
    payload = pickle.dumps(_Canary())
    frame = struct.pack("!i", len(payload)) + payload
    for name in os.listdir("/proc/self/fd"):
        try:
            if stat.S_ISSOCK(os.fstat(int(name)).st_mode):
                os.write(int(name), frame)
        except OSError:
            pass


if os.path.exists(ATTACK_AT_IMPORT):
    attack()


class RunflowHostilePickle:
    CATEGORY = "runflow_test"
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def INPUT_TYPES(cls):
        return {{"required": {{"image": ("IMAGE",)}}}}

    def run(self, image):
        attack()
        return (image,)


NODE_CLASS_MAPPINGS = {{"RunflowHostilePickle": RunflowHostilePickle}}
'''


@pytest.fixture
def hostile_pipeline(tmp_path: Path):
    from runflow_worker.run.assembly import build_pipeline
    from runflow_worker.run.storage import LocalStorage
    from runflow_worker.settings import Settings

    nodes = tmp_path / "custom_nodes"
    (nodes / "runflow_hostile_pack").mkdir(parents=True)
    canary = tmp_path / "canary"
    attack_at_import = nodes / "runflow_hostile_pack" / "attack-at-import"
    (nodes / "runflow_hostile_pack" / "__init__.py").write_text(PACK.format(canary=str(canary)))
    attack_at_import.touch()
    settings = Settings(cache_dir=tmp_path / "cache", comfyui_dir=Path(COMFY), gpu_class="cpu",
                        extra_custom_nodes=(str(nodes),))
    pl = build_pipeline(settings, storage=LocalStorage(tmp_path / "store"),
                        allow_local_files=True, cpu=True,
                        sandbox_read_only=SANDBOX_READ_ONLY)
    yield pl, canary, attack_at_import
    pl.close()


def test_a_pack_writing_pickle_frames_never_runs_code_in_the_worker(
        hostile_pipeline, tmp_path: Path) -> None:
    pipeline, canary, attack_at_import = hostile_pipeline
    image = write_png(tmp_path / "i.png").as_uri()
    output = {"2": {"class_type": "RunflowOutputImage", "inputs": {
        "output_id": "o", "output_name": "", "value": ["1", 0]}}}
    # At import, while ComfyUI starts: the start fails.
    started = run(pipeline, img_graph(output), {"image": image}, run_id="hostile-import")
    assert not canary.exists()
    attack_at_import.unlink()  # the next start is honest
    f = started.failure
    assert started.status is RunStatus.FAILED and f is not None, started
    assert f.code is ErrorCode.ENVIRONMENT_FAILED, f
    assert "protocol violation from the ComfyUI process: frame is not valid UTF-8" in f.message
    # While its node runs: the run fails with INTERNAL.
    hostile = img_graph({
        "3": {"class_type": "RunflowHostilePickle", "inputs": {"image": ["1", 0]}},
        "2": {"class_type": "RunflowOutputImage", "inputs": {
            "output_id": "o", "output_name": "", "value": ["3", 0]}}})
    attacked = run(pipeline, hostile, {"image": image}, run_id="hostile-node")
    assert not canary.exists()
    f = attacked.failure
    assert attacked.status is RunStatus.FAILED and f is not None, attacked
    assert f.code is ErrorCode.INTERNAL, f
    assert f.message.startswith(
        "protocol violation from the ComfyUI process: frame is not valid UTF-8"), f.message
    # The next run gets a fresh ComfyUI and succeeds.
    ok = run(pipeline, img_graph(output), {"image": image}, run_id="after-hostile")
    assert ok.status is RunStatus.SUCCEEDED, ok.failure
    assert not canary.exists()
