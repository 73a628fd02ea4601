"""Builds the pipeline and its parts from the settings (the one place that wires them):
the cache objects (fetcher, sources, blob store, environments), output storage, the input
fetcher and the pipeline."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from runflow_worker.run.childconfig import prestart_baked
from runflow_worker.run.config import PipelineConfig
from runflow_worker.run.rundirs import WORK_SUBDIR, RunDirs
from runflow_worker.run.storage import Storage, open_storage
from runflow_worker.runtime.supervisor import RunnerSupervisor
from runflow_worker.settings import Settings

if TYPE_CHECKING:
    from runflow_worker.cache.blobs import BlobStore
    from runflow_worker.cache.environments import Environments
    from runflow_worker.cache.fetcher import Fetcher
    from runflow_worker.cache.sources import Sources
    from runflow_worker.run.pipeline import Pipeline

# The pipeline and the cache modules (the contract's models, httpx, the fetcher, the store)
# are imported where they are used, not with the command line: ``serve`` spawns its ComfyUI
# child before it imports them.


def build_fetcher(settings: Settings) -> Fetcher:
    """The SSRF-safe fetcher configured from the settings (allowlist, trusted CAs, per-host
    download credentials, limits)."""
    from runflow_worker.cache.fetcher import Fetcher
    from runflow_worker.cache.urlpolicy import URLPolicy

    return Fetcher(
        URLPolicy(settings.url_allow),
        ca_bundle=settings.ca_trust,
        credentials=settings.credentials,
        timeout_s=settings.fetch_timeout_s,
        max_bytes=settings.fetch_max_bytes,
        direct_io=settings.cache_direct_io,
    )


def _s3_client_factory(settings: Settings) -> Any:
    endpoint_url = settings.s3_endpoint_url

    def make() -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=endpoint_url)

    return make


def build_sources(
    settings: Settings, fetcher: Fetcher | None = None, *, allow_s3: bool = False
) -> Sources:
    """Sources for URLs: https (through ``fetcher``), ``runflow://assets/<uuid>`` and, with
    ``allow_s3`` (deployment-supplied URLs only, never caller-supplied), ``s3://``."""
    from runflow_worker.cache.sources import Sources

    return Sources(
        fetcher=fetcher or build_fetcher(settings),
        s3_client=_s3_client_factory(settings),
        asset_bucket=settings.asset_bucket,
        mirror_dirs=tuple(Path(d).expanduser() for d in settings.model_mirrors),
        allow_s3=allow_s3,
        direct_io=settings.cache_direct_io,
    )


def build_blob_store(settings: Settings, fetcher: Fetcher | None = None) -> BlobStore:
    """The model store at ``<cache>/blobs`` with the configured budget and sources."""
    from runflow_worker.cache.blobs import BlobStore

    return BlobStore(
        settings.blobs_dir,
        sources=build_sources(settings, fetcher, allow_s3=True),
        max_bytes=settings.effective_cache_max_bytes(),
        max_blob_bytes=settings.fetch_max_bytes,
    )


def build_environments(settings: Settings, fetcher: Fetcher | None = None) -> Environments:
    """The environment builder: git mirrors and environments under the cache directory; git
    origins are checked by ``fetcher``'s URL policy."""
    from runflow_worker.cache.environments import Environments
    from runflow_worker.cache.git import GitMirrors
    from runflow_worker.run.sandboxing import build_sandbox

    return Environments(
        settings.cache_dir / "envs",
        GitMirrors(settings.cache_dir / "git", settings.git_mirror_map(),
                   fetcher=fetcher or build_fetcher(settings), ca_bundle=settings.ca_trust),
        pip_index_url=settings.pip_index_url,
        pip_find_links=settings.pip_find_links,
        max_count=settings.env_max_count,
        sandbox=build_sandbox(settings),
        installer=settings.installer[0],
        uv_bin=settings.installer[1],
    )


def build_storage(settings: Settings, storage_url: str | None = None) -> Storage:
    """Output storage from ``storage_url`` or the settings."""
    return open_storage(storage_url or settings.effective_storage_url,
                        endpoint_url=settings.s3_endpoint_url,
                        presign_ttl_s=settings.presign_ttl_s)


def make_input_fetcher(settings: Settings, fetcher: Fetcher, *,
                       allow_local_files: bool = False):
    """The function that fetches one caller file (https, runflow assets, local files)."""
    from runflow_worker.cache.errors import URLRefused
    sources = build_sources(settings, fetcher)

    def fetch(url: str, dest: Path, *, max_bytes: int,
              cancel: Callable[[], bool]) -> str | None:
        if url.startswith("file://"):
            if not allow_local_files:  # the contract check refuses these before; defence
                raise URLRefused("local files are not accepted here")
            shutil.copyfile(unquote(urlsplit(url).path), dest)
            return None
        # No fsync: the file lives as long as the run, which a crash ends anyway. The digest
        # was taken as the file was written: the caller need not read it again.
        return sources.fetch_to_file(url, dest, max_bytes=max_bytes, cancel=cancel,
                                     fsync=False).sha256

    return fetch


def build_pipeline(settings: Settings, *, storage: Storage | None = None,
                   allow_local_files: bool = False, child_entry: str | None = None,
                   cpu: bool | None = None,
                   sandbox_read_only: tuple[Path, ...] = (),
                   prestart: bool = False) -> Pipeline:
    """A pipeline wired from the settings (``child_entry`` swaps the ComfyUI child;
    ``sandbox_read_only`` adds paths the sandboxed child may read to
    ``RUNFLOW_SANDBOX_READ_ONLY``'s, for tests).

    ``prestart`` starts the ComfyUI child for the likely next run as early as it can: on a
    baked checkout before the pipeline is even imported (``run.childconfig``), otherwise
    once the environments are known (``Pipeline.prestart``).

    ``cpu`` (True: ComfyUI on the CPU, False: on CUDA) defaults to ``RUNFLOW_DEVICE``, else
    to the CPU for the class ``cpu`` and detection (CUDA where torch finds it) otherwise.
    """
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
        child_network=settings.host_network,
        sandbox_hidden=(settings.cache_dir,),
        sandbox_read_only=(*(Path(p) for p in settings.sandbox_read_only),
                           *sandbox_read_only),
    )
    supervisor = RunnerSupervisor()
    run_dirs = RunDirs(config.work_dir)
    # The baked checkout's child first, before the pipeline's own imports: its import of
    # ComfyUI (seconds) overlaps them, the cache parts', the daemon's and Redis.
    early = prestart_baked(supervisor, config, run_dirs) if prestart else None
    try:
        from runflow_worker.run.pipeline import Pipeline

        pipeline = Pipeline(config, storage=storage or build_storage(settings),
                            supervisor=supervisor, run_dirs=run_dirs,
                            prestarter=early[0] if early else None)
    except BaseException:  # bad storage settings: the early child must not outlive them
        supervisor.close()
        if early:
            early[0].shutdown(wait=True)
        run_dirs.close()
        raise
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
