"""Real ComfyUI from a built environment: ComfyUI and a custom node checked out at their
commits from (local) git origins, the node's requirement installed for it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from runflow_worker.run.contract import RunStatus, parse_message
from tests.comfyui.scenario import COMFY, SANDBOX_READ_ONLY
from tests.fakes.control import RecordingControl
from tests.fakes.fetchers import url_path
from tests.support.factories import workflow
from tests.support.gitrepos import commit, make_repo, make_wheel

pytestmark = [pytest.mark.comfyui, pytest.mark.timeout(900)]

COMFY_ORIGIN = "https://github.com/comfyanonymous/ComfyUI"
NODE_ORIGIN = "https://github.com/acme/ComfyUI-EnvProbe"
PROBE = '''import tinydep  # installed from this node's requirements.txt


class RunflowEnvProbe:
    CATEGORY = "runflow_test"
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",)}}

    def run(self, image):
        assert tinydep.VALUE == "from the environment"
        return (1.0 - image,)


NODE_CLASS_MAPPINGS = {"RunflowEnvProbe": RunflowEnvProbe}
'''


@pytest.fixture(scope="module")
def env_pipeline(tmp_path_factory: pytest.TempPathFactory):
    from runflow_worker.run.assembly import build_pipeline
    from runflow_worker.run.storage import LocalStorage
    from runflow_worker.settings import Settings

    root = tmp_path_factory.mktemp("envs")
    comfy = root / "origins" / "ComfyUI"
    shutil.copytree(COMFY, comfy, ignore=shutil.ignore_patterns(".git", "__pycache__"))
    make_repo(comfy)
    comfy_commit = commit(comfy, {}, "snapshot of the ComfyUI under test")
    node = make_repo(root / "origins" / "ComfyUI-EnvProbe")
    node_commit = commit(node, {"__init__.py": PROBE, "requirements.txt": "tinydep==1.0\n"})
    wheels = root / "wheels"
    make_wheel(wheels, "tinydep", "1.0", "VALUE = 'from the environment'\n")
    settings = Settings(cache_dir=root / "cache", comfyui_dir=None, gpu_class="cpu",
                        git_mirrors=(f"{COMFY_ORIGIN}={comfy}", f"{NODE_ORIGIN}={node}"),
                        pip_find_links=(str(wheels),))
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # nothing from a package index in tests
    monkeypatch.setenv("UV_NO_INDEX", "1")  # the same for uv, the default installer
    pl = build_pipeline(settings, storage=LocalStorage(root / "store"), allow_local_files=True,
                        cpu=True, sandbox_read_only=SANDBOX_READ_ONLY)
    yield pl, comfy_commit, node_commit
    pl.close()
    monkeypatch.undo()


def test_run_in_a_built_environment(env_pipeline, tmp_path: Path) -> None:
    pl, comfy_commit, node_commit = env_pipeline
    graph = {
        "1": {"class_type": "RunflowInputImage", "inputs": {"input_id": "image"}},
        "2": {"class_type": "RunflowEnvProbe", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "RunflowOutputImage", "inputs": {
            "output_id": "probe", "output_name": "", "value": ["2", 0]}},
    }
    wf = workflow(graph)
    wf["environment"]["comfyui"] = {"origin": COMFY_ORIGIN, "commit": comfy_commit,
                                    "dirty": False}
    wf["custom_nodes"] = {"ComfyUI-EnvProbe": {"origin": NODE_ORIGIN, "commit": node_commit,
                                               "dirty": False}}
    image = tmp_path / "in.png"
    Image.new("RGB", (32, 24), (255, 0, 0)).save(image)
    msg = parse_message({"run_id": "env-real", "workflow": wf,
                         "input": {"image": image.as_uri()}})
    result = pl.execute(msg, RecordingControl())
    assert result.status is RunStatus.SUCCEEDED, result.failure
    assert result.environment["comfyui_commit"] == comfy_commit
    assert not result.environment["import_failures"]
    assert not result.warnings
    (entry,) = result.output.outputs
    assert Image.open(url_path(entry.url)).getpixel((0, 0)) == (0, 255, 255)
