"""The one settings object, built once from ``RUNFLOW_*`` environment variables.

Every variable is documented in the README's configuration table. Other packages never read
the environment themselves: the worker passes them the plain values they need.

Every value is checked when the object is built: a bad one raises ``InvalidSettings`` (a
``ConfigError``) whose message names each offending ``RUNFLOW_*`` variable and what it
expects, and never repeats a secret (the webhook secret, credentials in URLs). An empty
variable counts as unset.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import re
import shutil
import ssl
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, NamedTuple
from urllib.parse import urlsplit

from pydantic import (
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings import SettingsError as SourceError

from runflow_worker.cache.credentials import CredentialsError, URLCredentials
from runflow_worker.cache.installer import resolve_installer
from runflow_worker.cache.trust import CATrust
from runflow_worker.cache.urlpolicy import allow_entry_problem
from runflow_worker.errors import ConfigError
from runflow_worker.logs import redact

ENV_PREFIX = "RUNFLOW_"

DEFAULT_LADDER = (
    "cpu:0,t4:16,l4:24,a10g:24,l40s:48,a100-40gb:40,a100-80gb:80,h100:80,h200:141"
)

MAX_PRESIGN_TTL_S = 7 * 24 * 3600
"""SigV4 presigned URLs live at most 7 days: S3 refuses links signed for longer."""
MAX_SECONDS = 365 * 24 * 3600.0
"""Upper bound of every duration setting (a year; larger values overflow timers)."""
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEVICES = ("cuda", "cpu")

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ENTRY_POINT = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


class InvalidSettings(ConfigError, ValueError):
    """One or more ``RUNFLOW_*`` variables are invalid.

    ``problems`` holds ``(variable, what is expected)`` pairs; the message is them on one
    line. Values of secrets never appear in either.
    """

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{var}: {text}" for var, text in problems))


def env_name(field: str) -> str:
    """The environment variable of a settings field (``lease_s`` -> ``RUNFLOW_LEASE_S``); a
    field read from a variable of another convention is named by it (``SSL_CERT_FILE``)."""
    if field.isupper():
        return field
    return f"{ENV_PREFIX}{field.upper()}"


def _problems(exc: ValidationError) -> list[tuple[str, str]]:
    """``(variable, message)`` for each error, without the offending input values."""
    out: list[tuple[str, str]] = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = err.get("loc") or ()
        var = env_name(loc[0]) if loc and isinstance(loc[0], str) else f"{ENV_PREFIX}*"
        ctx = err.get("ctx") or {}
        if err["type"] == "value_error" and "error" in ctx:
            text = str(ctx["error"])
        else:  # pydantic's own wording, never with the input: "Input should be ..."
            text = err["msg"]
            if text.startswith("Input should be "):
                text = "expected " + text.removeprefix("Input should be ")
        out.append((var, text))
    return out


def _split_csv(value: object) -> object:
    """Turn ``"a,b , c"`` into ``("a", "b", "c")``; leave sequences as they are."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


CsvTuple = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_split_csv)]
Seconds = Annotated[float, Field(le=MAX_SECONDS)]


class GpuClass(NamedTuple):
    """A rung of the GPU ladder."""

    name: str
    vram_gib: float


def parse_ladder(spec: str) -> tuple[GpuClass, ...]:
    """Parse ``class:vram_gib,...`` (ascending) into GpuClass rungs; raise ValueError if bad."""
    rungs: list[GpuClass] = []
    for part in _split_csv(spec):
        name, sep, vram = part.partition(":")
        try:
            vram_gib = float(vram)
        except ValueError:
            vram_gib = math.nan
        if not sep or not name.strip() or not math.isfinite(vram_gib) or vram_gib < 0:
            raise ValueError(f"ladder entry {part!r} is not class:vram_gib "
                             "(a name and a number of GiB >= 0)")
        rungs.append(GpuClass(name.strip().lower(), vram_gib))
    names = [r.name for r in rungs]
    if len(set(names)) != len(names):
        raise ValueError("ladder has a class twice")
    if not rungs:
        raise ValueError("ladder is empty")
    return tuple(rungs)


class Settings(BaseSettings):
    """Frozen worker configuration. Build it once with ``Settings()`` (reads the environment).

    Raises ``InvalidSettings`` naming every bad ``RUNFLOW_*`` variable.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore",
                                      env_ignore_empty=True, allow_inf_nan=False)

    redis_url: str = "redis://127.0.0.1:6379/0"
    gpu_ladder: str = DEFAULT_LADDER
    gpu_class: str | None = None
    storage_url: str | None = None
    s3_endpoint_url: str | None = None
    asset_bucket: str | None = None
    presign_ttl_s: int = Field(3600, gt=0)
    cache_dir: Path = Path("~/.cache/runflow")
    cache_max_bytes: int | None = Field(None, gt=0)
    comfyui_dir: Path | None = None
    git_mirrors: CsvTuple = ()
    lease_s: Seconds = Field(60.0, gt=0)
    max_deliveries: int = Field(3, ge=1)
    grace_s: Seconds = Field(25.0, ge=0)
    idle_exit_s: Seconds = Field(300.0, ge=0)
    webhook_secret: SecretStr | None = None
    url_allow: CsvTuple = ()
    http_port: int = Field(9090, ge=0, le=65535)
    callback_attempts: int = Field(5, ge=1)
    callback_backoff_s: Seconds = Field(1.0, ge=0)
    pip_index_url: str | None = None
    pip_find_links: CsvTuple = ()
    # Additions (same prefix), documented in the README.
    ca_bundle: Path | None = None
    """Extra PEM CA bundle trusted for https fetches (private CAs, tests)."""
    fetch_max_bytes: int = Field(50 * 2**30, gt=0)
    """Largest single download (models included)."""
    input_max_bytes: int = Field(100 * 2**20, gt=0)
    """Largest caller-supplied input file."""
    fetch_timeout_s: Seconds = Field(30.0, gt=0)
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
    runner_entry: str = "runflow_worker.runtime.child:main"
    """``module:function`` run in the ComfyUI child (tests swap in a fake)."""
    lease_renewal: bool = True
    """Renew the lease of the running entry (only tests turn this off)."""
    startup_timeout_s: Seconds = Field(600.0, gt=0)
    """How long ComfyUI may take to import and load its nodes."""
    device: str | None = None
    """Where ComfyUI runs: ``cuda`` or ``cpu``; unset, ``cpu`` for the class ``cpu`` and
    ``cuda`` for every other class (``run.gpu.resolve_device``)."""
    max_unfit_starts: int = Field(3, ge=1)
    """Consecutive ComfyUI starts that failed through the worker's own fault (CUDA, a full
    disk, a missing checkout) after which ``serve`` exits 3 so it is replaced."""
    child_env_pass: CsvTuple = ()
    """Environment variables passed to the ComfyUI child despite its credential scrub."""
    sandbox: str = "bwrap"
    """``bwrap``: custom-node code (the ComfyUI child, environment builds) runs in a
    bubblewrap sandbox, and the worker refuses to start without one; ``none``: unconfined,
    said at start, by ``doctor`` and in the logs (``docs/sandbox.md``)."""
    child_network: str = "none"
    """``none``: the sandboxed ComfyUI child has only its own loopback; ``host``: it shares
    the worker's network (API nodes need it; so does whatever a hostile node sends)."""
    sandbox_read_only: CsvTuple = ()
    """Absolute paths the sandboxed child may read besides the system and its environment:
    libraries the machine's Python or GPU driver loads from elsewhere (``docs/sandbox.md``)."""
    env_installer: str | None = Field(None, validate_default=True)
    """What installs environments' requirements: ``uv`` or ``pip``; unset, uv where it is
    installed, else pip (``cache.installer``)."""
    url_credentials: str | None = Field(None, validate_default=True)
    """Per-host credential headers for downloads (``cache.credentials``): entries, or the path
    of a file holding them; ``HF_TOKEN`` counts for Hugging Face hosts."""
    # The system's trust settings, by the names OpenSSL, curl, pip and httpx read.
    ssl_cert_file: Path | None = Field(None, validation_alias="SSL_CERT_FILE")
    """A PEM bundle trusted besides the public roots (skipped when it does not exist)."""
    ssl_cert_dir: str | None = Field(None, validation_alias="SSL_CERT_DIR")
    """Hashed certificate directories (``:``-separated) trusted besides the public roots."""

    def __init__(self, **values: Any) -> None:
        """Read the environment (``values`` override it); InvalidSettings when a value is bad."""
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise InvalidSettings(_problems(exc)) from None
        except SourceError as exc:  # a value the environment source could not even parse
            raise InvalidSettings([(f"{ENV_PREFIX}*", str(exc))]) from None

    @field_validator("cache_dir", "comfyui_dir", "ca_bundle", mode="after")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @field_validator("ca_bundle", mode="after")
    @classmethod
    def _check_ca_bundle(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value} is not a file (expected a PEM CA bundle)")
        return value

    @field_validator("ssl_cert_file", mode="after")
    @classmethod
    def _check_ssl_cert_file(cls, value: Path | None) -> Path | None:
        if value is None or not value.is_file():
            return value  # OpenSSL skips a file that is not there; so does the worker
        try:
            ssl.create_default_context(cafile=str(value))
        except (ssl.SSLError, OSError, ValueError):
            raise ValueError(f"{value} holds no usable PEM certificate") from None
        return value

    @field_validator("env_installer", mode="after")
    @classmethod
    def _check_env_installer(cls, value: str | None) -> str | None:
        resolve_installer(value)  # ValueError: unknown, or uv asked for and not installed
        return value

    @field_validator("url_credentials", mode="after")
    @classmethod
    def _check_url_credentials(cls, value: str | None) -> str | None:
        try:  # the secrets themselves are read (once more) by ``credentials``
            URLCredentials.parse(value, os.environ)
        except CredentialsError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("redis_url", mode="after")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        # The URL may hold a password: the messages never repeat it.
        expected = ("expected redis://[:password@]host[:port][/db], rediss://... "
                    "or unix:///path/to/socket")
        try:
            parts = urlsplit(value)
            port = parts.port
        except ValueError:
            raise ValueError(f"malformed URL or port; {expected}") from None
        if parts.scheme == "unix":
            if not parts.path:
                raise ValueError(f"no socket path; {expected}")
        elif parts.scheme in ("redis", "rediss"):
            if not parts.hostname or port == 0:
                raise ValueError(f"no host or port 0; {expected}")
            db = parts.path.lstrip("/")
            if db and not db.isdigit():
                raise ValueError(f"the database is not a number; {expected}")
        else:
            raise ValueError(f"unsupported scheme {parts.scheme or '(none)'!r}; {expected}")
        return value

    @field_validator("gpu_ladder", mode="after")
    @classmethod
    def _check_ladder(cls, value: str) -> str:
        parse_ladder(value)
        return value

    @field_validator("gpu_class", mode="after")
    @classmethod
    def _check_gpu_class(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or not value.strip():
            return None
        name = value.strip().lower()
        ladder = info.data.get("gpu_ladder")
        if ladder is not None:  # a bad ladder is reported on its own
            names = [r.name for r in parse_ladder(ladder)]
            if name not in names:
                raise ValueError(f"class {name!r} is not on the ladder "
                                 f"(expected one of {', '.join(names)})")
        return name

    @field_validator("presign_ttl_s", mode="after")
    @classmethod
    def _check_presign_ttl(cls, value: int) -> int:
        if value > MAX_PRESIGN_TTL_S:
            raise ValueError(f"expected at most {MAX_PRESIGN_TTL_S} seconds (7 days: S3 "
                             "refuses presigned URLs signed for longer)")
        return value

    @field_validator("storage_url", mode="after")
    @classmethod
    def _check_storage_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        expected = "expected s3://bucket/prefix or file:///dir"
        parts = urlsplit(value)
        if parts.scheme == "s3":
            if not parts.hostname:
                raise ValueError(f"no bucket; {expected}")
        elif parts.scheme == "file":
            if not parts.path.startswith("/"):
                raise ValueError(f"no absolute directory; {expected}")
        else:
            raise ValueError(f"unsupported scheme {parts.scheme or '(none)'!r}; {expected}")
        return value

    @field_validator("s3_endpoint_url", mode="after")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise ValueError("malformed URL; expected http(s)://host[:port]") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("expected http(s)://host[:port]")
        return value

    @field_validator("git_mirrors", mode="after")
    @classmethod
    def _check_git_mirrors(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for n, item in enumerate(value, 1):
            origin, sep, path = item.partition("=")
            if not sep or not origin.strip() or not path.strip():
                raise ValueError(f"entry {n} ({redact(item)!r}) is not origin=path "
                                 "(expected origin=path,...)")
        return value

    @field_validator("url_allow", mode="after")
    @classmethod
    def _check_url_allow(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            why = allow_entry_problem(item)
            if why:
                raise ValueError(f"entry {redact(item)!r} {why}")
        return value

    @field_validator("webhook_secret", mode="after")
    @classmethod
    def _check_webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        raw = value.get_secret_value().removeprefix("whsec_")
        try:
            key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
        except (binascii.Error, ValueError):
            key = b""
        if not key:  # the message never repeats the secret
            raise ValueError("not a Standard Webhooks secret (expected whsec_ followed by "
                             "base64, e.g. whsec_ + 24 to 64 random bytes in base64)")
        return value

    @field_validator("log_level", mode="after")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        level = value.strip().upper()
        level = "WARNING" if level == "WARN" else level
        if level not in LOG_LEVELS:
            raise ValueError(f"unknown level {value!r} (expected one of {', '.join(LOG_LEVELS)})")
        return level

    @field_validator("device", mode="after")
    @classmethod
    def _check_device(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        device = value.strip().lower()
        if device not in DEVICES:
            raise ValueError(f"unknown device {value!r} (expected one of {', '.join(DEVICES)})")
        return device

    @field_validator("runner_entry", mode="after")
    @classmethod
    def _check_runner_entry(cls, value: str) -> str:
        if not _ENTRY_POINT.fullmatch(value.strip()):
            raise ValueError(f"{value!r} is not module:function")
        return value.strip()

    @field_validator("sandbox_read_only", mode="after")
    @classmethod
    def _check_read_only(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            if not os.path.isabs(entry):
                raise ValueError(f"{entry!r} is not an absolute path")
            if not os.path.exists(entry):
                raise ValueError(f"{entry!r} does not exist")
        return value

    @field_validator("sandbox", "child_network", mode="after")
    @classmethod
    def _check_choice(cls, value: str, info: ValidationInfo) -> str:
        choices = {"sandbox": ("bwrap", "none"), "child_network": ("none", "host")}
        word = value.strip().lower()
        if word not in choices[str(info.field_name)]:
            raise ValueError(f"unknown value {value!r} (expected "
                             f"{' or '.join(choices[str(info.field_name)])})")
        return word

    @property
    def sandboxed(self) -> bool:
        """True unless the operator turned the sandbox off (``RUNFLOW_SANDBOX=none``)."""
        return self.sandbox == "bwrap"

    @property
    def host_network(self) -> bool:
        """True when the sandboxed ComfyUI child shares the worker's network
        (``RUNFLOW_CHILD_NETWORK=host``)."""
        return self.child_network == "host"

    @field_validator("child_env_pass", mode="after")
    @classmethod
    def _check_child_env_pass(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for n, name in enumerate(value, 1):
            if "=" in name:  # NAME=value: the value may be a credential, never shown
                raise ValueError(f"entry {n} has '=': expected variable names only "
                                 "(e.g. HF_TOKEN), never values")
            if not _ENV_NAME.fullmatch(name):
                raise ValueError(f"entry {name!r} is not an environment variable name "
                                 "(expected letters, digits and _, not starting with a digit)")
        return value

    @cached_property
    def installer(self) -> tuple[str, str | None]:
        """``(installer, uv executable or None)`` that builds environments."""
        return resolve_installer(self.env_installer)

    @cached_property
    def credentials(self) -> URLCredentials:
        """The per-host download credentials, their secrets read from the environment once."""
        return URLCredentials.parse(self.url_credentials, os.environ)

    @cached_property
    def ca_trust(self) -> CATrust:
        """Authorities trusted for https besides the public roots: ``RUNFLOW_CA_BUNDLE``,
        ``SSL_CERT_FILE`` and ``SSL_CERT_DIR``."""
        return CATrust.from_paths([self.ca_bundle, self.ssl_cert_file], [self.ssl_cert_dir])

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
        for item in self.git_mirrors:  # every entry has "=" (checked when built)
            origin, _, path = item.partition("=")
            out[origin.strip()] = Path(path.strip()).expanduser()
        return out
