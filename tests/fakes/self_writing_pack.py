"""A custom node pack that writes into its own folder at import (as many real packs do:
a settings file, a downloaded asset), then reads it back."""

from __future__ import annotations

import os

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "written_at_import.txt"), "w") as fh:
    fh.write("written at import")


class SelfWriter:
    """Returns what the pack wrote at import."""

    def run(self, job: dict, **_: object) -> str:
        with open(os.path.join(HERE, "written_at_import.txt")) as fh:
            return fh.read()


NODE_CLASS_MAPPINGS = {"SelfWriter": SelfWriter}
