"""Hostile input over real sockets: the server answers Error (or a 4xx) or closes that one stream, and stays up.

The generators are hypothesis strategies, and the checks plain functions that raise on a wrong
outcome; tests/test_fuzz.py replays a fixed set of them (derandomized), `run_fuzz` draws fresh
ones from a seed, from four threads at once (hypothesis is thread-safe from 6.136), for as long
as it is asked to:

- `batches(limits)`: frames (bad msgpack, non-maps, unknown types, wrong field types, huge and
  nested values, invalid UTF-8, text frames, frames past both size limits, valid messages in any
  order), each with what the server must do; `check_batch` sends one batch on a fresh stream;
- RAW_CASES: frames that break RFC 6455 itself (`check_raw_case`);
- ODD_TARGETS and `targets`: request targets, each taken literally (`check_target`).
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
import warnings

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.errors import HypothesisDeprecationWarning
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from bench.reliability.common import AUTH, GOOD_TEXT, KEY, UPGRADE, Bench, error_logs
from pipecat_orpheus.wire import protocol as p
from pipecat_orpheus.wire.server import PROBE_PATHS, STREAM_PATHS

EOS_FRAMES = (msgpack.packb({"type": "Eos"}), p.EOS_FRAME)
END_OF_BATCH = "end-of-fuzz-batch"  # a Cancel id no fuzzed frame uses: its Cancelled marks the end
HEAD = f"Host: x\r\n{UPGRADE}kyutai-api-key: {KEY}\r\n\r\n"  # the rest of an upgrade request, with the key


# -- frames: (data, as a text frame, what the server must do: "error" | "any" | close code) ----------

scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
scalars |= st.binary(max_size=20)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4), max_leaves=20)
not_maps = values.map(msgpack.packb).filter(lambda b: b != p.EOS_FRAME)
ids = st.integers(-5, 5) | st.text(max_size=8)
wrong = (
    st.floats() | st.booleans() | st.binary(max_size=8) | st.lists(st.integers(-(2**63), 2**64 - 1), max_size=3)
)  # msgpack-packable
FIELDS = [("Text", "text"), ("Speak", "text"), ("Speak", "voice"), ("Speak", "id"), ("Marker", "id"), ("Cancel", "id")]
SPEAK = msgpack.packb({"type": "Speak", "text": "Hello.", "id": 1})

valid = st.one_of(
    st.builds(lambda t: {"type": "Text", "text": t}, st.text(max_size=30)),
    st.builds(lambda t, i: {"type": "Speak", "text": t, "id": i}, st.text(max_size=40), ids),
    st.builds(lambda i: {"type": "Marker", "id": i}, ids),
    st.builds(lambda i: {"type": "Cancel", "id": i}, st.none() | ids),
    st.sampled_from([{"type": "Eos"}, {"type": "Flush"}, {"type": "Voice", "embeddings": [0.1], "shape": [1]}]),
).map(lambda body: (msgpack.packb(body), False, "any"))


def frames(limits) -> st.SearchStrategy:
    """One hostile frame for a server with these `limits` (max_message_bytes, max_frame_bytes)."""
    message, frame = limits.max_message_bytes, limits.max_frame_bytes
    return st.one_of(
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
        st.integers(1, frame - 1).map(lambda depth: (b"\x91" * depth + b"\xc0", False, "error")),  # nested lists
        st.integers(0, 127).map(lambda code: (msgpack.packb(msgpack.ExtType(code, b"xy")), False, "error")),
        st.integers(1, len(SPEAK) - 1).map(lambda n: (SPEAK[:n], False, "error")),  # truncated
        st.integers(0, message - 100).map(lambda n: (msgpack.packb({"type": "Text", "text": "w" * n}), False, "any")),
        st.integers(message + 1, frame).map(lambda n: (b"\x81" + b"a" * (n - 1), False, "error")),  # too big
        st.integers(frame + 1, 3 * frame).map(lambda n: (b"b" * n, False, 1009)),  # past the hard ceiling
        st.text(max_size=40).map(lambda t: (t, True, "any")),  # a text frame is Text
        st.sampled_from([b"\xff", b"ok \xc3\x28"]).map(lambda b: (b, True, 1007)),  # invalid UTF-8 text frame
    )


def batches(limits) -> st.SearchStrategy:
    return st.lists(frames(limits), min_size=1, max_size=12)


def check_batch(url: str, batch: list) -> dict:
    """Send `batch` on a fresh stream: every malformed frame gets Error{bad_request}, or the stream closes as due.

    What came back: the Errors and the close code (None: still open, as it should be, at the end).
    """
    with connect(url, additional_headers=AUTH, compression=None, max_size=None) as ws:
        assert isinstance(p.decode_server(ws.recv(10)), p.Ready)
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
    return {"errors": len(errors), "close": closed}


def speak_once(url: str) -> int:
    """Samples of one whole utterance of GOOD_TEXT on a fresh stream."""
    with connect(url, additional_headers=AUTH) as ws:
        assert isinstance(p.decode_server(ws.recv(10)), p.Ready)
        ws.send(msgpack.packb({"type": "Speak", "text": GOOD_TEXT, "id": "good"}))
        samples = 0
        while not isinstance(m := p.decode_server(ws.recv(30)), p.Done):
            assert not isinstance(m, p.Error), m
            samples += len(m.pcm) if isinstance(m, p.Audio) else 0
        return samples


# -- raw frames that break RFC 6455 -------------------------------------------------------------

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


def check_raw_case(port: int, url: str, case: str) -> int:
    """RAW_CASES[case] closes its stream with the matching code; a stream after it gets all its audio. The code."""
    first, payload, masked, codes = RAW_CASES[case]
    expected = speak_once(url)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET /ws HTTP/1.1\r\n{HEAD}".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(4096)
        sock.sendall(raw_frame(first, payload, masked))
        while chunk := sock.recv(65536):
            data += chunk
    close = data[data.rindex(b"\x88") :]  # the server's close frame: 0x88, length, code
    code = struct.unpack("!H", close[2:4])[0]
    assert code in codes, (case, code)
    assert speak_once(url) == expected
    return code


# -- request targets: each is taken literally; nothing but an exact known path gets past a 4xx ---------

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
KNOWN = (*STREAM_PATHS, *PROBE_PATHS)
prefixes = st.sampled_from(["", "/", "//", "//[", "//x", "http://h", "/%2F", "?", *KNOWN])
targets = st.builds(
    lambda head, tail: (head + tail) or "/",
    prefixes,
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40),  # printable ASCII, no space
)


def status_of(port: int, target: str) -> int | None:
    """The status a GET of `target` (with upgrade headers and the key) gets; None if the server closed without one."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\n{HEAD}".encode())
        data = b""
        while b"\r\n" not in data and (chunk := sock.recv(4096)):
            data += chunk
    return int(data.split()[1]) if data.startswith(b"HTTP/1.1 ") else None


def check_target(port: int, target: str) -> int | None:
    """A 4xx unless the path is exactly a known one (a probe's without a query); never a 5xx or an ERROR line."""
    with error_logs() as errors:
        status = status_of(port, target)
    path, has_query = target.partition("?")[0], "?" in target
    if path in STREAM_PATHS or (path in PROBE_PATHS and not has_query):
        assert status in (101, 200, 400), (target[:40], status)  # 400: a stream query naming an unsupported format
    else:
        assert status is not None and 400 <= status < 500, (target[:40], status)
    assert not errors, errors
    return status


# -- the bench: fresh draws, at length ---------------------------------------------------------------


def _fuzz(strategy, check, examples: int, seed: int) -> None:
    """Run `check` on `examples` fresh draws of `strategy` (hypothesis shrinks a failure, then raises it)."""

    @hypothesis_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(value):
        check(value)

    run()


def _failure(name: str, e: BaseException) -> str:
    return f"{name}: {type(e).__name__}: {e} {' '.join(getattr(e, '__notes__', []))}"


async def run_fuzz(bench: Bench, limits, frames_wanted: int, seed: int, threads: int = 4) -> dict:
    """`frames_wanted` hostile frames in batches from `threads` fuzzers, then every raw case and target."""
    stats = {"frames": 0, "batches": 0, "errors": 0, "closes": {}}
    lock = threading.Lock()

    def one(batch):
        outcome = check_batch(bench.url, batch)
        with lock:
            stats["frames"] += len(batch)
            stats["batches"] += 1
            stats["errors"] += outcome["errors"]
            stats["closes"][str(outcome["close"])] = stats["closes"].get(str(outcome["close"]), 0) + 1

    def fuzzer(i: int) -> None:
        for n in range(10**6):  # rounds of 50 batches, each round seeded afresh, until enough frames went
            if stats["frames"] >= frames_wanted:
                return
            try:
                _fuzz(batches(limits), one, 50, seed * 10**6 + i * 10**4 + n)
            except Exception as e:  # noqa: BLE001 - a wrong outcome is a finding: stop this fuzzer, report it
                bench.fail(_failure(f"fuzz batch (fuzzer {i}, round {n})", e))
                return

    # Each run reseeds the global `random` for its examples; runs in other threads then look to hypothesis like a
    # strategy that uses it. Nothing here depends on that state.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Do not use the `random` module", HypothesisDeprecationWarning)
        await asyncio.gather(*(asyncio.to_thread(fuzzer, i) for i in range(threads)))
    raw = {}
    for case in RAW_CASES:
        try:
            raw[case] = await asyncio.to_thread(check_raw_case, bench.server.port, bench.url, case)
        except Exception as e:  # noqa: BLE001
            bench.fail(_failure(f"raw {case}", e))
    odd = 0
    for target in ODD_TARGETS:
        try:
            await asyncio.to_thread(check_target, bench.server.port, target)
            odd += 1
        except Exception as e:  # noqa: BLE001
            bench.fail(_failure(f"odd target {target[:40]!r}", e))
    drawn = max(150, frames_wanted // 20)
    try:
        await asyncio.to_thread(_fuzz, targets, lambda t: check_target(bench.server.port, t), drawn, seed)
    except Exception as e:  # noqa: BLE001
        bench.fail(_failure("request targets", e))
    return {
        "frames_fuzzed": stats["frames"],
        "batches": stats["batches"],
        "errors_received": stats["errors"],
        "closes": stats["closes"],
        "raw_cases": raw,
        "odd_targets_4xx": f"{odd}/{len(ODD_TARGETS)}",
        "targets_drawn": drawn,
    }
