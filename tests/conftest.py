"""Project-wide test configuration: real-ComfyUI tests skip with a reason when no checkout."""

from __future__ import annotations

import os

import pytest

# The shared fixtures (a TLS server and its CA, fetchers, stores, S3): every folder has them.
pytest_plugins = ["tests.support.fixtures"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("RUNFLOW_TEST_COMFYUI"):
        return
    skip = pytest.mark.skip(
        reason="needs real ComfyUI: set RUNFLOW_TEST_COMFYUI to a ComfyUI checkout")
    for item in items:
        if item.get_closest_marker("comfyui"):
            item.add_marker(skip)
