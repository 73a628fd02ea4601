"""The built-in Runflow node pack, loaded into ComfyUI by the runner child.

Same contract as the public ComfyUI-Runflow plugin: inputs have the widgets ``input_id``,
``display_name``, ``description`` and an optional ``value`` socket of their type, and pass
the value through; outputs have ``output_id``, ``output_name`` and a required ``value``, are
OUTPUT_NODEs, and carry ``RUNFLOW_IO`` / ``RUNFLOW_TYPE``. If the environment's custom nodes
define these classes, theirs win (the runner registers ours only for missing names).

Importing this module imports neither ComfyUI nor torch; the nodes import them when they
run, inside the child.
"""

from __future__ import annotations

import os
from typing import Any

from runflow_worker.runtime.graph import file_reference_problem

_WIDGETS = {
    "display_name": ("STRING", {"default": ""}),
    "description": ("STRING", {"default": "", "multiline": True}),
}

# A Runflow input whose value was never injected (an optional input without a default)
# yields its type's zero value; IMAGE and FILE have none and fail with a clear message.
_ZERO: dict[str, Any] = {"STRING": "", "INT": 0, "FLOAT": 0.0, "BOOLEAN": False}


class _RunflowInput:
    RUNFLOW_IO = "input"
    RUNFLOW_TYPE = "STRING"
    SOCKET = "STRING"
    DEFAULT_ID = "input"
    CATEGORY = "Runflow/Input"
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        """Widgets plus the optional typed ``value`` socket."""
        return {
            "required": {"input_id": ("STRING", {"default": cls.DEFAULT_ID})},
            # Display widgets are optional so graphs that omit them still validate.
            "optional": {**_WIDGETS, "value": (cls.SOCKET, {"forceInput": True})},
        }

    def run(self, input_id: str, display_name: str = "", description: str = "",
            value: Any = None) -> tuple[Any]:
        """Pass the injected value through."""
        if value is None:
            if self.RUNFLOW_TYPE not in _ZERO:
                raise ValueError(f"Runflow input {input_id!r} has no value")
            value = _ZERO[self.RUNFLOW_TYPE]
        return (value,)


def _input_class(name: str, kind: str, socket: str, default_id: str) -> type:
    return type(name, (_RunflowInput,), {
        "RUNFLOW_TYPE": kind, "SOCKET": socket, "DEFAULT_ID": default_id,
        "RETURN_TYPES": (socket,), "RETURN_NAMES": ("value",),
    })


RunflowInputString = _input_class("RunflowInputString", "STRING", "STRING", "string_input")
RunflowInputInt = _input_class("RunflowInputInt", "INT", "INT", "int_input")
RunflowInputFloat = _input_class("RunflowInputFloat", "FLOAT", "FLOAT", "float_input")
RunflowInputBoolean = _input_class("RunflowInputBoolean", "BOOLEAN", "BOOLEAN", "boolean_input")
RunflowInputImage = _input_class("RunflowInputImage", "IMAGE", "IMAGE", "image_input")
RunflowInputFile = _input_class("RunflowInputFile", "FILE", "STRING", "file_input")


def output_relpath(value: str) -> str:
    """Normalise a RunflowOutputFile value to a path relative to output/, or raise."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("Runflow Output (File) needs a file path")
    path = value.strip()
    path = path.removesuffix(" [output]")
    why = file_reference_problem(path)
    if why:
        raise ValueError(f"Runflow Output (File) path {value!r} {why}")
    return os.path.normpath(path)


def resolve_output_file(output_dir: str, value: str) -> str:
    """The file's path relative to ``output_dir``; refuses anything that escapes it."""
    rel = output_relpath(value)
    root = os.path.realpath(output_dir)
    real = os.path.realpath(os.path.join(root, rel))
    if os.path.commonpath([root, real]) != root:
        raise ValueError(f"Runflow Output (File) path {value!r} escapes the output directory")
    if not os.path.isfile(real):
        raise FileNotFoundError(f"Runflow Output (File): {value!r} is not a file under output/")
    return os.path.relpath(real, root)


class _RunflowOutput:
    RUNFLOW_IO = "output"
    OUTPUT_NODE = True
    CATEGORY = "Runflow/Output"
    FUNCTION = "run"
    RETURN_TYPES: tuple[str, ...] = ()


class RunflowOutputImage(_RunflowOutput):
    """Saves every image of the batch as PNG under output/, named by ``output_id``."""

    RUNFLOW_TYPE = "IMAGE"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        """``output_id``, the required IMAGE ``value``, optional ``output_name``."""
        return {"required": {
            "output_id": ("STRING", {"default": "image_output"}),
            "value": ("IMAGE",),
        }, "optional": {"output_name": ("STRING", {"default": ""})}}

    def run(self, output_id: str, value: Any, output_name: str = "") -> dict[str, Any]:
        """Write ``<output_id>_<n>_.png`` for each image; announce them in the ui."""
        import folder_paths
        import numpy as np
        from PIL import Image

        out_dir = folder_paths.get_output_directory()
        prefix = output_relpath(output_id.replace(os.sep, "_") or "image_output")
        full_dir, name, counter, subfolder, _ = folder_paths.get_save_image_path(
            prefix, out_dir, value[0].shape[1], value[0].shape[0])
        results = []
        for image in value:
            array = np.clip(255.0 * image.cpu().numpy(), 0, 255).astype(np.uint8)
            filename = f"{name}_{counter:05}_.png"
            # No prompt/workflow metadata: an API output must not leak the graph.
            Image.fromarray(array).save(os.path.join(full_dir, filename), compress_level=4)
            results.append({"filename": filename, "subfolder": subfolder, "type": "output"})
            counter += 1
        return {"ui": {"images": results}}


class RunflowOutputFile(_RunflowOutput):
    """Announces a file an upstream node already wrote under output/."""

    RUNFLOW_TYPE = "FILE"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        """``output_id``, the required path ``value``, optional ``output_name``."""
        return {"required": {
            "output_id": ("STRING", {"default": "file_output"}),
            "value": ("STRING", {"forceInput": True}),
        }, "optional": {"output_name": ("STRING", {"default": ""})}}

    def run(self, output_id: str, value: str, output_name: str = "") -> dict[str, Any]:
        """Check the path stays inside output/ and announce the file."""
        import folder_paths

        rel = resolve_output_file(folder_paths.get_output_directory(), value)
        sub, _, name = rel.replace(os.sep, "/").rpartition("/")
        return {"ui": {"runflow_files": [{"filename": name, "subfolder": sub, "type": "output"}]}}


NODE_CLASS_MAPPINGS: dict[str, type] = {
    cls.__name__: cls for cls in (
        RunflowInputString, RunflowInputInt, RunflowInputFloat, RunflowInputBoolean,
        RunflowInputImage, RunflowInputFile, RunflowOutputImage, RunflowOutputFile,
    )
}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "RunflowInputString": "Runflow Input (String)",
    "RunflowInputInt": "Runflow Input (Int)",
    "RunflowInputFloat": "Runflow Input (Float)",
    "RunflowInputBoolean": "Runflow Input (Boolean)",
    "RunflowInputImage": "Runflow Input (Image)",
    "RunflowInputFile": "Runflow Input (File)",
    "RunflowOutputImage": "Runflow Output (Image)",
    "RunflowOutputFile": "Runflow Output (File)",
}
