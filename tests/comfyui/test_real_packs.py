"""Real public custom-node packs through the whole pipeline, in environments the worker builds.

Each test deploys a workflow pinning ComfyUI (the checkout in ``RUNFLOW_TEST_COMFYUI``) and
one pack at a fixed commit, lets the worker build that environment (the pack's requirements
installed by the environment builder, from the package index: these tests need network to
it) and runs one small workflow through the pack's own nodes on CPU. Each pack shows one
thing real packs do that a hand-written test node does not:

- ComfyUI-Custom-Scripts (pysssss) writes files at import: it copies its default config to
  ``pysssss.json`` in its own folder and makes a directory under ComfyUI's ``web/``;
- ComfyUI_essentials has non-trivial requirements (numba, colour-science, rembg, pixeloe,
  transparent-background: about thirty packages with OpenCV, scikit-image and timm);
- ComfyUI_UltimateSDUpscale needs its git submodule (without it, its import tries to
  download the script from GitHub);
- ComfyUI-VideoHelperSuite writes a video with the ffmpeg of its ``imageio-ffmpeg``
  requirement.

The packs come from local copies: ``RUNFLOW_TEST_PACKS`` is a directory of bare clones
(``git clone --mirror <origin> <dir>/<name>.git``, the submodule's repository included),
mapped to the public origins with ``RUNFLOW_GIT_MIRRORS`` as an offline worker would. See
docs/environments.md, "Tests with real custom-node packs".
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from runflow_worker.run.contract import RunStatus, parse_message
from tests.comfyui.scenario import COMFY, SANDBOX_READ_ONLY, seed_blob, write_png
from tests.fakes.control import RecordingControl
from tests.fakes.fetchers import url_path
from tests.support.factories import workflow
from tests.support.paths import REPO

PACKS_DIR = os.environ.get("RUNFLOW_TEST_PACKS")
pytestmark = [
    pytest.mark.comfyui,
    # An environment build installs the pack's requirements from the index: minutes.
    pytest.mark.timeout(1800),
    pytest.mark.skipif(not PACKS_DIR, reason=(
        "needs copies of real custom-node packs: set RUNFLOW_TEST_PACKS to a directory of "
        "bare clones (docs/environments.md, 'Tests with real custom-node packs')")),
]

COMFY_ORIGIN = "https://github.com/comfyanonymous/ComfyUI"


@dataclass(frozen=True)
class Pack:
    """A public pack pinned at one commit, and the bare clone it is read from."""

    name: str
    origin: str
    commit: str

    @property
    def clone(self) -> str:
        """The bare clone's name in RUNFLOW_TEST_PACKS."""
        return self.origin.rstrip("/").rsplit("/", 1)[1] + ".git"


# Commits of up to October 2025, as the ComfyUI the tests run with (a125cd8, 12 October 2025).
PYSSSSS = Pack("ComfyUI-Custom-Scripts", "https://github.com/pythongosssss/ComfyUI-Custom-Scripts",
               "f2838ed5e59de4d73cde5c98354b87a8d3200190")
# Its last commit (December 2024).
ESSENTIALS = Pack("ComfyUI_essentials", "https://github.com/cubiq/ComfyUI_essentials",
                  "33ff89fd354d8ec3ab6affb605a79a931b445d99")
USDU = Pack("ComfyUI_UltimateSDUpscale", "https://github.com/ssitu/ComfyUI_UltimateSDUpscale",
            "871c7cb134797f6ed68e323090532f77110194a7")
VHS = Pack("ComfyUI-VideoHelperSuite", "https://github.com/Kosinkadink/ComfyUI-VideoHelperSuite",
           "08e8df15db24da292d4b7f943c460dc2ab442b24")
USDU_SUBMODULE = "https://github.com/Coyote-A/ultimate-upscale-for-automatic1111"
ORIGINS = [p.origin for p in (PYSSSSS, ESSENTIALS, USDU, VHS)] + [USDU_SUBMODULE]


def _comfy_origin(root: Path) -> tuple[Path, str]:
    """A repository standing in for ComfyUI's origin, and the commit to pin: the checkout's
    files committed as a snapshot (a checkout may be a partial clone, which cannot serve
    its own commits), as the other real-environment tests do."""
    from tests.support.gitrepos import commit, make_repo

    snapshot = root / "origins" / "ComfyUI"
    shutil.copytree(COMFY, snapshot, ignore=shutil.ignore_patterns(".git", "__pycache__"))
    make_repo(snapshot)
    return snapshot, commit(snapshot, {}, "snapshot of the ComfyUI under test")


@pytest.fixture(scope="module")
def packs_pipeline(tmp_path_factory: pytest.TempPathFactory):
    """A worker pipeline building environments, every origin mapped to a local copy."""
    from runflow_worker.run.assembly import build_pipeline
    from runflow_worker.run.storage import LocalStorage
    from runflow_worker.settings import Settings

    root = tmp_path_factory.mktemp("packs")
    comfy_repo, comfy_commit = _comfy_origin(root)
    mirrors = [f"{COMFY_ORIGIN}={comfy_repo}"]
    for origin in ORIGINS:
        clone = Path(PACKS_DIR) / (origin.rsplit("/", 1)[1] + ".git")
        if clone.is_dir():
            mirrors.append(f"{origin}={clone}")
    settings = Settings(cache_dir=root / "cache", comfyui_dir=None, gpu_class="cpu",
                        git_mirrors=tuple(mirrors))
    pl = build_pipeline(settings, storage=LocalStorage(root / "store"), allow_local_files=True,
                        cpu=True, sandbox_read_only=SANDBOX_READ_ONLY)
    yield pl, comfy_commit, root / "cache"
    pl.close()


def need(*repos: str) -> None:
    """Skip unless RUNFLOW_TEST_PACKS holds each bare clone."""
    missing = [r for r in repos if not (Path(PACKS_DIR) / r).is_dir()]
    if missing:
        pytest.skip(f"RUNFLOW_TEST_PACKS has no {', '.join(missing)}")


def run_pack(packs_pipeline, pack: Pack, graph: dict[str, Any], inputs: dict[str, Any], *,
             models: dict[str, Any] | None = None):
    """Run ``graph`` in the environment ComfyUI + ``pack``; assert it succeeded cleanly."""
    pl, comfy_commit, _ = packs_pipeline
    wf = workflow(graph, models=models or {})
    wf["environment"]["comfyui"] = {"origin": COMFY_ORIGIN, "commit": comfy_commit,
                                    "dirty": False}
    wf["custom_nodes"] = {pack.name: {"origin": pack.origin, "commit": pack.commit,
                                      "dirty": False}}
    msg = parse_message({"run_id": f"pack-{pack.name.lower().replace('_', '-')}",
                         "workflow": wf, "input": inputs})
    result = pl.execute(msg, RecordingControl())
    failure = result.failure
    assert result.status is RunStatus.SUCCEEDED, (
        f"{failure.code.value}: {failure.message} {failure.details}" if failure else None)
    assert result.environment["comfyui_commit"] == comfy_commit
    assert result.environment["env_key"] != "baked"
    assert not result.environment["import_failures"], result.environment["import_failures"]
    return result


def env_dir(cache: Path, result) -> Path:
    """The built environment's directory."""
    return cache / "envs" / result.environment["env_key"]


def test_pysssss_writes_its_config_at_import(packs_pipeline, tmp_path: Path) -> None:
    """Its import copies pysssss.default.json to pysssss.json; its node then resizes."""
    need(PYSSSSS.clone)
    graph = {
        "1": {"class_type": "RunflowInputImage", "inputs": {"input_id": "image"}},
        "2": {"class_type": "ConstrainImage|pysssss", "inputs": {
            "images": ["1", 0], "max_width": 32, "max_height": 32, "min_width": 0,
            "min_height": 0, "crop_if_required": "no"}},
        "3": {"class_type": "RunflowOutputImage", "inputs": {
            "output_id": "small", "output_name": "", "value": ["2", 0]}},
    }
    image = write_png(tmp_path / "in.png", (64, 48), (200, 40, 40))
    result = run_pack(packs_pipeline, PYSSSSS, graph, {"image": image.as_uri()})
    (entry,) = result.output.outputs
    out = Image.open(url_path(entry.url)).convert("RGB")
    assert out.size == (32, 24)  # aspect ratio kept within 32x32
    assert out.getpixel((16, 12)) == (200, 40, 40)
    # The child's stand-in server says it serves web directories itself, as ComfyUI's does;
    # told otherwise, the pack links its JavaScript into ComfyUI's web/extensions.
    linked = env_dir(packs_pipeline[2], result) / "ComfyUI/web/extensions/pysssss/CustomScripts"
    assert not os.path.lexists(linked)


# A 3D LUT of size 2 that inverts every colour (red varies fastest in a .cube table).
INVERT_CUBE = "TITLE \"invert\"\nLUT_3D_SIZE 2\n" + "".join(
    f"{1 - r} {1 - g} {1 - b}\n" for b in (0, 1) for g in (0, 1) for r in (0, 1))


def test_essentials_lut_uses_its_requirements(packs_pipeline, tmp_path: Path) -> None:
    """ImageApplyLUT+ reads the LUT with colour-science, which only the pack's requirements
    install (its import needs numba, also theirs)."""
    need(ESSENTIALS.clone)
    lut = tmp_path / "invert.cube"
    lut.write_text(INVERT_CUBE)
    models = {"luts/invert.cube": {"sha256": seed_blob(packs_pipeline[2] / "blobs", lut)}}
    image = Image.new("RGB", (64, 48), (200, 40, 40))
    image.paste((20, 120, 230), (32, 0, 64, 48))
    image.save(tmp_path / "in.png")
    graph = {
        "1": {"class_type": "RunflowInputImage", "inputs": {"input_id": "image"}},
        "2": {"class_type": "ImageApplyLUT+", "inputs": {
            "image": ["1", 0], "lut_file": "invert.cube", "gamma_correction": False,
            "clip_values": True, "strength": 1.0}},
        "3": {"class_type": "RunflowOutputImage", "inputs": {
            "output_id": "graded", "output_name": "", "value": ["2", 0]}},
    }
    result = run_pack(packs_pipeline, ESSENTIALS, graph,
                      {"image": (tmp_path / "in.png").as_uri()}, models=models)
    (entry,) = result.output.outputs
    out = Image.open(url_path(entry.url)).convert("RGB")
    assert out.size == (64, 48)
    for xy, (r, g, b) in (((8, 8), (200, 40, 40)), ((50, 30), (20, 120, 230))):
        got = out.getpixel(xy)
        assert all(abs(a - (255 - c)) <= 1 for a, c in zip(got, (r, g, b), strict=True)), got
    prefix = env_dir(packs_pipeline[2], result) / "python"
    for module in ("colour", "numba", "pixeloe", "rembg"):
        assert list(prefix.glob(f"lib/python*/site-packages/{module}/__init__.py")), (
            f"{module} was not installed into the environment")


@pytest.fixture(scope="module")
def usdu_models(sd15_models: Path, packs_pipeline, tmp_path_factory) -> dict[str, Any]:
    """The tiny SD1.5 models and an x2 upscaler, seeded into the pipeline's blob store."""
    import importlib.util

    blobs = packs_pipeline[2] / "blobs"
    models = {path.relative_to(sd15_models).as_posix(): {"sha256": seed_blob(blobs, path)}
              for path in sorted(sd15_models.rglob("*.safetensors"))}
    spec = importlib.util.spec_from_file_location(
        "make_weights", REPO / "examples" / "upscale-x2" / "make_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    x2 = module.write_weights(tmp_path_factory.mktemp("x2") / "x2.safetensors")
    models["upscale_models/x2.safetensors"] = {"sha256": seed_blob(blobs, x2)}
    return models


def test_ultimate_sd_upscale_runs_from_its_submodule(packs_pipeline, usdu_models,
                                                     tmp_path: Path) -> None:
    """The upscale script is the submodule's code; a tiled x2 upscale of 64x48 runs."""
    need(USDU.clone, USDU_SUBMODULE.rsplit("/", 1)[1] + ".git")
    graph = {
        "1": {"class_type": "RunflowInputImage", "inputs": {"input_id": "image"}},
        "10": {"class_type": "UNETLoader", "inputs": {
            "unet_name": "tiny_sd15_unet.safetensors", "weight_dtype": "default"}},
        "11": {"class_type": "CLIPLoader", "inputs": {
            "clip_name": "rand_clip_l.safetensors", "type": "stable_diffusion",
            "device": "default"}},
        "12": {"class_type": "VAELoader", "inputs": {"vae_name": "taesd"}},
        "13": {"class_type": "CLIPTextEncode", "inputs": {"text": "an otter", "clip": ["11", 0]}},
        "14": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["11", 0]}},
        "15": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "x2.safetensors"}},
        "16": {"class_type": "UltimateSDUpscale", "inputs": {
            "image": ["1", 0], "model": ["10", 0], "positive": ["13", 0],
            "negative": ["14", 0], "vae": ["12", 0], "upscale_by": 2.0, "seed": 3,
            "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 0.2, "upscale_model": ["15", 0], "mode_type": "Linear",
            "tile_width": 64, "tile_height": 64, "mask_blur": 4, "tile_padding": 16,
            "seam_fix_mode": "None", "seam_fix_denoise": 1.0, "seam_fix_width": 64,
            "seam_fix_mask_blur": 8, "seam_fix_padding": 16, "force_uniform_tiles": True,
            "tiled_decode": False}},
        "17": {"class_type": "RunflowOutputImage", "inputs": {
            "output_id": "upscaled", "output_name": "", "value": ["16", 0]}},
    }
    image = write_png(tmp_path / "in.png", (64, 48), (30, 90, 160))
    result = run_pack(packs_pipeline, USDU, graph, {"image": image.as_uri()},
                      models=usdu_models)
    (entry,) = result.output.outputs
    assert Image.open(url_path(entry.url)).size == (128, 96)
    script = (env_dir(packs_pipeline[2], result) / "ComfyUI" / "custom_nodes" / USDU.name
              / "repositories" / "ultimate_sd_upscale" / "scripts" / "ultimate-upscale.py")
    assert script.is_file(), "the submodule was not checked out"


def test_video_helper_suite_writes_an_mp4(packs_pipeline, tmp_path: Path) -> None:
    """VHS_VideoCombine encodes six frames with imageio-ffmpeg's ffmpeg: a real H.264 mp4."""
    import av

    need(VHS.clone)
    graph = {
        "1": {"class_type": "RunflowInputImage", "inputs": {"input_id": "image"}},
        "2": {"class_type": "RepeatImageBatch", "inputs": {"image": ["1", 0], "amount": 6}},
        "3": {"class_type": "VHS_VideoCombine", "inputs": {
            "images": ["2", 0], "frame_rate": 8, "loop_count": 0, "filename_prefix": "clip",
            "format": "video/h264-mp4", "pingpong": False, "save_output": True,
            "pix_fmt": "yuv420p", "crf": 19, "save_metadata": False,
            "trim_to_audio": False}},
    }
    image = write_png(tmp_path / "in.png", (64, 48), (30, 160, 90))
    result = run_pack(packs_pipeline, VHS, graph, {"image": image.as_uri()})
    # No Runflow Output node: the files VHS announces, labelled by its node id.
    (entry,) = result.output.outputs
    assert entry.output_id == "3" and entry.filename.endswith(".mp4")
    assert entry.content_type == "video/mp4"
    data = url_path(entry.url).read_bytes()
    assert data[4:8] == b"ftyp"  # an ISO base media file
    with av.open(str(url_path(entry.url))) as container:
        (stream,) = container.streams.video
        assert stream.codec_context.name == "h264"
        frames = list(container.decode(stream))
    assert len(frames) == 6
    assert (frames[0].width, frames[0].height) == (64, 48)
    r, g, b = frames[3].to_image().getpixel((32, 24))
    assert abs(r - 30) < 12 and abs(g - 160) < 12 and abs(b - 90) < 12
