"""Pipelines for tests: the one place a test builds ``run.pipeline.Pipeline`` from its parts.

Tests that wire a pipeline from settings (``run.assembly.build_pipeline``) test that
wiring; every other test builds its pipeline here, so a change to the pipeline's
constructor or its config is made once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runflow_worker.run.pipeline import Pipeline, PipelineConfig
from runflow_worker.run.storage import LocalStorage, Storage
from tests.fakes import FAKE_CHILD

PARTS = ("supervisor", "blobs", "fetch_input", "environments")
"""The pipeline's parts ``make_pipeline`` passes on as they are (the other options are
``PipelineConfig`` fields)."""


def make_pipeline(root: Path, *, storage: Storage | None = None, **options: Any) -> Pipeline:
    """A pipeline working under ``root``: run directories in ``root/work``, outputs stored
    in ``root/store``, the ComfyUI checkout ``root`` run by the fake child, unless
    ``options`` say otherwise.

    ``options``: ``PipelineConfig`` fields, and the parts in ``PARTS`` (a blob store, an
    input fetcher, environments, a supervisor).
    """
    parts = {name: options.pop(name) for name in PARTS if name in options}
    config = {"work_dir": root / "work", "comfyui_dir": root, "child_entry": FAKE_CHILD,
              **options}
    return Pipeline(PipelineConfig(**config), storage=storage or LocalStorage(root / "store"),
                    **parts)


def checkout_pipeline(root: Path, *, with_nodes: bool) -> Pipeline:
    """A pipeline on a baked checkout at ``root``, with a custom node in it or without."""
    nodes = root / "custom_nodes"
    nodes.mkdir(parents=True)
    (nodes / "websocket_image_save.py").write_text("# ComfyUI's own\n")
    if with_nodes:
        (nodes / "acme_nodes.py").write_text("NODE_CLASS_MAPPINGS = {}\n")
    return make_pipeline(root)
