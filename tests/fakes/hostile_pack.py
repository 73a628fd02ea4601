"""A hostile custom node pack (copied into a test's ``custom_nodes/``): what an attacker who
knows this project would try from inside the ComfyUI child. Each node reports what it
managed as JSON (its output file); the tests judge the report and the disk.

The canary prefix is assembled at run time, so this file itself never matches it.
"""

from __future__ import annotations

import json
import os
import socket
import time

MARK = "RUNFLOW" + "CANARY"
_SKIP_DIRS = {"/proc", "/sys", "/dev", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64",
              "/libx32", "/boot", "/snap"}
_SKIP_NAMES = {".git", ".venv", "site-packages", "node_modules", "__pycache__", ".pyenv"}
_MAX_FILE_BYTES = 1 << 20


def _scan_file(path: str, found: list[str]) -> None:
    try:
        if os.path.getsize(path) > _MAX_FILE_BYTES:
            return
        with open(path, "rb") as fh:
            if MARK.encode() in fh.read():
                found.append(path)
    except OSError:
        pass


class HostileHunt:
    """Searches the environment, every process's environ and cmdline, and the files it can
    read under ``/`` (the obvious places first) for the canary credentials."""

    def run(self, job: dict, budget_s: float = 60.0, **_: object) -> str:
        found: list[str] = []
        deadline = time.monotonic() + float(budget_s)
        for name, value in os.environ.items():
            if MARK in value:
                found.append(f"env:{name}")
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                for what in ("environ", "cmdline"):
                    _scan_file(f"/proc/{pid}/{what}", found)
        roots = ["/var/run/secrets", "/run/secrets", "/root", os.path.expanduser("~"), "/"]
        seen: set[str] = set()
        scanned = 0
        for root in roots:
            for dirpath, dirnames, filenames in os.walk(root):
                if time.monotonic() > deadline:
                    break
                real = os.path.realpath(dirpath)
                if real in seen or real in _SKIP_DIRS:
                    dirnames[:] = []
                    continue
                seen.add(real)
                dirnames[:] = [d for d in dirnames if d not in _SKIP_NAMES]
                for name in filenames:
                    scanned += 1
                    _scan_file(os.path.join(dirpath, name), found)
        return json.dumps({"found": sorted(set(found)), "scanned": scanned})


class HostileTamper:
    """Tries to change each file of ``targets`` (append; chmod, then overwrite; a target may
    name the job's directories: ``{models_dir}/m.bin``) and to create a file in each
    directory of ``create_in``."""

    def run(self, job: dict, targets: str = "[]", create_in: str = "[]", **_: object) -> str:
        done: list[str] = []
        for path in json.loads(targets):
            path = path.format(**job)
            try:
                with open(path, "ab") as fh:
                    fh.write(b"pwned")
                done.append(f"appended:{path}")
            except OSError:
                pass
            try:
                os.chmod(path, 0o666)
                with open(path, "wb") as fh:
                    fh.write(b"pwned")
                done.append(f"overwrote:{path}")
            except OSError:
                pass
        for directory in json.loads(create_in):
            try:
                with open(os.path.join(directory, "runflow_tamper_probe.py"), "w") as fh:
                    fh.write("pwned = True\n")
                done.append(f"created:{directory}")
            except OSError:
                pass
        return json.dumps({"done": done})


class HostileRead:
    """Reports which of ``paths`` it can read (files) or list (directories), and what; and
    the first bytes of each of ``model_keys`` in the run's models directory."""

    def run(self, job: dict, paths: str = "[]", model_keys: str = "[]", **_: object) -> str:
        models: dict[str, str] = {}
        for key in json.loads(model_keys):  # the run's own models, as ComfyUI reads them
            try:
                with open(os.path.join(job["models_dir"], key), "rb") as fh:
                    models[key] = fh.read(200).decode(errors="replace")
            except OSError as exc:
                models[key] = f"unreadable: {exc.strerror}"
        seen: dict[str, str] = {}
        for path in json.loads(paths):
            try:
                if os.path.isdir(path):
                    seen[path] = "listed:" + ",".join(sorted(os.listdir(path)))
                else:
                    with open(path, "rb") as fh:
                        seen[path] = "read:" + fh.read(200).decode(errors="replace")
            except OSError:
                pass
        return json.dumps({"seen": seen, "job": job, "models": models})


class HostileNet:
    """Connects to ``host``:each of ``ports``; a Redis port also gets a PING."""

    def run(self, job: dict, host: str = "127.0.0.1", ports: str = "[]", **_: object) -> str:
        reached: dict[str, str] = {}
        for port in json.loads(ports):
            try:
                with socket.create_connection((host, int(port)), timeout=3) as sock:
                    sock.settimeout(3)
                    sock.sendall(b"PING\r\n")
                    try:
                        reached[str(port)] = sock.recv(64).decode(errors="replace")
                    except OSError:
                        reached[str(port)] = "connected"
            except OSError:
                pass
        return json.dumps({"reached": reached})


class HostileStatus:
    """Its capabilities and user as the kernel tells them."""

    def run(self, job: dict, **_: object) -> str:
        with open("/proc/self/status") as fh:
            caps = {line.split(":")[0]: line.split(":")[1].strip() for line in fh
                    if line.startswith("Cap")}
        return json.dumps({"caps": caps, "pid": os.getpid(), "job": job})


class HostileOutputLink:
    """Makes its "output" a symlink to ``target`` (a file of the worker's), hoping the worker
    uploads what it points to."""

    def run(self, job: dict, target: str = "", output_id: str = "", **_: object) -> None:
        os.symlink(target, os.path.join(job["output_dir"], f"{output_id}_00001_.txt"))
        return None


NODE_CLASS_MAPPINGS = {
    "HostileHunt": HostileHunt, "HostileTamper": HostileTamper, "HostileRead": HostileRead,
    "HostileNet": HostileNet, "HostileStatus": HostileStatus,
    "HostileOutputLink": HostileOutputLink,
}
