"""The built-in node pack: its contract, and that an environment's own classes win."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from runflow_worker.runtime import nodepack
from runflow_worker.runtime.comfy import ComfyEmbedding


def test_contract_of_every_class() -> None:
    inputs = [c for c in nodepack.NODE_CLASS_MAPPINGS.values() if c.RUNFLOW_IO == "input"]
    outputs = [c for c in nodepack.NODE_CLASS_MAPPINGS.values() if c.RUNFLOW_IO == "output"]
    assert len(inputs) == 6 and len(outputs) == 2
    for cls in inputs:
        spec = cls.INPUT_TYPES()
        assert set(spec["required"]) == {"input_id"}
        assert {"display_name", "description", "value"} <= set(spec["optional"])
        assert spec["optional"]["value"][0] == ("STRING" if cls.RUNFLOW_TYPE == "FILE"
                                                else cls.RUNFLOW_TYPE)
    for cls in outputs:
        spec = cls.INPUT_TYPES()
        assert set(spec["required"]) == {"output_id", "value"} and cls.OUTPUT_NODE


def test_inputs_pass_values_through() -> None:
    assert nodepack.RunflowInputInt().run("n", value=7) == (7,)
    assert nodepack.RunflowInputString().run("s") == ("",)  # optional, never injected
    with pytest.raises(ValueError, match="has no value"):
        nodepack.RunflowInputImage().run("img")


def test_output_file_paths_stay_inside(tmp_path: Path) -> None:
    out = tmp_path / "output"
    (out / "videos").mkdir(parents=True)
    (out / "videos" / "a.mp4").write_bytes(b"v")
    (tmp_path / "secret").write_text("s")
    (out / "link").symlink_to(tmp_path / "secret")
    assert nodepack.resolve_output_file(str(out), "videos/a.mp4") == "videos/a.mp4"
    assert nodepack.resolve_output_file(str(out), "videos/a.mp4 [output]") == "videos/a.mp4"
    for bad in ("../secret", "/etc/passwd", "link", "x [temp]"):
        with pytest.raises(ValueError):
            nodepack.resolve_output_file(str(out), bad)
    with pytest.raises(FileNotFoundError):
        nodepack.resolve_output_file(str(out), "missing.bin")


def test_environment_classes_win() -> None:
    class Theirs:
        pass

    embedding = ComfyEmbedding({"comfyui_dir": ".", "base_dir": "."})
    embedding._nodes = SimpleNamespace(NODE_CLASS_MAPPINGS={"RunflowInputString": Theirs},
                                       NODE_DISPLAY_NAME_MAPPINGS={})
    embedding._register_runflow_nodes()
    mapping = embedding._nodes.NODE_CLASS_MAPPINGS
    assert mapping["RunflowInputString"] is Theirs
    assert mapping["RunflowOutputImage"] is nodepack.RunflowOutputImage
    assert len(mapping) == 8
