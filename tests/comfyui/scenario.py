"""What the real-ComfyUI tests share: where the checkout is, models seeded into a store, a
test image, an image graph and one run of a graph through a pipeline."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

from PIL import Image

from runflow_worker.cache.access import AccessRecords
from runflow_worker.run.contract import parse_message
from tests.fakes.control import RecordingControl
from tests.support.factories import workflow

COMFY = os.environ.get("RUNFLOW_TEST_COMFYUI")
"""The ComfyUI checkout under test (``RUNFLOW_TEST_COMFYUI``)."""
SANDBOX_READ_ONLY = tuple(Path(p) for p in
                          os.environ.get("RUNFLOW_TEST_SANDBOX_READ_ONLY", "").split(",") if p)
"""Extra paths the sandboxed child may read (a machine's own shim libraries, say)."""
HERE = Path(__file__).parent
"""This folder (its ``custom_nodes`` are the test node packs)."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file at ``path``."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def seed_blob(blobs_root: Path, path: Path) -> str:
    """Put ``path`` into the content-addressed store as a local operator would; return sha."""
    digest = sha256_file(path)
    dest = blobs_root / "sha256" / digest[:2] / digest
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
        dest.chmod(0o444)
    # As a public source leaves it: a blob without an access record is served to nobody.
    AccessRecords(blobs_root / "access").record(digest, None, private=False)
    return digest


def write_png(path: Path, size: tuple[int, int] = (64, 48),
              color: tuple[int, int, int] = (30, 90, 160)) -> Path:
    """A one-colour PNG at ``path``."""
    Image.new("RGB", size, color).save(path)
    return path


def img_graph(tail: dict) -> dict:
    """An image input ``image`` (node 1) and the nodes of ``tail``."""
    return {"1": {"class_type": "RunflowInputImage", "inputs": {"input_id": "image"}}, **tail}


def run(pipeline, graph: dict, inputs: dict[str, Any], *, run_id: str, control=None,
        **wf_overrides: Any):
    """Run ``graph`` (a workflow with ``wf_overrides``) on ``inputs``: the pipeline's result."""
    msg = parse_message({"run_id": run_id, "workflow": workflow(graph, **wf_overrides),
                         "input": inputs})
    return pipeline.execute(msg, control or RecordingControl())
