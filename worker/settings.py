"""The one settings object, built once from ``RUNFLOW_*`` environment variables.

Every variable is documented in the README's configuration table. Other packages never read
the environment themselves: the worker passes them the plain values they need.
"""

from __future__ import annotations

import shutil
from functools import cached_property
from pathlib import Path
from typing import Annotated, NamedTuple

from pydantic import BeforeValidator, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_LADDER = (
    "cpu:0,t4:16,l4:24,a10g:24,l40s:48,a100-40gb:40,a100-80gb:80,h100:80,h200:141"
)


def _split_csv(value: object) -> object:
    """Turn ``"a,b , c"`` into ``("a", "b", "c")``; leave sequences as they are."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


CsvTuple = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_split_csv)]


class GpuClass(NamedTuple):
    """A rung of the GPU ladder."""

    name: str
    vram_gib: float


def parse_ladder(spec: str) -> tuple[GpuClass, ...]:
    """Parse ``class:vram_gib,...`` (ascending) into GpuClass rungs; raise ValueError if bad."""
    rungs: list[GpuClass] = []
    for part in _split_csv(spec):
        name, sep, vram = part.partition(":")
        if not sep or not name:
            raise ValueError(f"ladder entry {part!r} is not class:vram_gib")
        rungs.append(GpuClass(name.strip().lower(), float(vram)))
    names = [r.name for r in rungs]
    if len(set(names)) != len(names):
        raise ValueError("ladder has a class twice")
    if not rungs:
        raise ValueError("ladder is empty")
    return tuple(rungs)


class Settings(BaseSettings):
    """Frozen worker configuration. Build it once with ``Settings()`` (reads the environment)."""

    model_config = SettingsConfigDict(env_prefix="RUNFLOW_", frozen=True, extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    gpu_class: str | None = None
    gpu_ladder: str = DEFAULT_LADDER
    storage_url: str | None = None
    s3_endpoint_url: str | None = None
    asset_bucket: str | None = None
    presign_ttl_s: int = Field(3600, gt=0)
    cache_dir: Path = Path("~/.cache/runflow")
    cache_max_bytes: int | None = Field(None, gt=0)
    comfyui_dir: Path | None = None
    git_mirrors: CsvTuple = ()
    lease_s: float = Field(60.0, gt=0)
    max_deliveries: int = Field(3, ge=1)
    grace_s: float = Field(25.0, ge=0)
    idle_exit_s: float = Field(300.0, ge=0)
    webhook_secret: SecretStr | None = None
    url_allow: CsvTuple = ()
    http_port: int = Field(9090, ge=0, le=65535)
    callback_attempts: int = Field(5, ge=1)
    callback_backoff_s: float = Field(1.0, ge=0)
    pip_index_url: str | None = None
    pip_find_links: CsvTuple = ()
    # Additions (same prefix), documented in the README.
    ca_bundle: Path | None = None
    """Extra PEM CA bundle trusted for https fetches (private CAs, tests)."""
    fetch_max_bytes: int = Field(50 * 2**30, gt=0)
    """Largest single download (models included)."""
    input_max_bytes: int = Field(100 * 2**20, gt=0)
    """Largest caller-supplied input file."""
    fetch_timeout_s: float = Field(30.0, gt=0)
    """Connect/read inactivity timeout of one HTTP request."""
    image_max_pixels: int = Field(64 * 2**20, gt=0)
    """Pixel limit of an input image (decompression-bomb guard)."""
    events_maxlen: int = Field(100_000, gt=0)
    """Approximate cap of the ``runflow:events`` stream."""
    log_level: str = "INFO"
    model_mirrors: CsvTuple = ()
    """Directories searched for blobs by sha256 before any URL (offline operation)."""
    model_fetch_parallel: int = Field(4, ge=1, le=32)
    """Downloads of one run's missing models at a time."""
    cache_direct_io: bool = True
    """Write downloads of 64 MiB and more past the page cache (``O_DIRECT``) where supported."""
    env_max_count: int = Field(10, ge=0)
    """Prepared environments kept on the volume (least recently used, unused ones evicted
    after each new build); 0 keeps them all."""
    run_install_scripts: bool = False
    """Run custom nodes' ``install.py`` after their requirements, as ComfyUI-Manager does."""
    extra_custom_nodes: CsvTuple = ()
    """Directories of custom node packs loaded besides the checkout's ``custom_nodes/``."""
    origin_allow: CsvTuple = ()
    """Git origin prefixes accepted besides ``https://`` (e.g. an internal git server)."""
    runner_entry: str = "runtime.child:main"
    """``module:function`` run in the ComfyUI child (tests swap in a fake)."""
    lease_renewal: bool = True
    """Renew the lease of the running entry (only tests turn this off)."""
    startup_timeout_s: float = Field(600.0, gt=0)
    """How long ComfyUI may take to import and load its nodes."""

    @field_validator("cache_dir", "comfyui_dir", "ca_bundle", mode="after")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @field_validator("gpu_ladder", mode="after")
    @classmethod
    def _check_ladder(cls, value: str) -> str:
        parse_ladder(value)
        return value

    @cached_property
    def ladder(self) -> tuple[GpuClass, ...]:
        """The GPU ladder in ascending order."""
        return parse_ladder(self.gpu_ladder)

    @property
    def blobs_dir(self) -> Path:
        """Root of the content-addressed store (``<cache>/blobs``)."""
        return self.cache_dir / "blobs"

    @property
    def effective_storage_url(self) -> str:
        """Where outputs go: the configured URL, else ``file://<cache>/outputs``."""
        return self.storage_url or (self.cache_dir / "outputs").resolve().as_uri()

    def effective_cache_max_bytes(self) -> int:
        """The store budget: the configured bytes, else 80% of the cache volume."""
        if self.cache_max_bytes is not None:
            return self.cache_max_bytes
        probe = self.cache_dir
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        return int(shutil.disk_usage(probe).total * 0.8)

    def git_mirror_map(self) -> dict[str, Path]:
        """``RUNFLOW_GIT_MIRRORS`` as ``{origin: local path}``."""
        out: dict[str, Path] = {}
        for item in self.git_mirrors:
            origin, sep, path = item.partition("=")
            if sep:
                out[origin.strip()] = Path(path.strip()).expanduser()
        return out
