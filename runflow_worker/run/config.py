"""``PipelineConfig``: the pipeline's plain settings.

A module of its own, light to import (the settings and the standard library): ``serve``
builds it, and the ComfyUI child's config from it (``run.childconfig``), before it imports
the pipeline itself, so the child is spawned that much sooner.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from runflow_worker.settings import Settings

_DEFAULTS = Settings.model_construct()
"""The settings' defaults (no environment read): ``PipelineConfig``'s come from them."""


@dataclass(frozen=True)
class PipelineConfig:
    """Plain settings of the pipeline (built from the worker settings by ``run.assembly``;
    tests build it directly: its defaults are the settings' own, read from ``Settings``)."""

    work_dir: Path
    """Parent of the per-run directories."""
    comfyui_dir: Path | None
    cpu: bool | None = None
    allowed_origins: tuple[str, ...] = ()
    allow_local_files: bool = False
    input_max_bytes: int = _DEFAULTS.input_max_bytes
    image_max_pixels: int = _DEFAULTS.image_max_pixels
    child_entry: str = _DEFAULTS.runner_entry
    startup_timeout_s: float = _DEFAULTS.startup_timeout_s
    keep_run_dirs: bool = False
    extra_custom_node_dirs: tuple[Path, ...] = ()
    model_fetch_parallel: int = _DEFAULTS.model_fetch_parallel
    """Downloads of one run's missing blobs at a time."""
    run_install_scripts: bool = _DEFAULTS.run_install_scripts
    """Environments run their custom nodes' ``install.py`` (part of the environment key)."""
    child_env_pass: tuple[str, ...] = ()
    """Variables the ComfyUI child gets despite the credential scrub (``HF_TOKEN``...)."""
    sandbox: bool = _DEFAULTS.sandboxed
    """Run the ComfyUI child in the bubblewrap sandbox (``RUNFLOW_SANDBOX=bwrap``)."""
    child_network: bool = _DEFAULTS.host_network
    """The sandboxed child shares the worker's network (``RUNFLOW_CHILD_NETWORK=host``)."""
    sandbox_read_only: tuple[Path, ...] = ()
    """Extra paths the sandboxed child may read (tests: their fake child's code)."""
    sandbox_hidden: tuple[Path, ...] = ()
    """Paths the sandboxed child never sees although a path it reads contains them (the
    cache volume); the run's own directories are shown again inside them."""
