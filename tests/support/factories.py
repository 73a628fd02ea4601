"""Builders of run messages for tests."""

from __future__ import annotations

import copy
from typing import Any

COMMIT = "a125cd84b054a57729b5eecab930ca9408719832"
SHA = "ab" * 32

BASE_GRAPH: dict[str, Any] = {
    "1": {"class_type": "RunflowInputString", "inputs": {"input_id": "prompt"}},
    "2": {"class_type": "FakeSave", "inputs": {"text": ["1", 0], "output_id": "out"}},
}


def workflow(graph: dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """A valid deployed workflow around ``graph``."""
    wf: dict[str, Any] = {
        "id": "wf-1", "owner": "acme", "slug": "demo", "version": "v1",
        "workflow_json": copy.deepcopy(graph if graph is not None else BASE_GRAPH),
        "custom_nodes": {},
        "environment": {"comfyui": {"origin": "https://github.com/comfyanonymous/ComfyUI",
                                    "commit": COMMIT, "dirty": False}, "packages": []},
        "models": {}, "resources": {},
        "gpu_mode": "auto", "gpu_explicit_models": [],
    }
    wf.update(overrides)
    return wf


def message(graph: dict[str, Any] | None = None, *, input: dict[str, Any] | None = None,
            run_id: str = "run-1", wf: dict[str, Any] | None = None,
            **overrides: Any) -> dict[str, Any]:
    """A valid run message dict."""
    msg: dict[str, Any] = {
        "run_id": run_id, "attempt": 1, "created_at": "2026-11-22T10:00:00Z",
        "workflow": wf if wf is not None else workflow(graph),
        "input": input if input is not None else {"prompt": "a sea otter"},
    }
    msg.update(overrides)
    return msg
