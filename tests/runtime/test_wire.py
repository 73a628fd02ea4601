"""The channel's codec and the closed message schema: what the parent accepts from the
child, and what an honest child sends (always within the limits)."""

from __future__ import annotations

import json
import socket
import struct

import pytest

from runflow_worker.runtime import protocol as p
from runflow_worker.runtime import wire
from runflow_worker.runtime.errors import ProtocolError

pytestmark = pytest.mark.timeout(60)

MESSAGES = [
    p.Ready("a" * 40, 12, ("pack_a",), 1.5, "cuda:0", "NVIDIA H100"),
    p.InitFailed("no torch", "Traceback ..."),
    p.NodeStarted("r:1:2", "3", None),
    p.Progress("r:1:2", "3", 4, 20),
    p.Log("r:1:2", None, "hello"),
    p.Done("r:1:2", (p.OutputFile("9", "SaveImage", "sub/x_00001_.png", None),), 2.5, 1024),
    p.Failed("r:1:2", p.FailureKind.OUT_OF_MEMORY, "oom", "3", "KSampler", "OutOfMemoryError",
             {"traceback": "...", "errors": [{"extra_info": {"input_config": ["INT", {}]}}]},
             None),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_child_message_round_trips(msg: p.ChildMessage) -> None:
    frame = wire.encode_frame(p.fit_child_message(msg), wire.CHILD_FRAME_MAX_BYTES)
    (payload,) = wire.FrameDecoder(wire.CHILD_FRAME_MAX_BYTES).feed(frame)
    assert p.child_message(wire.decode_payload(payload)) == msg


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_the_childs_payload_is_its_fitted_message_encoded_once(msg: p.ChildMessage) -> None:
    payload = p.child_payload(msg)
    assert payload == wire.encode_payload(p.fit_child_message(msg))
    assert p.child_message(wire.decode_payload(payload)) == msg


def test_parent_messages_round_trip_with_a_callers_nan() -> None:
    job = p.Execute("r:1:2", {"1": {"class_type": "X", "inputs": {"f": float("nan")}}},
                    "/i", "/o", "/t", None, {"m": "ab"}, {})
    frame = wire.encode_frame(p.to_wire(job), wire.PARENT_FRAME_MAX_BYTES, allow_nan=True)
    back = p.parent_message(wire.decode_payload(frame[4:], allow_nan=True))
    assert back.job_id == job.job_id and back.graph["1"]["inputs"]["f"] != 0
    assert p.parent_message(p.to_wire(p.Shutdown())) == p.Shutdown()


def test_frames_split_anywhere_are_reassembled() -> None:
    data = b"".join(wire.encode_frame({"type": "x", "n": i}, 100) for i in range(3))
    decoder = wire.FrameDecoder(100)
    out = [payload for byte in data for payload in decoder.feed(bytes([byte]))]
    assert [json.loads(o)["n"] for o in out] == [0, 1, 2] and not decoder.partial


@pytest.mark.parametrize(("payload", "error"), [
    (b"\xff", "frame is not valid UTF-8"),
    (b"[1]", "frame holds a JSON list, not an object"),
    (b'{"a": NaN}', "frame is not JSON (NaN is not a JSON number)"),
    (b'{"a": 1e999}', None),  # parses as inf: the schema refuses it (below)
    (b"[" * 100_000 + b"]" * 100_000, "frame nests too deeply"),
    (b'{"a": ' + b"9" * 5000 + b"}", "frame is not JSON"),
])
def test_malformed_payloads_are_wire_errors(payload: bytes, error: str | None) -> None:
    if error is None:
        infinite = wire.decode_payload(payload)["a"]
        with pytest.raises(ProtocolError, match="Ready.init_s must be a finite number"):
            p.child_message({"type": "Ready", "comfyui_commit": None, "node_count": 1,
                             "import_failures": [], "init_s": infinite, "device": "cpu",
                             "gpu_model": None, "import_errors": {}})
        return
    with pytest.raises(wire.WireError, match=error.replace("(", r"\(").replace(")", r"\)")):
        wire.decode_payload(payload)


def test_a_frame_over_the_limit_is_refused_from_its_header() -> None:
    decoder = wire.FrameDecoder(1024)
    with pytest.raises(wire.WireError, match="frame of 1025 bytes exceeds the 1024-byte limit"):
        decoder.feed(struct.pack(">I", 1025))
    with pytest.raises(wire.WireError, match="exceeds"):
        wire.encode_frame({"s": "x" * 2000}, 1024)


def _progress(**changes: object) -> dict[str, object]:
    return {"type": "Progress", "job_id": "j", "node_id": "1", "value": 1, "total": 2,
            **changes}


@pytest.mark.parametrize(("obj", "error"), [
    ({"type": "Evil"}, "unknown message type 'Evil'"),
    ({"job_id": "j"}, "unknown message type None"),
    ({"type": ["Done"]}, "unknown message type <1 items>"),
    (_progress(value=True), "Progress.value must be an integer, got bool True"),
    (_progress(value=1.0), "Progress.value must be an integer, got float 1.0"),
    (_progress(value=json.loads("[" * 900 + "]" * 900)),
     "Progress.value must be an integer, got list <1 items>"),
    (_progress(value=1 << 70), "Progress.value is out of range"),
    (_progress(extra=1), r"Progress has the wrong fields \(missing \[\], unexpected \['extra'\]"),
    ({"type": "Progress", "job_id": "j"}, r"missing \['node_id', 'total', 'value'\]"),
    (_progress(job_id="j" * 2000), "Progress.job_id is 2000 characters long, over the 1024"),
    ({"type": "Failed", "job_id": "j", "kind": "fatal", "message": "", "node_id": None,
      "node_type": None, "exception_type": None, "details": {}, "peak_vram_bytes": None},
     "Failed.kind is no failure kind: 'fatal'"),
    ({"type": "Failed", "job_id": "j", "kind": "internal", "message": "", "node_id": None,
      "node_type": None, "exception_type": None, "details": [], "peak_vram_bytes": None},
     "Failed.details must be an object, got list"),
    ({"type": "Failed", "job_id": "j", "kind": "internal", "message": "", "node_id": None,
      "node_type": None, "exception_type": None, "peak_vram_bytes": None,
      "details": json.loads("{\"a\":" * 40 + "1" + "}" * 40)},
     "nests deeper than 33 levels"),
    ({"type": "Done", "job_id": "j", "outputs": {"a": 1}, "execute_s": 1,
      "peak_vram_bytes": None}, "Done.outputs must be a list, got dict"),
    ({"type": "Done", "job_id": "j", "execute_s": 1, "peak_vram_bytes": None,
      "outputs": [{"node_id": "1", "node_type": "S", "relpath": 7, "output_id": None}]},
     r"Done.outputs\[0\].relpath must be a string, got int 7"),
    ({"type": "Ready", "comfyui_commit": None, "node_count": 1, "import_failures": "x",
      "init_s": "1", "device": "cpu", "gpu_model": None, "import_errors": {}},
     "Ready.import_failures must be a list, got str"),
])
def test_the_schema_names_the_violation(obj: dict, error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        p.child_message(obj)


def _fits(msg: p.ChildMessage) -> p.ChildMessage:
    obj = p.fit_child_message(msg)
    assert p.frame_bytes(obj) <= wire.CHILD_FRAME_MAX_BYTES
    wire.encode_frame(obj, wire.CHILD_FRAME_MAX_BYTES)
    assert p.child_payload(msg) == wire.encode_payload(obj)  # what the child writes
    return p.child_message(json.loads(json.dumps(obj)))


def test_an_honest_child_never_exceeds_the_limits() -> None:
    combo = [f"model_{i:06d}.safetensors" for i in range(200_000)]  # a COMBO's file list
    deep: dict = {}
    node = deep
    for _ in range(100):
        node["d"] = {}
        node = node["d"]
    failed = _fits(p.Failed("j", p.FailureKind.INVALID_WORKFLOW, "bad \x00 value" * 20_000,
                            "1", "N" * 5000, None,
                            {"errors": [{"extra_info": {"input_config": [combo, {}]}}],
                             "deep": deep}))
    assert failed.message.endswith(" [cut]") and len(failed.message) <= p.TEXT_MAX_CHARS
    assert failed.node_type is not None and len(failed.node_type) <= p.ID_MAX_CHARS
    assert failed.kind is p.FailureKind.INVALID_WORKFLOW
    ready = _fits(p.Ready(None, 1, tuple("\x01" * 1000 + str(i) for i in range(50_000)), 1.0,
                          "cpu"))
    assert 0 < len(ready.import_failures) <= 1000
    log_ = _fits(p.Log("j", "1", "\x02" * 1_000_000))
    assert log_.text.endswith(" [cut]")
    deep_only = _fits(p.Failed("j", p.FailureKind.NODE_ERROR, "m", details={"deep": deep}))
    assert "deep" in deep_only.details


def test_a_done_too_large_to_report_becomes_a_failure() -> None:
    outputs = tuple(p.OutputFile(str(i), "SaveImage", f"{'d' * 200}/{i}.png", None)
                    for i in range(20_000))
    out = _fits(p.Done("j", outputs, 1.0))
    assert isinstance(out, p.Failed) and out.kind is p.FailureKind.INTERNAL
    assert "20000 output files" in out.message


def test_a_channel_pair_carries_frames_and_reports_the_end() -> None:
    a, b = socket.socketpair()
    left = wire.Channel(a.detach(), recv_max_bytes=1024, send_max_bytes=1024)
    right = wire.Channel(b.detach(), recv_max_bytes=1024, send_max_bytes=1024)
    try:
        assert left.recv(timeout_s=0) is None
        right.send({"type": "x"})
        assert left.recv(timeout_s=5) == {"type": "x"}
        with pytest.raises(wire.WireError):
            right.send({"s": "x" * 2000})
        right.close()
        with pytest.raises(wire.ChannelClosed):
            left.recv(timeout_s=5)
    finally:
        left.close()


def test_a_done_with_more_outputs_than_a_list_may_hold_is_never_cut() -> None:
    outputs = tuple(p.OutputFile("1", "S", f"{i}.png", None)
                    for i in range(p.LIST_MAX_ITEMS + 1))
    out = _fits(p.Done("j", outputs, 1.0))
    assert isinstance(out, p.Failed) and "10001 output files" in out.message


def test_send_nowait_writes_what_fits_and_the_rest_completes_the_frame() -> None:
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    left = wire.Channel(a.detach(), recv_max_bytes=1 << 22, send_max_bytes=1 << 22)
    right = wire.Channel(b.detach(), recv_max_bytes=1 << 22, send_max_bytes=1 << 22)
    try:
        assert left.send_nowait({"type": "small"}) == b""  # taken whole: nothing left
        assert right.recv(timeout_s=5) == {"type": "small"}
        big = {"type": "big", "s": "x" * (1 << 21)}  # far over the socket's buffers
        rest = left.send_nowait(big)
        assert 0 < len(rest) < len(wire.encode_frame(big, 1 << 22))
        assert right.recv(timeout_s=0) is None  # only part of the frame arrived
        import threading
        writer = threading.Thread(target=left.send_bytes, args=(rest,))
        writer.start()
        got = right.recv(timeout_s=None)
        writer.join(5)
        assert got == big
    finally:
        left.close()
        right.close()
