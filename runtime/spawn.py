"""Starting the ComfyUI child: a fresh interpreter with a scrubbed environment.

The child runs custom-node code, so it must not hold the worker's credentials (AWS keys,
the webhook secret, the Redis URL, tokens, URL credentials; the runner makes its environment
with ``cache.commands.child_environment``). ``multiprocessing``'s spawn context cannot give
a child another environment: its children inherit ``os.environ`` as it is at spawn time,
and changing ``os.environ`` around the spawn would race with the worker's other threads
(the download threads read AWS credentials). A child that cleans ``os.environ`` itself is
not enough either: the kernel keeps the initial environment in ``/proc/<pid>/environ``
and the process memory. So the child is started with ``subprocess`` and an explicit
``env``, and joined by the same kind of connection ``multiprocessing.Pipe`` makes (a
socket pair wrapped in ``multiprocessing.connection.Connection``).

Start protocol (the child reads before importing anything of ours): the parent's
``sys.path``, then ``(entry, config, log_level)``; the child installs the JSON log
handler and calls ``entry(conn, config)``.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import traceback
import weakref
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

log = logging.getLogger(__name__)

# Runs in the fresh interpreter: only the standard library until sys.path is the parent's.
_BOOT = (
    "import sys\n"
    "from multiprocessing.connection import Connection\n"
    "conn = Connection(int(sys.argv[1]))\n"
    "sys.path[:] = conn.recv()\n"
    "from runtime.spawn import serve_child\n"
    "serve_child(conn, int(sys.argv[2]))\n"
)


class ChildProcess:
    """A started child: the subset of ``multiprocessing.Process`` the runner uses."""

    def __init__(self, popen: subprocess.Popen[bytes], sentinel: int) -> None:
        self._popen = popen
        self.pid = popen.pid
        self.sentinel = sentinel
        """Readable once the child is gone (the read end of a pipe only the child writes)."""

    @property
    def exitcode(self) -> int | None:
        """The exit code (negative: killed by that signal); None while it runs."""
        return self._popen.poll()

    def exited(self) -> bool:
        """True once the child is gone or going: its sentinel fired.

        Checked on the sentinel rather than with ``waitpid``: the sentinel fires while the
        kernel tears the process down, a moment before it can be reaped.
        """
        return self.exitcode is not None or bool(wait([self.sentinel], timeout=0))

    def is_alive(self) -> bool:
        """True while the child has not exited."""
        return not self.exited()

    def kill(self) -> None:
        """SIGKILL the child's whole process group: the child and whatever it forked.

        The child leads its own group (``spawn`` starts it in a new session), and a process
        it forked (a DataLoader worker, a fork-based pool) stays in that group, holding VRAM
        and the child's ends of the pipe. The group is killed even once the child itself is
        gone: such a process outlives it. (One that starts a session of its own escapes.)
        """
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # nothing left in the group

    def join(self, timeout: float | None = None) -> None:
        """Wait up to ``timeout`` seconds for the child to exit (and reap it)."""
        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        """Release the sentinel (after the child was reaped)."""
        try:
            os.close(self.sentinel)
        except OSError:
            pass


_live: weakref.WeakSet[ChildProcess] = weakref.WeakSet()


@atexit.register
def _kill_live_children() -> None:
    # multiprocessing's daemon children are stopped when the parent exits; ours too.
    for child in list(_live):
        child.kill()


_PR_SET_DUMPABLE = 4  # linux/prctl.h
_guarded = False


def guard_parent() -> None:
    """Keep children running as this user out of this process (Linux; once per process).

    The child runs custom-node code under the worker's user. Without this it could read the
    worker's ``/proc/<pid>/environ`` (every credential the scrub kept from its own) and
    memory (ptrace). A non-dumpable process's ``/proc`` files belong to root and ptrace
    needs CAP_SYS_PTRACE. The child itself is dumpable again after its exec. The cost: no
    core dumps of the worker, and attaching a profiler to it needs root.
    """
    global _guarded
    if _guarded or not sys.platform.startswith("linux"):
        return
    _guarded = True
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        failed = libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0
    except (OSError, AttributeError):
        failed = True
    if failed:
        log.warning("cannot make the worker non-dumpable: its children can read its "
                    "environment", extra={"event": "guard_failed"})


def spawn(entry: str, config: dict[str, Any], env: Mapping[str, str],
          argv_prefix: Sequence[str] = ()) -> tuple[ChildProcess, Connection]:
    """Start ``entry`` (``module:function``) in a fresh interpreter with exactly ``env``.

    ``argv_prefix`` goes in front of the interpreter's command line (the sandbox,
    ``runtime.sandbox.command_prefix``).

    The child leads a new session and process group (``ChildProcess.kill`` kills the group).
    Returns the process and the parent's end of the connection. Raises OSError when the
    interpreter cannot be started. This process is made non-dumpable first
    (``guard_parent``).
    """
    guard_parent()
    parent_sock, child_sock = socket.socketpair()
    sentinel_r, sentinel_w = os.pipe()
    child_fd = child_sock.detach()
    parent_conn = Connection(parent_sock.detach())
    try:
        popen = subprocess.Popen(
            [*argv_prefix, sys.executable, "-c", _BOOT, str(child_fd), str(sentinel_w)],
            env=dict(env), pass_fds=(child_fd, sentinel_w), stdin=subprocess.DEVNULL,
            close_fds=True,
            # Its own session and process group, so ChildProcess.kill reaches everything it
            # forked; a terminal's Ctrl-C reaches only the worker, which stops the child.
            start_new_session=True,
        )
    except BaseException:
        parent_conn.close()
        os.close(sentinel_r)
        raise
    finally:
        # The child has its own copies now; closing ours lets EOF reach the parent.
        os.close(child_fd)
        os.close(sentinel_w)
    child = ChildProcess(popen, sentinel_r)
    _live.add(child)
    try:
        # Small writes into an empty socket buffer: they cannot block.
        parent_conn.send(list(sys.path))
        parent_conn.send((entry, config, logging.getLogger().getEffectiveLevel()))
    except OSError:
        pass  # the child died at once; the caller sees it on the sentinel
    return child, parent_conn


def serve_child(conn: Connection, sentinel_fd: int) -> None:
    """The child's side of ``spawn``: set up logging, then run the entry point."""
    import importlib

    from runtime import childlog

    # Keep the pipe and the sentinel out of programs this child starts (a node's
    # os.system): a grandchild holding them would hide this process's death. A fork keeps
    # them anyway; the runner also polls this process's exit status for that case.
    os.set_inheritable(conn.fileno(), False)
    os.set_inheritable(sentinel_fd, False)
    entry, config, log_level = conn.recv()
    childlog.install(log_level)
    try:
        module_name, _, func_name = entry.partition(":")
        func = getattr(importlib.import_module(module_name), func_name)
    except Exception as exc:  # noqa: BLE001 - reported to the parent as a failed start
        from runtime import protocol as p

        conn.send(p.InitFailed(f"cannot load the child entry {entry!r}: "
                               f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        return
    func(conn, config)
