"""Hostile input over real sockets: the server answers Error (or a 4xx) or closes that one stream, and stays up.

The server runs on its own event loop in a thread (so hypothesis can drive plain sync clients);
every unhandled exception on that loop is recorded and must not happen.
"""

import asyncio
import os
import socket
import struct
import threading

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from pipecat_orpheus.config import load_config
from pipecat_orpheus.speech import load_synthesizer
from pipecat_orpheus.wire import protocol as p
from pipecat_orpheus.wire.server import PROBE_PATHS, STREAM_PATHS, serve
from tests.reliability_helpers import TEXT, UPGRADE, error_logs, tiny_overrides

MESSAGE_LIMIT, FRAME_LIMIT = 1024, 4096  # limits.max_message_bytes / max_frame_bytes of this module's server
EOS_FRAMES = (msgpack.packb({"type": "Eos"}), p.EOS_FRAME)


class ServerThread:
    """`serve()` on an event loop of its own thread; `errors` collects what reached the loop's exception handler."""

    def __init__(self, config, synth):
        self.loop = asyncio.new_event_loop()
        self.errors: list[dict] = []
        self.loop.set_exception_handler(lambda loop, context: self.errors.append(context))
        self._thread = threading.Thread(target=self.loop.run_forever, name="fuzz-server", daemon=True)
        self._thread.start()
        self._cm = serve(config, synth, port=0, api_keys=[])
        self.server = self.call(self._cm.__aenter__())
        self.url = self.server.url

    def call(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.call(self._cm.__aexit__(None, None, None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def running(tiny_model_dir):
    overrides = {**tiny_overrides(tiny_model_dir), "limits.max_message_bytes": MESSAGE_LIMIT}
    config = load_config(overrides={**overrides, "limits.max_frame_bytes": FRAME_LIMIT})
    synth = load_synthesizer(config)
    running = ServerThread(config, synth)
    yield running
    running.close()
    synth.close()


def speak_once(url):
    """Samples of one whole utterance of TEXT on a fresh stream."""
    with connect(url) as ws:
        assert p.decode_server(ws.recv(10)) == p.Ready()
        ws.send(msgpack.packb({"type": "Speak", "text": TEXT, "id": "good"}))
        samples = 0
        while not isinstance(m := p.decode_server(ws.recv(30)), p.Done):
            assert not isinstance(m, p.Error), m
            samples += len(m.pcm) if isinstance(m, p.Audio) else 0
        return samples


# -- frames: (data, as a text frame, what the server must do: "error" | "any" | close code) ----------

scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
scalars |= st.binary(max_size=20)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4), max_leaves=20)
not_maps = values.map(msgpack.packb).filter(lambda b: b != p.EOS_FRAME)
ids = st.integers(-5, 5) | st.text(max_size=8)
wrong = (
    st.floats() | st.booleans() | st.binary(max_size=8) | st.lists(st.integers(-(2**63), 2**64 - 1), max_size=3)
)  # msgpack-packable
unknown_types = st.text(max_size=12).filter(lambda t: t not in p.CLIENT_MESSAGES)
unknown_types = unknown_types.map(lambda t: (msgpack.packb({"type": t}), False, "error"))
FIELDS = [("Text", "text"), ("Speak", "text"), ("Speak", "voice"), ("Speak", "id"), ("Marker", "id"), ("Cancel", "id")]

valid = st.one_of(
    st.builds(lambda t: {"type": "Text", "text": t}, st.text(max_size=30)),
    st.builds(lambda t, i: {"type": "Speak", "text": t, "id": i}, st.text(max_size=40), ids),
    st.builds(lambda i: {"type": "Marker", "id": i}, ids),
    st.builds(lambda i: {"type": "Cancel", "id": i}, st.none() | ids),
    st.sampled_from([{"type": "Eos"}, {"type": "Flush"}, {"type": "Voice", "embeddings": [0.1], "shape": [1]}]),
).map(lambda body: (msgpack.packb(body), False, "any"))

frames = st.one_of(
    valid,  # valid messages, in any order (after Eos, Speak after Cancel, ...)
    st.binary(min_size=1, max_size=64).map(lambda b: (b, False, "any")),
    not_maps.map(lambda b: (b, False, "error")),
    st.text(max_size=12)
    .filter(lambda t: t not in p.CLIENT_MESSAGES)
    .map(lambda t: (msgpack.packb({"type": t}), False, "error")),
    (scalars.filter(lambda v: not isinstance(v, str))).map(lambda v: (msgpack.packb({"type": v}), False, "error")),
    st.tuples(st.sampled_from(FIELDS), wrong).map(
        lambda fw: (msgpack.packb({"type": fw[0][0], "text": "ok", fw[0][1]: fw[1]}), False, "error")
    ),
    st.sampled_from([b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80"]).map(  # invalid UTF-8 inside a msgpack str
        lambda bad: (b"\x82\xa4type\xa4Text\xa4text" + bytes([0xA0 | len(bad)]) + bad, False, "error")
    ),
    st.integers(1, FRAME_LIMIT - 1).map(lambda depth: (b"\x91" * depth + b"\xc0", False, "error")),  # nested lists
    st.integers(0, 127).map(lambda code: (msgpack.packb(msgpack.ExtType(code, b"xy")), False, "error")),
    st.integers(MESSAGE_LIMIT + 1, FRAME_LIMIT).map(lambda n: (b"\x81" + b"a" * (n - 1), False, "error")),
    st.integers(FRAME_LIMIT + 1, 3 * FRAME_LIMIT).map(lambda n: (b"b" * n, False, 1009)),
    st.text(max_size=40).map(lambda t: (t, True, "any")),  # a text frame is Text
    st.sampled_from([b"\xff", b"ok \xc3\x28"]).map(lambda b: (b, True, 1007)),  # invalid UTF-8 text frame
)


END_OF_BATCH = "end-of-fuzz-batch"  # a Cancel id no fuzzed frame uses: its Cancelled marks the end


# derandomize: CI replays the same 80 batches every run; bench/bench_reliability.py fuzzes at random, at length
@settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(frames, min_size=1, max_size=12))
def test_hostile_frames_get_error_or_close_only_their_stream(running, batch):
    """Every malformed frame gets Error{bad_request} (or the stream closes with 1007/1009); nothing else breaks."""
    with connect(running.url, max_size=None) as ws:
        assert p.decode_server(ws.recv(10)) == p.Ready()
        malformed, expect_close, may_end = 0, None, False
        for data, text, expect in batch:
            try:
                ws.send(data, text=text)
            except ConnectionClosed:
                break
            may_end |= data in EOS_FRAMES or expect == "any" and not text and len(data) < 64
            if isinstance(expect, int):
                expect_close = expect
                break
            malformed += expect == "error"
        got, closed = [], None
        try:
            if expect_close is None:  # answered last: everything before it was handled
                ws.send(msgpack.packb({"type": "Cancel", "id": END_OF_BATCH}))
            while expect_close is not None or p.Cancelled(END_OF_BATCH) not in got:  # a close: read until it comes
                got.append(p.decode_server(ws.recv(30)))
        except ConnectionClosed:
            closed = ws.close_code
    errors = [m for m in got if isinstance(m, p.Error)]
    assert all(m.code in ("bad_request", "busy") for m in errors), errors
    if expect_close is not None:  # unless an earlier Eos already ended the stream normally
        assert closed == expect_close or (may_end and closed == 1000), (closed, ws.close_reason)
    elif closed is not None:  # only an Eos ends a stream normally
        assert may_end and closed == 1000, (closed, ws.close_reason)
    else:
        assert len(errors) >= malformed
    assert not running.errors


RAW_CASES = {  # (first byte: FIN + RSV + opcode, payload, masked, server's close code(s))
    "unmasked": (0x82, b"\x80", False, {1002}),
    "reserved bit": (0xC2, b"\x80", True, {1002}),
    "unknown opcode": (0x83, b"\x80", True, {1002}),
    "continuation first": (0x80, b"\x80", True, {1002}),
    "control too long": (0x89, b"p" * 200, True, {1002}),
    "fragmented control": (0x09, b"p", True, {1002}),
    "bad close code": (0x88, struct.pack("!H", 999), True, {1002}),
    "one-byte close": (0x88, b"\x03", True, {1002}),
    "invalid UTF-8 text": (0x81, b"\xff\xfe", True, {1007}),
    "declared 2^62 bytes": (0x82, None, True, {1009}),
}


def raw_frame(first: int, payload: bytes | None, masked: bool) -> bytes:
    if payload is None:  # a header announcing a huge payload that never comes
        return bytes([first, 0x80 | 127]) + struct.pack("!Q", 2**62) + os.urandom(4)
    head = bytes([first, (0x80 if masked else 0) | len(payload)]) if len(payload) < 126 else None
    if head is None:
        head = bytes([first, (0x80 if masked else 0) | 126]) + struct.pack("!H", len(payload))
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@pytest.mark.parametrize("case", RAW_CASES)
def test_raw_protocol_violations_close_only_that_stream(running, case):
    """Frames that break RFC 6455 close that stream with the matching code; a stream beside it gets all its audio."""
    import socket

    first, payload, masked, codes = RAW_CASES[case]
    expected = speak_once(running.url)
    with socket.create_connection(("127.0.0.1", running.server.port), timeout=10) as sock:
        sock.sendall(f"GET /ws HTTP/1.1\r\nHost: x\r\n{UPGRADE}\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(4096)
        sock.sendall(raw_frame(first, payload, masked))
        while chunk := sock.recv(65536):
            data += chunk
    close = data[data.rindex(b"\x88") :]  # the server's close frame: 0x88, length, code
    assert struct.unpack("!H", close[2:4])[0] in codes
    assert speak_once(running.url) == expected and not running.errors


# -- request targets: each is taken literally; nothing but an exact known path gets past a 4xx ---------


def status_of(port: int, target: str) -> int | None:
    """The status a GET of `target` (with upgrade headers) gets; None if the server closed without one."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n{UPGRADE}\r\n".encode())
        data = b""
        while b"\r\n" not in data and (chunk := sock.recv(4096)):
            data += chunk
    return int(data.split()[1]) if data.startswith(b"HTTP/1.1 ") else None


ODD_TARGETS = [
    "//[/healthz",  # urlsplit raised "Invalid IPv6 URL": websockets answered 500 and logged a traceback
    "//x/ws",  # urlsplit read host "x", path "/ws": a stream opened past a proxy's path rules
    "//x/metrics",
    "//x/healthz",
    "/healthz?x",  # probes take no query
    "/metrics?x",
    "http://h/healthz",  # absolute form
    "http://h/ws",
    "/%2Fhealthz",
    "%2Fws",
    "/ws%2F",
    "/ws/",
    "/healthz#x",
    "*",
    "/" + "a" * 10_000,  # past websockets' 8 KiB request line: 414
]


@pytest.mark.parametrize("target", ODD_TARGETS, ids=lambda t: t[:20])
def test_odd_request_targets_get_4xx_and_no_error_log(running, target):
    """A target not exactly a known path gets a 4xx: never a stream, a probe's answer, a 500 or an ERROR line."""
    with error_logs() as errors:
        status = status_of(running.server.port, target)
    assert status is not None and 400 <= status < 500, status
    assert not errors and not running.errors


KNOWN = (*STREAM_PATHS, *PROBE_PATHS)
prefixes = st.sampled_from(["", "/", "//", "//[", "//x", "http://h", "/%2F", "?", *KNOWN])
targets = st.builds(
    lambda head, tail: (head + tail) or "/",
    prefixes,
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40),  # printable ASCII, no space
)


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(targets)
def test_request_targets_are_matched_exactly(running, target):
    """Any target: a 4xx unless its path is exactly a known one (a probe's without a query); never a 5xx or an ERROR."""
    with error_logs() as errors:
        status = status_of(running.server.port, target)
    path, has_query = target.partition("?")[0], "?" in target
    if path in STREAM_PATHS or (path in PROBE_PATHS and not has_query):
        assert status in (101, 200, 400), status  # 400: a stream query naming an unsupported format
    else:
        assert status is not None and 400 <= status < 500, status
    assert not errors and not running.errors
