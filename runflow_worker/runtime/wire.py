"""The byte format of the channel between the runner and its ComfyUI child: JSON frames.

A frame is a 4-byte big-endian length, then that many bytes of UTF-8 JSON holding one
object. Nothing else crosses the channel in either direction: no pickle (the child runs
custom-node code, and unpickling what it writes would run its code in the worker), no
type named by the sender. Each direction has its own size limit (``CHILD_FRAME_MAX_BYTES``
for what the child sends, ``PARENT_FRAME_MAX_BYTES`` for a job's graph); a frame is checked
against it from its header, before its payload is read, so a lying header costs nothing.

Why hand-written: the framing is ten lines, and every ready-made transport either
pickles (``multiprocessing.connection``) or brings a server and its own protocol.
``runtime.protocol`` gives the objects their meaning; this module only moves them.
"""

from __future__ import annotations

import json
import select
import socket
import struct
from typing import Any

HEADER = struct.Struct(">I")
CHILD_FRAME_MAX_BYTES = 1 << 20
"""The largest frame the child may send (events, outcomes: small; texts are cut to fit)."""
PARENT_FRAME_MAX_BYTES = 64 << 20
"""The largest frame the parent sends (a job, whose graph may be large)."""
_READ_CHUNK_BYTES = 1 << 16


def readable(fds: list[int], timeout_s: float | None) -> set[int]:
    """Those of ``fds`` readable (or closed by the peer) within ``timeout_s`` (None: wait).

    ``poll``, not ``select``: a worker may hold more than 1,024 descriptors.
    """
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    timeout_ms = None if timeout_s is None else max(0, int(timeout_s * 1000))
    return {fd for fd, _ in poller.poll(timeout_ms)}


class WireError(Exception):
    """The peer broke the frame format (bad length, not UTF-8, not a JSON object)."""


class ChannelClosed(Exception):
    """The peer closed its end (end of file)."""


# One encoder and decoder of each kind for every frame: ``json.dumps`` and ``json.loads``
# with options build a new one at each call (stateless, so shared across threads).
_ENCODERS = {allow_nan: json.JSONEncoder(ensure_ascii=False, allow_nan=allow_nan,
                                         separators=(",", ":"))
             for allow_nan in (False, True)}


def encode_payload(obj: dict[str, Any], *, allow_nan: bool = False) -> bytes:
    """The payload of ``obj``'s frame (UTF-8 JSON); WireError when it is not JSON-safe."""
    try:
        return _ENCODERS[allow_nan].encode(obj).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        raise WireError(f"cannot encode the message: {exc}") from exc


def frame_of(payload: bytes, max_bytes: int) -> bytes:
    """The frame carrying ``payload``; WireError when it exceeds ``max_bytes``."""
    if len(payload) > max_bytes:
        raise WireError(f"frame of {len(payload)} bytes exceeds the {max_bytes}-byte limit")
    return HEADER.pack(len(payload)) + payload


def encode_frame(obj: dict[str, Any], max_bytes: int, *, allow_nan: bool = False) -> bytes:
    """The frame for ``obj``; WireError when it is not JSON-safe or exceeds ``max_bytes``."""
    return frame_of(encode_payload(obj, allow_nan=allow_nan), max_bytes)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


_DECODERS = {False: json.JSONDecoder(parse_constant=_reject_constant),
             True: json.JSONDecoder()}


def decode_payload(payload: bytes, *, allow_nan: bool = False) -> dict[str, Any]:
    """The JSON object in ``payload``; WireError when it is not UTF-8 JSON of an object."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireError(f"frame is not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
    try:
        obj = _DECODERS[allow_nan].decode(text)
    except RecursionError as exc:
        raise WireError("frame nests too deeply") from exc
    except ValueError as exc:  # JSONDecodeError, an integer of too many digits, NaN
        raise WireError(f"frame is not JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise WireError(f"frame holds a JSON {type(obj).__name__}, not an object")
    return obj


class FrameDecoder:
    """Splits a byte stream into frame payloads (no I/O; memory bounded by ``max_bytes``)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Append ``data``; return the payloads now complete. WireError on a bad length."""
        self._buf += data
        out: list[bytes] = []
        while len(self._buf) >= HEADER.size:
            (size,) = HEADER.unpack_from(self._buf)
            if size > self.max_bytes:
                raise WireError(f"frame of {size} bytes exceeds the {self.max_bytes}-byte limit")
            end = HEADER.size + size
            if len(self._buf) < end:
                break
            out.append(bytes(self._buf[HEADER.size:end]))
            del self._buf[:end]
        return out

    @property
    def partial(self) -> bool:
        """True while part of a frame is buffered."""
        return bool(self._buf)


class Channel:
    """One end of a stream socket carrying frames: ``send`` from one thread, ``recv`` from
    another (never two threads in the same direction).

    ``send`` blocks until the frame is written; ``recv`` waits at most ``timeout_s`` and
    never blocks on a frame the peer sent only part of (it is completed by a later call).
    """

    def __init__(self, fd: int, *, recv_max_bytes: int, send_max_bytes: int,
                 nan_in: bool = False, nan_out: bool = False) -> None:
        self._sock = socket.socket(fileno=fd)
        self._sock.setblocking(True)
        self._decoder = FrameDecoder(recv_max_bytes)
        self._frames: list[bytes] = []
        self._send_max_bytes = send_max_bytes
        # NaN and Infinity (not JSON, but Python's json writes them) may only travel from
        # the parent: a caller's graph can hold them; the child's messages never do.
        self._nan_in = nan_in
        self._nan_out = nan_out
        self.eof = False

    def fileno(self) -> int:
        """The socket's descriptor (to wait on it)."""
        return self._sock.fileno()

    def send(self, obj: dict[str, Any]) -> None:
        """Write ``obj`` as one frame; WireError when it cannot be encoded, OSError when the
        peer is gone."""
        frame = encode_frame(obj, self._send_max_bytes, allow_nan=self._nan_out)
        self._sock.sendall(frame)

    def send_payload(self, payload: bytes) -> None:
        """Write an encoded payload (``encode_payload``, or one the caller encoded the same
        way to measure it) as one frame; errors as ``send``."""
        self._sock.sendall(frame_of(payload, self._send_max_bytes))

    def send_nowait(self, obj: dict[str, Any]) -> bytes:
        """Write as much of ``obj``'s frame as the socket takes without blocking; return
        the rest (empty once all of it went), to be written with ``send_bytes``. Errors as
        ``send``."""
        frame = memoryview(encode_frame(obj, self._send_max_bytes, allow_nan=self._nan_out))
        while frame:
            try:
                frame = frame[self._sock.send(frame, socket.MSG_DONTWAIT):]
            except (BlockingIOError, InterruptedError):
                break
        return bytes(frame)

    def send_bytes(self, data: bytes) -> None:
        """Write the rest of a frame ``send_nowait`` began (blocks until written)."""
        self._sock.sendall(data)

    @property
    def buffered(self) -> bool:
        """True when a complete frame was read and not yet returned."""
        return bool(self._frames)

    def recv(self, timeout_s: float | None = None) -> dict[str, Any] | None:
        """The next object; None when none is complete within ``timeout_s`` (None: wait).

        Raises WireError on a malformed frame, ChannelClosed once the peer closed its end
        (a partial frame left behind is a WireError).
        """
        while not self._frames:
            if self.eof:
                if self._decoder.partial:
                    raise WireError("the channel closed in the middle of a frame")
                raise ChannelClosed("the peer closed the channel")
            # With no time to wait (0: the runner's own poll saw the socket readable), the
            # read that does not block answers what a poll would, one system call fewer.
            if timeout_s and not readable([self.fileno()], timeout_s):
                return None
            self._read_some(block=timeout_s is None)
            if timeout_s is not None and not self._frames and not self.eof:
                return None
        return decode_payload(self._frames.pop(0), allow_nan=self._nan_in)

    def _read_some(self, *, block: bool) -> None:
        try:
            flags = 0 if block else socket.MSG_DONTWAIT
            data = self._sock.recv(_READ_CHUNK_BYTES, flags)
        except (BlockingIOError, InterruptedError):
            return
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return
        self._frames.extend(self._decoder.feed(data))

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()

