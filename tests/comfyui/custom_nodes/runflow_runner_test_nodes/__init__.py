"""Test-only ComfyUI node whose INPUT_TYPES holds an object of this pack's own class (as
many packs' ``AnyType`` does): ComfyUI's validation errors carry that entry, and the worker
process cannot import this module."""


class PackOnlyMarker:
    """Lives only in the ComfyUI process (this module is loaded by ComfyUI, not the worker)."""

    def __repr__(self):
        return "<pack-only marker>"


class RunflowRunnerTestMarkedInt:
    CATEGORY = "runflow_test"
    FUNCTION = "run"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 1, "min": 0, "max": 5,
                                               "marker": PackOnlyMarker()})}}

    def run(self, value):
        return {}


NODE_CLASS_MAPPINGS = {"RunflowRunnerTestMarkedInt": RunflowRunnerTestMarkedInt}
