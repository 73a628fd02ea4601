"""The published JSON Schemas of the run message and the run record, made from the models.

``docs/schema/run-message.schema.json`` is what the worker accepts from the queue (pydantic's
validation schema of ``RunMessage``); ``docs/schema/run-record.schema.json`` is what it writes
(the serialisation schema of ``RunRecord``). They are generated, never edited by hand::

    python -m runflow_worker.run.schemas            # rewrite docs/schema/
    python -m runflow_worker.run.schemas --check    # exit 1 when a file is not what the models give

The schemas describe shapes; the rules ``check_message`` applies on top (pins, URLs, input
types, graph links) are the contract's, in ``SPEC.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from runflow_worker.run.contract import RunMessage, RunRecord

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "docs" / "schema"
DIALECT = "https://json-schema.org/draft/2020-12/schema"


def schemas() -> dict[str, dict[str, Any]]:
    """``{file name: schema}`` for every published schema."""
    message = RunMessage.model_json_schema(mode="validation")
    record = RunRecord.model_json_schema(mode="serialization")
    return {
        "run-message.schema.json": {"$schema": DIALECT, **message},
        "run-record.schema.json": {"$schema": DIALECT, **record},
    }


def render(schema: dict[str, Any]) -> str:
    """The file content of one schema: stable key order, two-space indent, final newline."""
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def stale(directory: Path = SCHEMA_DIR) -> list[str]:
    """Names of the schema files in ``directory`` that are missing or differ from the models."""
    out: list[str] = []
    for name, schema in schemas().items():
        path = directory / name
        if not path.is_file() or path.read_text() != render(schema):
            out.append(name)
    return out


def write(directory: Path = SCHEMA_DIR) -> list[Path]:
    """Write every schema into ``directory``; return the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, schema in schemas().items():
        path = directory / name
        path.write_text(render(schema))
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    """``python -m runflow_worker.run.schemas [--check] [--dir DIR]``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m runflow_worker.run.schemas",
                                     description="generate the run message/record schemas")
    parser.add_argument("--check", action="store_true",
                        help="only compare: exit 1 when a file is stale")
    parser.add_argument("--dir", type=Path, default=SCHEMA_DIR, help="where the files are")
    args = parser.parse_args(argv)
    if args.check:
        names = stale(args.dir)
        for name in names:
            print(f"{args.dir / name} is stale: run python -m runflow_worker.run.schemas", file=sys.stderr)
        return 1 if names else 0
    for path in write(args.dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
