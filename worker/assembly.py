"""Builds the pipeline and its parts from the settings (the one place that wires them)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from worker.pipeline import Pipeline, PipelineConfig
from worker.rundirs import WORK_SUBDIR
from worker.settings import Settings
from worker.storage import Storage, open_storage

if TYPE_CHECKING:
    from cache.fetcher import Fetcher


def build_storage(settings: Settings, storage_url: str | None = None) -> Storage:
    """Output storage from ``storage_url`` or the settings."""
    return open_storage(storage_url or settings.effective_storage_url,
                        endpoint_url=settings.s3_endpoint_url,
                        presign_ttl_s=settings.presign_ttl_s)


def make_input_fetcher(settings: Settings, fetcher: Fetcher, *,
                       allow_local_files: bool = False):
    """The function that fetches one caller file (https, runflow assets, local files)."""
    from cache.errors import URLRefused
    from worker.cache_cli import build_sources

    sources = build_sources(settings, fetcher)

    def fetch(url: str, dest: Path, *, max_bytes: int, cancel: Callable[[], bool]) -> None:
        if url.startswith("file://"):
            if not allow_local_files:  # the contract check refuses these before; defence
                raise URLRefused("local files are not accepted here")
            shutil.copyfile(unquote(urlsplit(url).path), dest)
            return
        # No fsync: the file lives as long as the run, which a crash ends anyway.
        sources.fetch_to_file(url, dest, max_bytes=max_bytes, cancel=cancel, fsync=False)

    return fetch


def build_pipeline(settings: Settings, *, storage: Storage | None = None,
                   allow_local_files: bool = False, child_entry: str | None = None,
                   cpu: bool | None = None,
                   sandbox_read_only: tuple[Path, ...] = (),
                   prestart: bool = False) -> Pipeline:
    """A pipeline wired from the settings (``child_entry`` swaps the ComfyUI child;
    ``sandbox_read_only`` adds paths the sandboxed child may read to
    ``RUNFLOW_SANDBOX_READ_ONLY``'s, for tests).

    ``prestart`` starts the ComfyUI child for the likely next run (``Pipeline.prestart``)
    as early as it can: on a baked checkout before the cache parts are built (their imports
    overlap ComfyUI's), otherwise once the environments are known.

    ``cpu`` (True: ComfyUI on the CPU, False: on CUDA) defaults to ``RUNFLOW_DEVICE``, else
    to the CPU for the class ``cpu`` and detection (CUDA where torch finds it) otherwise.
    """
    from worker.cache_cli import build_blob_store, build_environments, build_fetcher

    if cpu is None:
        cpu = (settings.device == "cpu" if settings.device is not None
               else settings.gpu_class == "cpu" or None)
    config = PipelineConfig(
        work_dir=settings.cache_dir / WORK_SUBDIR,
        comfyui_dir=settings.comfyui_dir,
        cpu=cpu,
        allow_local_files=allow_local_files,
        input_max_bytes=settings.input_max_bytes,
        image_max_pixels=settings.image_max_pixels,
        child_entry=child_entry or settings.runner_entry,
        startup_timeout_s=settings.startup_timeout_s,
        model_fetch_parallel=settings.model_fetch_parallel,
        run_install_scripts=settings.run_install_scripts,
        allowed_origins=settings.origin_allow,
        extra_custom_node_dirs=tuple(Path(d).expanduser() for d in settings.extra_custom_nodes),
        child_env_pass=settings.child_env_pass,
        sandbox=settings.sandboxed,
        child_network=settings.child_network == "host",
        sandbox_hidden=(settings.cache_dir,),
        sandbox_read_only=(*(Path(p) for p in settings.sandbox_read_only),
                           *sandbox_read_only),
    )
    pipeline = Pipeline(config, storage=storage or build_storage(settings))
    if prestart and config.comfyui_dir is not None:
        pipeline.prestart()
    try:
        fetcher = build_fetcher(settings)  # one connection policy: models, inputs, git origins
        pipeline.blobs = build_blob_store(settings, fetcher)
        pipeline.fetch_input = make_input_fetcher(settings, fetcher,
                                                  allow_local_files=allow_local_files)
        pipeline.environments = build_environments(settings, fetcher)
    except BaseException:
        pipeline.close()  # a pre-started child must not outlive a failed build
        raise
    if prestart and config.comfyui_dir is None:
        pipeline.prestart()
    return pipeline
