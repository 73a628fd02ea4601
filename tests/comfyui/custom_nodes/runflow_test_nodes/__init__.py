"""Test-only ComfyUI nodes: failures on demand, a slow interruptible node, a text writer."""

import os
import signal
import time

import folder_paths


class RunflowTestWriteText:
    """Writes ``text`` plus the content of input file ``file`` under output/; returns its path."""

    CATEGORY = "runflow_test"
    FUNCTION = "run"
    RETURN_TYPES = ("STRING",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"forceInput": True}),
                             "file": ("STRING", {"forceInput": True})}}

    def run(self, text, file):
        with open(os.path.join(folder_paths.get_input_directory(), file)) as fh:
            content = fh.read()
        rel = os.path.join("texts", "note.txt")
        path = os.path.join(folder_paths.get_output_directory(), rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            fh.write(f"{text}\n{content}")
        return (rel,)


class RunflowTestRaise:
    CATEGORY = "runflow_test"
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",)}}

    def run(self, image):
        raise ValueError("test node exploded")


class RunflowTestOOM:
    CATEGORY = "runflow_test"
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",)}}

    def run(self, image):
        import torch

        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


class RunflowTestSleep:
    """Sleeps ``steps`` x 50 ms reporting progress (interruptible through the hook)."""

    CATEGORY = "runflow_test"
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "steps": ("INT", {"default": 10, "min": 1})}}

    def run(self, image, steps):
        import comfy.utils

        bar = comfy.utils.ProgressBar(steps)
        for _ in range(steps):
            time.sleep(0.05)
            bar.update(1)
        return (image,)


class RunflowTestCrash:
    CATEGORY = "runflow_test"
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",)}}

    def run(self, image):
        os.kill(os.getpid(), signal.SIGSEGV)


NODE_CLASS_MAPPINGS = {c.__name__: c for c in (
    RunflowTestWriteText, RunflowTestRaise, RunflowTestOOM, RunflowTestSleep, RunflowTestCrash)}
