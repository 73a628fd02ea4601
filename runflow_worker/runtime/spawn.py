"""Starting the ComfyUI child: a fresh interpreter with a scrubbed environment.

The child runs custom-node code, so it must not hold the worker's credentials (AWS keys,
the webhook secret, the Redis URL, tokens, URL credentials; the runner makes its environment
with ``cache.commands.child_environment``). ``multiprocessing``'s spawn context cannot give
a child another environment: its children inherit ``os.environ`` as it is at spawn time,
and changing ``os.environ`` around the spawn would race with the worker's other threads
(the download threads read AWS credentials). A child that cleans ``os.environ`` itself is
not enough either: the kernel keeps the initial environment in ``/proc/<pid>/environ``
and the process memory. So the child is started with ``subprocess`` and an explicit
``env``.

What joins them: a socket pair carrying JSON frames (``runtime.wire``; never pickle, in
either direction), whose child end is passed by its number in ``argv``; a pipe for the
child's stdout and stderr, read by a thread of the parent (``runtime.logrelay``: a node
cannot write lines into the worker's own log); and a pidfd of the started process, which
tells the parent of its exit (the child cannot write to it or close it, unlike a pipe it
holds). ``argv_prefix`` goes in front of the interpreter's command line (a sandbox that
starts the child keeps the inherited descriptors and their numbers).

Start protocol: the parent writes one frame, ``{"type": "Boot", "sys_path", "entry",
"config", "log_level"}``; the boot code reads it with the standard library alone (before
``sys.path`` is the parent's), then ``serve_child`` installs the JSON log handler and calls
``entry(conn, config)`` with the child's end (``runtime.child.ChildEnd``).
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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from runflow_worker.runtime import wire
from runflow_worker.runtime.logrelay import LogRelay

log = logging.getLogger(__name__)

# Runs in the fresh interpreter: only the standard library until sys.path is the parent's.
# It reads the boot frame in runtime.wire's format: 4-byte big-endian length, UTF-8 JSON.
_BOOT = (
    "import json, os, sys\n"
    "fd = int(sys.argv[1])\n"
    "def read(n):\n"
    "    data = b''\n"
    "    while len(data) < n:\n"
    "        chunk = os.read(fd, n - len(data))\n"
    "        if not chunk:\n"
    "            sys.exit('runflow: the channel closed before the boot message')\n"
    "        data += chunk\n"
    "    return data\n"
    "boot = json.loads(read(int.from_bytes(read(4), 'big')).decode('utf-8'))\n"
    "sys.path[:] = boot['sys_path']\n"
    "from runflow_worker.runtime.spawn import serve_child\n"
    "serve_child(fd, boot)\n"
)


class ChildProcess:
    """A started child: the subset of ``multiprocessing.Process`` the runner uses."""

    def __init__(self, popen: subprocess.Popen[bytes], pidfd: int, output: LogRelay) -> None:
        self._popen = popen
        self.pid = popen.pid
        self.sentinel = pidfd
        """A pidfd of the started process: readable once it exited. (A pidfd, not a pipe
        the child holds: the child can neither write to it nor close it, and a process it
        forked does not keep it from firing.)"""
        self.output = output
        """The thread re-emitting the child's stdout and stderr as log records."""

    @property
    def exitcode(self) -> int | None:
        """The exit code (negative: killed by that signal); None while it runs."""
        return self._popen.poll()

    def exited(self) -> bool:
        """True once the process is gone: its pidfd fired (reaped then, as ``exitcode``)."""
        # The pidfd alone says whether it runs: a warm run asks several times, and a reap
        # attempt (``wait4``) at each was a system call more for nothing.
        if self._popen.returncode is not None:
            return True
        try:
            gone = bool(wire.readable([self.sentinel], 0))
        except (OSError, ValueError):  # closed: the child was reaped and released
            return True
        if gone:
            self._popen.poll()  # reap it now, as the check did before
        return gone

    def is_alive(self) -> bool:
        """True while the child has not exited."""
        return not self.exited()

    def kill(self) -> None:
        """SIGKILL the child's whole process group: the child and whatever it forked.

        The child leads its own group (``spawn`` starts it in a new session), and a process
        it forked (a DataLoader worker, a fork-based pool) stays in that group, holding VRAM
        and the child's end of the channel. The group is killed even once the child itself
        is gone: such a process outlives it. (One that starts a session of its own escapes.)
        """
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # nothing left in the group

    def join(self, timeout: float | None = None) -> None:
        """Wait up to ``timeout`` seconds for the child to exit (and reap it)."""
        if timeout is not None and self._popen.returncode is None:
            # On the pidfd: ``Popen.wait`` with a timeout polls, sleeping up to 50 ms
            # between looks, and every environment or owner switch waits here.
            try:
                if not wire.readable([self.sentinel], timeout):
                    return
                timeout = 5.0  # it exited: reaping is immediate
            except (OSError, ValueError):  # closed: reaped already
                pass
        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        """Release the pidfd and end the output thread (after the child was reaped)."""
        self.output.stop()
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


def spawn(entry: str, config: dict[str, Any], env: Mapping[str, str], *,
          argv_prefix: Sequence[str] = (),
          job_of: Callable[[], str | None] = lambda: None,
          ) -> tuple[ChildProcess, wire.Channel]:
    """Start ``entry`` (``module:function``) in a fresh interpreter with exactly ``env``.

    The command is ``[*argv_prefix, sys.executable, "-c", _BOOT, <channel fd>]``; the
    started process leads a new session and process group (``ChildProcess.kill`` kills the
    group). Its output is re-emitted as log records tagged with ``job_of()``'s job.
    Returns the process and the parent's end of the channel. Raises OSError when the
    process cannot be started. This process is made non-dumpable first (``guard_parent``).
    """
    guard_parent()
    parent_sock, child_sock = socket.socketpair()
    out_r, out_w = os.pipe()
    child_fd = child_sock.detach()
    channel = wire.Channel(parent_sock.detach(), recv_max_bytes=wire.CHILD_FRAME_MAX_BYTES,
                           send_max_bytes=wire.PARENT_FRAME_MAX_BYTES, nan_out=True)
    try:
        popen = subprocess.Popen(
            [*argv_prefix, sys.executable, "-c", _BOOT, str(child_fd)],
            env=dict(env), pass_fds=(child_fd,), stdin=subprocess.DEVNULL,
            stdout=out_w, stderr=out_w, close_fds=True,
            # Its own session and process group, so ChildProcess.kill reaches everything it
            # forked; a terminal's Ctrl-C reaches only the worker, which stops the child.
            start_new_session=True,
        )
    except BaseException:
        channel.close()
        os.close(out_r)
        raise
    finally:
        # The child has its own copies now; closing ours lets EOF reach the parent.
        os.close(child_fd)
        os.close(out_w)
    try:
        # No pid reuse before this: the process is not reaped until the parent waits.
        pidfd = os.pidfd_open(popen.pid)
    except BaseException:
        os.killpg(popen.pid, signal.SIGKILL)
        popen.wait()
        channel.close()
        os.close(out_r)
        raise
    child = ChildProcess(popen, pidfd, LogRelay(out_r, job_of))
    _live.add(child)
    try:
        # One small write into an empty socket buffer: it cannot block.
        channel.send({"type": "Boot", "sys_path": list(sys.path), "entry": entry,
                      "config": config, "log_level": logging.getLogger().getEffectiveLevel()})
    except OSError:
        pass  # the child died at once; the caller sees it on the pidfd
    return child, channel


def serve_child(fd: int, boot: dict[str, Any]) -> None:
    """The child's side of ``spawn``: set up logging, then run the entry point."""
    import importlib

    from runflow_worker.runtime import childlog
    from runflow_worker.runtime.child import ChildEnd

    # Keep the channel out of programs this child starts (a node's os.system). A fork
    # keeps it anyway; the runner watches this process's pidfd, not the channel's end.
    os.set_inheritable(fd, False)
    conn = ChildEnd(wire.Channel(fd, recv_max_bytes=wire.PARENT_FRAME_MAX_BYTES,
                                 send_max_bytes=wire.CHILD_FRAME_MAX_BYTES, nan_in=True))
    entry, config, log_level = boot["entry"], boot["config"], boot["log_level"]
    childlog.install(log_level)
    try:
        module_name, _, func_name = entry.partition(":")
        func = getattr(importlib.import_module(module_name), func_name)
    except Exception as exc:  # noqa: BLE001 - reported to the parent as a failed start
        from runflow_worker.runtime import protocol as p

        conn.send(p.InitFailed(f"cannot load the child entry {entry!r}: "
                               f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        return
    func(conn, config)
    # The entry returned (a Shutdown): exit now. The interpreter's teardown of ComfyUI and
    # torch (module finalisers, atexit hooks of custom nodes) took ~0.17 s of every
    # environment or owner switch, which waits for this process to be gone, and it serves
    # nothing: the child keeps no state the worker wants. Output is flushed first.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001, S110 - a closed or broken stream: nothing to flush
            pass
    os._exit(0)
