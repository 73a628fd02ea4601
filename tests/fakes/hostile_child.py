"""A hostile ComfyUI child: ``tests.fakes.fake_child`` plus attacks on the runner's channel.

What a malicious custom node can do with the descriptors it inherits:

- config ``env`` key ``hostile_start_marker`` (a path): at start, before Ready, write a
  crafted pickle frame (``pickle_frame``) on every descriptor in ``/proc/self/fd``, once
  (the marker file is created then, so the next start is honest);
- ``hostile_canary``: the path the pickle's ``__reduce__`` would create were it unpickled
  (only a parent that unpickles what the child sends creates it);
- ``hostile_stray`` ("1"): send a well-formed ``NodeStarted`` before Ready;
- node ``HostilePickle``: when the job arrives, the same pickle frame on every descriptor;
- node ``HostileFrame`` with ``inputs["kind"]``: one raw frame on the channel (``FRAMES``):
  ``oversized``, ``garbage``, ``bad_json``, ``unknown_type``, ``wrong_types``,
  ``bad_outputs``, ``other_job``;
- node ``HostileLog`` with ``inputs["line"]`` and ``inputs["count"]``: writes the line to
  stderr ``count`` times (a forged log line, a flood).

After an attack the child carries on as the fake child does (the runner must stop it).
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import sys
from pathlib import Path
from typing import Any

from runflow_worker.runtime import protocol as p
from tests.fakes import fake_child


class _Canary:
    """Unpickling this creates the file ``path`` (what an attacker's payload would run)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def pickle_frame(canary: str) -> bytes:
    """A ``multiprocessing.connection`` frame (4-byte length, pickle) carrying ``_Canary``."""
    payload = pickle.dumps(_Canary(canary))
    return struct.pack("!i", len(payload)) + payload


def write_everywhere(data: bytes) -> int:
    """Write ``data`` on every open descriptor; the number of writes that went through."""
    written = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            os.write(int(name), data)
            written += 1
        except OSError:
            continue  # read-only, a directory, the listing's own descriptor
    return written


def raw_frame(payload: bytes) -> bytes:
    """A frame of the runner's wire format: 4-byte big-endian length, payload."""
    return struct.pack(">I", len(payload)) + payload


def _json(obj: dict[str, Any]) -> bytes:
    return raw_frame(json.dumps(obj).encode())


def frames(kind: str, job_id: str) -> bytes:
    """The raw bytes of the ``HostileFrame`` attack ``kind`` for job ``job_id``."""
    if kind == "oversized":
        return struct.pack(">I", 1 << 30) + b"{" * 1024
    if kind == "garbage":
        return raw_frame(b"\xff\xfe\x00garbage\x80")
    if kind == "bad_json":
        return raw_frame(b'{"type": "Log", ')
    if kind == "unknown_type":
        return _json({"type": "Evil", "job_id": job_id})
    if kind == "wrong_types":
        return _json({"type": "Progress", "job_id": job_id, "node_id": "1", "value": "3",
                      "total": 10})
    if kind == "bad_outputs":
        return _json({"type": "Done", "job_id": job_id, "outputs": [{"node_id": "1"}],
                      "execute_s": 1.0, "peak_vram_bytes": None})
    if kind == "other_job":
        return _json({"type": "Done", "job_id": "someone-else", "outputs": [],
                      "execute_s": 1.0, "peak_vram_bytes": None})
    raise ValueError(kind)


class _Conn:
    """The child's end of the channel, attacking as each job arrives."""

    def __init__(self, conn: Any, env: dict[str, str]) -> None:
        self._conn = conn
        self._env = env

    def fileno(self) -> int:
        return self._conn.fileno()

    def recv(self) -> Any:
        msg = self._conn.recv()
        if isinstance(msg, p.Execute):
            self._attack(msg)
        return msg

    def send(self, msg: Any) -> None:
        if self._env.get("hostile_stray") and isinstance(msg, p.Ready):
            os.write(self.fileno(), _json({"type": "NodeStarted", "job_id": "x",
                                           "node_id": "1", "node_type": None}))
        self._conn.send(msg)

    def _attack(self, job: p.Execute) -> None:
        for node in job.graph.values():
            kind, inputs = node.get("class_type"), node.get("inputs", {})
            if kind == "HostilePickle":
                write_everywhere(pickle_frame(self._env["hostile_canary"]))
            elif kind == "HostileFrame":
                os.write(self.fileno(), frames(inputs["kind"], job.job_id))
            elif kind == "HostileLog":
                line = (str(inputs["line"]) + "\n").encode()
                for _ in range(int(inputs.get("count", 1))):
                    sys.stderr.buffer.write(line)
                sys.stderr.flush()


def main(conn: Any, config: dict[str, Any]) -> None:
    """Entry point (``tests.fakes.hostile_child:main``)."""
    env = config.get("env") or {}
    marker = env.get("hostile_start_marker")
    if marker and not os.path.exists(marker):
        Path(marker).touch()
        write_everywhere(pickle_frame(env["hostile_canary"]))
    fake_child.main(_Conn(conn, env), config)
