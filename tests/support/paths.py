"""Where the tests are: the repository's root, which a subprocess puts on its ``PYTHONPATH``
to import ``runflow_worker`` and ``tests`` (the fake ComfyUI children among them)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
"""The repository's root."""
