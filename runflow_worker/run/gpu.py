"""Which GPU class this worker serves, and the ladder arithmetic of OOM promotion (SPEC §2, §6).

The class comes from ``RUNFLOW_GPU_CLASS``, else from the GPU NVML reports (name and VRAM
mapped onto the ladder), else ``cpu``. ``pynvml`` (package ``nvidia-ml-py``) is optional:
without it, or without a driver, detection finds nothing.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

from runflow_worker.errors import ConfigError
from runflow_worker.settings import GpuClass, Settings

log = logging.getLogger(__name__)

CPU_CLASS = "cpu"
_TOKEN = re.compile(r"[a-z0-9]+")
_NOISE_TOKENS = frozenset({"nvidia", "tesla", "geforce", "rtx", "pcie", "sxm", "sxm4", "sxm5",
                           "hbm3", "hbm3e", "nvl"})


@dataclass(frozen=True)
class GpuInfo:
    """What NVML says about GPU 0."""

    name: str
    vram_bytes: int

    @property
    def vram_gib(self) -> float:
        """Total memory in GiB."""
        return self.vram_bytes / 2**30


def detect_gpu() -> GpuInfo | None:
    """GPU 0 as NVML reports it, or None (no pynvml, no driver, no GPU)."""
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - NVMLError and friends: no driver here
        return None
    try:
        if pynvml.nvmlDeviceGetCount() < 1:
            return None
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(handle)
        if isinstance(name, bytes):
            name = name.decode(errors="replace")
        total = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
        return GpuInfo(name=str(name), vram_bytes=total)
    except Exception as exc:  # noqa: BLE001 - any NVML failure means "not detected"
        log.warning("NVML query failed: %s", exc)
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception as exc:  # noqa: BLE001 - detection is over either way
            log.debug("nvmlShutdown failed: %s", exc)


def _tokens(text: str) -> list[str]:
    return [t for t in _TOKEN.findall(text.lower()) if t not in _NOISE_TOKENS]


def class_for_gpu(info: GpuInfo, ladder: Iterable[GpuClass]) -> str | None:
    """The ladder class matching a GPU's name (VRAM breaks ties), or None.

    ``NVIDIA A100-SXM4-80GB`` -> ``a100-80gb``, ``NVIDIA L4`` -> ``l4`` (never ``l40s``:
    names are compared token by token). A GPU whose name matches no class maps to the
    largest class whose VRAM it has.
    """
    rungs = [r for r in ladder if r.name != CPU_CLASS]
    name_tokens = set(_tokens(info.name))
    best: tuple[int, float, str] | None = None
    for rung in rungs:
        class_tokens = _tokens(rung.name)
        if not class_tokens or class_tokens[0] not in name_tokens:
            continue
        matched = sum(1 for t in class_tokens if t in name_tokens)
        # Prefer more matched tokens, then the VRAM closest to the card's.
        key = (-matched, abs(rung.vram_gib - info.vram_gib), rung.name)
        if best is None or key < best:
            best = key
    if best is not None:
        return best[2]
    fitting = [r for r in rungs if r.vram_gib <= info.vram_gib * 1.02]
    return max(fitting, key=lambda r: r.vram_gib).name if fitting else None


def resolve_gpu_class(settings: Settings, override: str | None = None) -> str:
    """The class to serve: ``override``, ``RUNFLOW_GPU_CLASS``, NVML detection, else ``cpu``.

    An explicit class must be on the ladder (ConfigError otherwise).
    """
    names = [r.name for r in settings.ladder]
    explicit = (override or settings.gpu_class or "").strip().lower()
    if explicit:
        if explicit not in names:
            raise ConfigError(f"GPU class {explicit!r} is not on the ladder ({', '.join(names)})")
        return explicit
    info = detect_gpu()
    if info is not None:
        found = class_for_gpu(info, settings.ladder)
        if found is not None:
            log.info("detected GPU %s (%.0f GiB): class %s", info.name, info.vram_gib, found,
                     extra={"event": "gpu_detected", "gpu_class": found})
            return found
        log.warning("GPU %s matches no ladder class; serving cpu", info.name)
    return CPU_CLASS


def next_larger_class(current: str, ladder: Iterable[GpuClass], *,
                      explicit: Iterable[str] | None = None) -> str | None:
    """The next class above ``current`` for an OOM promotion, or None at the top.

    ``explicit`` (the workflow's ``gpu_explicit_models`` in explicit mode) restricts the
    choice to those classes.
    """
    names = [r.name for r in ladder]
    if current not in names:
        return None
    allowed = {e.strip().lower() for e in explicit} if explicit is not None else None
    for name in names[names.index(current) + 1:]:
        if allowed is None or name in allowed:
            return name
    return None


def resolve_device(settings: Settings, gpu_class: str) -> str:
    """Where ComfyUI runs for ``gpu_class``: ``RUNFLOW_DEVICE``, else ``cpu`` for the class
    ``cpu`` and ``cuda`` for every other class.

    ``cuda`` needs a GPU NVML can see: without one the worker would take runs it cannot run,
    so a ConfigError (one line: what is missing and how to run on the CPU instead) stops it
    before it takes any. A GPU NVML sees but CUDA cannot use (a driver too old for the
    image's CUDA) is found at the first ComfyUI start instead (``run.fitness``).
    """
    device = settings.device or (CPU_CLASS if gpu_class == CPU_CLASS else "cuda")
    if device == "cuda" and detect_gpu() is None:
        raise ConfigError(
            f"GPU class {gpu_class!r} needs a CUDA device and none is usable here (NVML "
            "finds no GPU: no NVIDIA driver, no device in the container, or nvidia-ml-py "
            "missing); set RUNFLOW_DEVICE=cpu to run ComfyUI on the CPU")
    return device
