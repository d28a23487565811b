"""What every reliability scenario shares: the key, the texts, good clients, raw peers, the checks.

A scenario is a coroutine over a `Bench` (a running server, its synthesizer, the samples of one
good utterance), or over bare `Findings` when it starts its own `pipecat-orpheus serve`. It
records what went wrong with `fail` and returns what it measured. run.py runs each one at length
with good clients alongside (`Bench.phase`); tests/test_reliability_*.py run the same ones short,
on servers of their own, and assert on the failures and the numbers.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import json
import logging
import os
import socket
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import msgpack
from loguru import logger
from websockets.asyncio.client import connect

from bench import serving
from bench.serving import free_port, healthy, http_status  # noqa: F401  (the scenarios' imports)
from pipecat_orpheus.wire import protocol as p

KEY = "bench-Key-7f3a9c"  # the servers' one API key; must never reach a log
AUTH = {"kyutai-api-key": KEY}
GOOD_TEXT = "Hello there, how can I help you today?"
LONG_TEXT = "One two three four five six seven eight nine ten eleven twelve. " * 30
POISON = "\U0001f600" * 150  # one 150-char piece of 4 byte-tokens a char: its prompt fits no slot of <= 512 tokens
ALLOWED_CLOSES = {1000, 1007, 1009, 1013}  # Eos done, invalid UTF-8, frame past max_frame_bytes, busy
REPLY_TIMEOUT_S = 60  # a well-behaved client waiting longer than this for a reply counts as starved
UPGRADE = (
    "Upgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: AQIDBAUGBwgJCgsMDQ4PEA==\r\n"
)


def pack(**body) -> bytes:
    return msgpack.packb(body)


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


MALLINFO2 = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in MALLINFO2]  # glibc's struct mallinfo2, in order


def heap_mib() -> dict[str, float] | None:
    """glibc's malloc, all arenas: MiB in use (small chunks + mmapped) and freed but kept; None off glibc >= 2.33."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (AttributeError, OSError):
        return None
    mallinfo2.restype = _Mallinfo2
    info = mallinfo2()
    return {"heap_in_use": (info.uordblks + info.hblkhd) / 2**20, "heap_free_held": info.fordblks / 2**20}


def p99_ms(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1)


async def until(condition: Callable[[], bool], timeout_s: float) -> None:
    """Wait for `condition()`; TimeoutError past `timeout_s`."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


async def idle(server, synth, timeout_s: float = 15) -> None:
    """Wait until the engine holds no request and the server no stream; TimeoutError past `timeout_s`."""
    await until(lambda: not (synth.active_requests or synth.queued_requests or server.open_streams), timeout_s)


async def utterance(ws, id, text: str = GOOD_TEXT) -> tuple[int, float]:
    """Speak `text` on an open stream; (samples, seconds to the first audio) once its Done arrives.

    An Error raises, and so does a reply slower than REPLY_TIMEOUT_S (a starved client).
    """
    t0, first, samples = time.perf_counter(), None, 0
    await ws.send(pack(type="Speak", text=text, id=id))
    while True:
        async with asyncio.timeout(REPLY_TIMEOUT_S):
            m = p.decode_server(await ws.recv())
        if isinstance(m, p.Audio):
            first = first if first is not None else time.perf_counter() - t0
            samples += len(m.pcm)
        elif isinstance(m, p.Done) and m.id == id:
            return samples, first
        elif isinstance(m, p.Error):
            raise RuntimeError(f"Error: {m.message}")


class Findings:
    """What went wrong, in words; a scenario goes on after a failure, so the rest is measured too."""

    def __init__(self):
        self.failures: list[str] = []

    def fail(self, what: str) -> None:
        self.failures.append(what[:300])


class Bench(Findings):
    """A server, its synthesizer, the samples of one GOOD_TEXT utterance, and the counters of a phase."""

    def __init__(self, server, synth, expected: int, n_good: int = 0):
        super().__init__()
        self.server, self.synth, self.expected, self.n_good = server, synth, expected, n_good
        self.url = server.url
        self.data_lost = 0
        self.ttfa: list[float] = []
        self.utterances = 0
        self.unhandled = 0  # exceptions that reached the event loop's handler (run.py counts them)

    async def speak(self, utterances: int, text: str = GOOD_TEXT) -> list[int]:
        """A good client: `utterances` of `text`, one after another on one stream; the samples of each."""
        async with connect(self.url, additional_headers=AUTH, compression=None) as ws:
            if not isinstance(first := p.decode_server(await ws.recv()), p.Ready):
                raise RuntimeError(f"first message {first}, not Ready")
            return [(await utterance(ws, i, text))[0] for i in range(utterances)]

    async def good_client(self, stop: asyncio.Event, i: int) -> None:
        """Speak GOOD_TEXT again and again until `stop`; every utterance must be whole and in time."""
        n = 0
        while not stop.is_set():
            try:
                async with connect(self.url, additional_headers=AUTH, compression=None) as ws:
                    assert isinstance(p.decode_server(await ws.recv()), p.Ready)
                    while not stop.is_set():
                        n += 1
                        samples, first = await utterance(ws, n)
                        self.utterances += 1
                        self.ttfa.append(first)
                        if samples != self.expected:
                            self.data_lost += 1
                            self.fail(f"good client {i}: {samples} samples, expected {self.expected}")
            except Exception as e:  # noqa: BLE001 - any failure of a well-behaved client is a finding
                self.fail(f"good client {i}: {type(e).__name__}: {e}")
                await asyncio.sleep(0.5)

    async def phase(self, name: str, work) -> dict:
        """Run `work()` with `n_good` good clients alongside; then check that the server is whole again.

        Whole: engine slots back to 0, no stream open, no asyncio task left over, /healthz 200.
        """
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        self.failures, self.data_lost, self.ttfa, self.utterances = [], 0, [], 0
        unhandled0 = self.unhandled
        gc.collect()
        tasks0, rss0, t0 = len(asyncio.all_tasks()), rss_mib(), time.perf_counter()
        stop = asyncio.Event()
        good = [asyncio.create_task(self.good_client(stop, i)) for i in range(self.n_good)]
        details = await guarded(self, name, work()) or {}
        stop.set()
        await asyncio.gather(*good)
        try:
            await idle(self.server, self.synth)
        except TimeoutError:
            self.fail(f"not idle: {self.synth.active_requests} active, {self.server.open_streams} streams")
        await asyncio.sleep(0.2)
        gc.collect()
        leaked = len(asyncio.all_tasks()) - tasks0
        if leaked > 0:
            self.fail(f"{leaked} asyncio tasks left over: {[t.get_name() for t in asyncio.all_tasks()]}")
        if self.unhandled > unhandled0:
            self.fail(f"{self.unhandled - unhandled0} unhandled exceptions in the event loop")
        if (await http_status(self.server.port, "/healthz")) != 200:
            self.fail("/healthz is not 200")
        result = {
            "failures": len(self.failures),
            "data_lost": self.data_lost,
            "rss_growth_pct": round(100 * (rss_mib() - rss0) / rss0, 2),
            "good_ttfa_p99_ms": p99_ms(self.ttfa),
            "good_ttfa_p50_ms": round(1000 * statistics.median(self.ttfa), 1) if self.ttfa else None,
            "good_utterances": self.utterances,
            "duration_s": round(time.perf_counter() - t0, 1),
            "leaked_tasks": max(leaked, 0),
            **details,
            "failure_samples": self.failures[:10],
        }
        print(f"    {json.dumps(result)}", flush=True)
        return result


async def guarded(findings: Findings, name: str, work):
    """`await work`, or None with a failure recorded if it raised (the run goes on)."""
    try:
        return await work
    except Exception as e:  # noqa: BLE001 - an abuse step that breaks is a finding, not the end of the run
        findings.fail(f"{name}: {type(e).__name__}: {e}")
        return None


# -- raw peers that never read, and what the server logs at ERROR -----------------------------------


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One masked, final client frame (payload under 64 KiB)."""
    mask = os.urandom(4)
    size = bytes([0x80 | len(payload)]) if len(payload) < 126 else bytes([0x80 | 126]) + len(payload).to_bytes(2, "big")
    return bytes([0x80 | opcode]) + size + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


PING = client_frame(0x9, b"p" * 125)  # the largest ping a control frame allows; the server owes a pong for each


def deaf_peer(port: int) -> socket.socket:
    """A raw client that sends the upgrade (with the key) and never reads a byte (a 4 KiB receive window).

    The answer, Ready and everything after it stay unread: what the server cannot send piles up on its side.
    """
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET /ws HTTP/1.1\r\nHost: x\r\n{UPGRADE}kyutai-api-key: {KEY}\r\n\r\n".encode())
    sock.setblocking(False)
    return sock


def small_send_buffer_listener() -> socket.socket:
    """A listener whose accepted sockets have a small kernel send buffer (Linux autotunes loopback's to MiBs).

    What a peer does not read then piles up in the server's own write buffer, where a scenario can see it.
    """
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    return listener


async def flood_pings(sock: socket.socket, limit_bytes: int, after_chunk=lambda: None) -> int:
    """Send pings on `sock` until `limit_bytes` or until the server drops it; the bytes sent.

    `after_chunk()` runs after each 64 KiB chunk (a probe of the server's state). A send that
    stalls for 30 s ends the flood too: the server stopped reading, which also bounds it.
    """
    loop, chunk, sent = asyncio.get_running_loop(), PING * 500, 0
    while sent < limit_bytes:
        try:
            await asyncio.wait_for(loop.sock_sendall(sock, chunk), 30)
        except (OSError, TimeoutError):
            break
        sent += len(chunk)
        await asyncio.sleep(0.001)  # the server reads and answers it (in-process servers share this loop)
        after_chunk()
    return sent


@contextmanager
def error_logs():
    """The ERROR (and worse) lines logged while the block runs: loguru's and stdlib logging's (websockets)."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(f"{record.name}: {record.getMessage()} {record.exc_text or ''}")

    handler = Collect(logging.ERROR)
    sink = logger.add(lambda m: lines.append(str(m)), level="ERROR")
    logging.getLogger().addHandler(handler)
    try:
        yield lines
    finally:
        logging.getLogger().removeHandler(handler)
        logger.remove(sink)


# -- a real `pipecat-orpheus serve` in a subprocess, holding the one API key --------------------------


def serve_process(overrides: dict, port: int, **env: str):
    """`bench.serving.serve_process` with `KEY` as the server's one API key (`env` may replace it)."""
    return serving.serve_process(overrides, port, **{"ORPHEUS_API_KEYS": KEY, **env})
