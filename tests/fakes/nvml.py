"""Fake ``pynvml`` modules: put the folder ``fake_pynvml`` writes first on a subprocess's
``PYTHONPATH`` and the worker finds this GPU (or this missing driver) through NVML."""

from __future__ import annotations

from pathlib import Path

ONE_L4 = """
class _Memory:
    total = 24 * 2**30


def nvmlInit(): pass
def nvmlShutdown(): pass
def nvmlDeviceGetCount(): return 1
def nvmlDeviceGetHandleByIndex(index): return index
def nvmlDeviceGetName(handle): return b"NVIDIA L4"
def nvmlDeviceGetMemoryInfo(handle): return _Memory()
"""
"""One NVIDIA L4 with 24 GiB."""

NO_DRIVER = """
class NVMLError(Exception):
    pass


def nvmlInit():
    raise NVMLError("Driver Not Loaded")
"""
"""No driver: NVML fails to initialise."""


def fake_pynvml(directory: Path, source: str) -> Path:
    """``directory`` (made here) holding ``pynvml.py`` with ``source``."""
    directory.mkdir()
    (directory / "pynvml.py").write_text(source)
    return directory
