"""Reliability bench: the server under hostile input, auth attacks, floods, faults and a churn soak.

One in-process server (the engine `load_synthesizer` picks, `--backend` to change it) with an API
key, small ping and buffer bounds. Through every phase a few well-behaved clients speak one
utterance after another on persistent connections; each must get every sample (seeded sampling:
the expected length is measured once, alone) and its time to first audio (TTFA) is recorded.

fuzz    hostile frames from seeded random generators over real sockets (bad msgpack, non-maps,
        unknown types, wrong field types, huge and nested values, invalid UTF-8, text frames,
        frames past both size limits, valid messages in invalid orders);
auth    missing/wrong/empty/overlong/duplicated keys in header, bearer and query (401 each),
        right keys accepted, and the key never in the logs;
floods  connections past the limit, Text/Speak/Marker floods, slow readers, silent peers and
        half-open handshakes, cancel storms, rapid connect/disconnect;
faults  a request that fails for real (prompt too long for a slot), clients killed with SIGKILL
        mid-utterance, SIGTERM of a real `pipecat-orpheus serve` mid-utterance (drain), a server
        restart under an `OrpheusClient`, the KV-cache-does-not-fit message;
soak    churn at full concurrency (connect, speak, read/cancel/abort, disconnect).
baseline (first) the good clients alone, the reference for their TTFA under abuse.

After each phase: engine slots back to 0, no asyncio task left over, /healthz 200.

python bench/bench_reliability.py --soak-s 600          # -> bench/results/reliability.json
python bench/bench_reliability.py --soak-s 20 --fuzz-frames 2000 --auth-attempts 300 --out /tmp/rel.json
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
from loguru import logger
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from pipecat_orpheus import protocol as p
from pipecat_orpheus.client import OrpheusClient
from pipecat_orpheus.config import load_config
from pipecat_orpheus.engine.runner import check_kv_fits
from pipecat_orpheus.errors import ModelLoadError
from pipecat_orpheus.server import OrpheusServer
from pipecat_orpheus.synthesizer import load_synthesizer

KEY = "bench-Key-7f3a9c"  # the server's one API key; must never reach a log
AUTH = {"kyutai-api-key": KEY}
GOOD_TEXT = "Hello there, how can I help you today?"
LONG_TEXT = "One two three four five six seven eight nine ten eleven twelve. " * 30
POISON = "語" * 150  # one 150-char piece, 3 byte-tokens a char: its prompt does not fit a slot, submit fails
ALLOWED_CLOSES = {1000, 1007, 1009, 1013}  # Eos done, invalid UTF-8, frame past max_frame_bytes, busy
REPLY_TIMEOUT_S = 60  # a well-behaved client waiting longer than this for audio counts as starved


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def p99_ms(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1)


def pack(**body) -> bytes:
    return msgpack.packb(body)


class Bench:
    """The server, its well-behaved clients and the counters of the current phase."""

    def __init__(self, server: OrpheusServer, synth, expected: int, n_good: int):
        self.server, self.synth, self.expected, self.n_good = server, synth, expected, n_good
        self.url = server.url
        self.failures: list[str] = []
        self.data_lost = 0
        self.ttfa: list[float] = []
        self.utterances = 0
        self.unhandled = 0  # exceptions that reached the event loop's handler

    def fail(self, what: str) -> None:
        self.failures.append(what[:300])

    async def good_client(self, stop: asyncio.Event, i: int) -> None:
        """Speak GOOD_TEXT again and again; every utterance must be whole and in time."""
        n = 0
        while not stop.is_set():
            try:
                async with connect(self.url, additional_headers=AUTH, compression=None) as ws:
                    assert p.decode_server(await ws.recv()) == p.Ready()
                    while not stop.is_set():
                        n += 1
                        t0, first, samples = time.perf_counter(), None, 0
                        await ws.send(pack(type="Speak", text=GOOD_TEXT, id=n))
                        while True:
                            async with asyncio.timeout(REPLY_TIMEOUT_S):
                                m = p.decode_server(await ws.recv())
                            if isinstance(m, p.Audio):
                                first = first if first is not None else time.perf_counter() - t0
                                samples += len(m.pcm)
                            elif isinstance(m, p.Done):
                                break
                            elif isinstance(m, p.Error):
                                raise RuntimeError(f"Error: {m.message}")
                        self.utterances += 1
                        self.ttfa.append(first)
                        if samples != self.expected:
                            self.data_lost += 1
                            self.fail(f"good client {i}: {samples} samples, expected {self.expected}")
            except Exception as e:  # noqa: BLE001 - any failure of a well-behaved client is a finding
                self.fail(f"good client {i}: {type(e).__name__}: {e}")
                await asyncio.sleep(0.5)

    async def phase(self, name: str, work) -> dict:
        """Run `work()` with the good clients alongside; then check the server is whole again."""
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
            async with asyncio.timeout(15):
                while self.synth.active_requests or self.synth.queued_requests or self.server.open_streams:
                    await asyncio.sleep(0.05)
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


async def http_status(port: int, path: str, headers: list[tuple[str, str]] = ()) -> int | None:
    """Status of a raw GET (None if the server closed without answering)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode())
    try:
        line = await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.transport.abort()
    return int(line.split()[1]) if line.startswith(b"HTTP/1.1") else None


# -- fuzz -------------------------------------------------------------------------------------


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 4 else 6)
    return [
        lambda: None,
        lambda: rng.choice([True, False]),
        lambda: rng.randint(-(2**63), 2**64 - 1),
        lambda: rng.random() * 10 ** rng.randint(-5, 30),
        lambda: "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randrange(40))),
        lambda: rng.randbytes(rng.randrange(40)),
        lambda: [random_value(rng, depth + 1) for _ in range(rng.randrange(5))],
        lambda: {random_value(rng, 5): random_value(rng, depth + 1) for _ in range(rng.randrange(4))},
        lambda: msgpack.ExtType(rng.randrange(128), rng.randbytes(4)),
    ][kind]()


def hostile_frame(rng: random.Random, limits) -> tuple[bytes | str, bool]:
    """One hostile frame, and whether to send it as a text frame."""
    types = list(p.CLIENT_MESSAGES)
    k = rng.randrange(16)
    if k == 0:
        return rng.randbytes(rng.randrange(1, 200)), False
    if k == 1:
        return msgpack.packb(random_value(rng)), False
    if k == 2:
        return msgpack.packb({"text": "hi", "type": random_value(rng)}), False
    if k == 3:
        return pack(type="".join(rng.choices("AbcSpeakTxt", k=rng.randrange(12)))), False
    if k == 4:
        t = rng.choice(types)
        return msgpack.packb({"type": t, rng.choice(["text", "id", "voice", "embeddings"]): random_value(rng)}), False
    if k == 5:  # valid messages in a random order (Eos too: the stream then ends, and we reconnect)
        t = rng.choice(types)
        body = {"type": t, "text": rng.choice(["Hi.", "", "a b c", "Okay then."]), "id": rng.randrange(5)}
        return msgpack.packb(body if t != "Voice" else {"type": t, "embeddings": [0.1], "shape": [1]}), False
    if k == 6:
        return pack(type="Text", text="w" * rng.randrange(limits.max_message_bytes - 100)), False
    if k == 7:
        return pack(type="Marker", id="m" * (limits.max_message_bytes + rng.randrange(1, 1000))), False
    if k == 8 and rng.random() < 0.1:  # past the hard ceiling: 1009, then a reconnect
        return b"\x00" * (limits.max_frame_bytes + 1), False
    if k == 9:
        return b"\x91" * rng.randrange(100, 5000) + b"\xc0", False  # deep nesting
    if k == 10:
        return b"\x82\xa4type\xa4Text\xa4text\xa3\xff\xfe\xfd", False  # invalid UTF-8 inside msgpack
    if k == 11:
        return " ".join(rng.choice(["hey", "you", "there", "."]) for _ in range(rng.randrange(8))), True
    if k == 12 and rng.random() < 0.2:
        return b"\xff\xfe bad utf-8", True  # websockets closes with 1007
    if k == 13:
        return pack(type="Speak", text="Hello.", id=rng.randrange(3))[: rng.randrange(1, 20)], False  # truncated
    if k == 14:
        return pack(type=rng.choice(types), id=[1, {"a": 2}], text=None, voice=123), False
    return pack(type="Cancel", id=rng.choice([None, 1, "zz", 2**70 % 2**63])), False


async def fuzzer(bench: Bench, limits, rng: random.Random, frames: int, counts: dict) -> None:
    while counts["frames"] < frames:
        async with connect(bench.url, additional_headers=AUTH, compression=None, max_size=None) as ws:

            async def drain():
                async for data in ws:
                    m = p.decode_server(data)
                    counts["errors"] += isinstance(m, p.Error)

            reader = asyncio.create_task(drain())
            try:
                while counts["frames"] < frames:
                    frame, text = hostile_frame(rng, limits)
                    await ws.send(frame, text=text)
                    counts["frames"] += 1
                    if counts["frames"] % 20 == 0:
                        await asyncio.sleep(0.01)
            except ConnectionClosed:
                pass
            try:
                await asyncio.wait_for(reader, 30)
            except (ConnectionClosed, TimeoutError):
                pass
        code = ws.close_code
        counts["closes"][str(code)] = counts["closes"].get(str(code), 0) + 1
        if code not in ALLOWED_CLOSES:
            bench.fail(f"fuzz: closed with {code} {ws.close_reason}")


async def run_fuzz(bench: Bench, limits, frames: int, seed: int) -> dict:
    counts = {"frames": 0, "errors": 0, "closes": {}}
    await asyncio.gather(*(fuzzer(bench, limits, random.Random(seed + i), frames, counts) for i in range(4)))
    return {"frames_fuzzed": counts["frames"], "errors_received": counts["errors"], "closes": counts["closes"]}


# -- auth -------------------------------------------------------------------------------------


def auth_cases() -> list[tuple[str, str, list[tuple[str, str]], int]]:
    """(name, query, headers, expected status)."""
    long, longer = "k" * 4000, "k" * 20000  # the second passes websockets' 8 KiB header line limit
    h, b = "kyutai-api-key", "Authorization"
    return [
        ("missing", "", [], 401),
        ("wrong header", "", [(h, "nope")], 401),
        ("wrong bearer", "", [(b, "Bearer nope")], 401),
        ("wrong query", "?auth_id=nope", [], 401),
        ("empty header", "", [(h, "")], 401),
        ("empty bearer", "", [(b, "Bearer ")], 401),
        ("empty query", "?auth_id=", [], 401),
        ("overlong header", "", [(h, long)], 401),
        ("overlong bearer", "", [(b, f"Bearer {long}")], 401),
        ("overlong query", f"?auth_id={long}", [], 401),
        ("past header limit", "", [(h, longer)], 0),  # refused by websockets' parser, any status but 101
        ("duplicated wrong header", "", [(h, "a"), (h, "b")], 401),
        ("duplicated header right+wrong", "", [(h, "a"), (h, KEY)], 401),
        ("duplicated bearer right+wrong", "", [(b, f"Bearer {KEY}"), (b, "Bearer a")], 401),
        ("duplicated query right+wrong", f"?auth_id=a&auth_id={KEY}", [], 401),
        ("header right, query wrong", "?auth_id=a", [(h, KEY)], 401),
        ("basic scheme", "", [(b, f"Basic {KEY}")], 401),
        ("case changed", "", [(h, KEY.upper())], 401),
        ("prefix", "", [(h, KEY[:-1])], 401),
        ("right header", "", [(h, KEY)], 101),
        ("right bearer", "", [(b, f"Bearer {KEY}")], 101),
        ("right query", f"?auth_id={KEY}", [], 101),
        ("right twice", f"?auth_id={KEY}", [(h, KEY)], 101),
    ]


async def auth_attempt(port: int, query: str, headers: list[tuple[str, str]]) -> int | None:
    ws_headers = [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Version", "13")]
    ws_headers.append(("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="))
    try:
        return await http_status(port, f"/api/tts_streaming{query}", ws_headers + headers)
    except (ConnectionError, OSError):
        return None


async def run_auth(bench: Bench, attempts: int) -> dict:
    cases, outcomes, n = auth_cases(), {}, 0
    while n < attempts:
        batch = cases[: attempts - n]
        got = await asyncio.gather(*(auth_attempt(bench.server.port, q, h) for _, q, h, _ in batch))
        for (name, _, _, want), status in zip(batch, got, strict=True):
            ok = status == want if want else status != 101
            outcomes[name] = outcomes.get(name, 0) + (not ok)
            if not ok:
                bench.fail(f"auth {name}: status {status}, expected {want or 'not 101'}")
        n += len(batch)
    return {"auth_attempts": n, "cases": len(cases), "wrong_outcomes": sum(outcomes.values())}


# -- floods -----------------------------------------------------------------------------------


async def connection_flood(bench: Bench, n: int) -> dict:
    async def one():
        try:
            ws = await connect(bench.url, additional_headers=AUTH, compression=None)
        except OSError as e:
            return f"refused: {e}"
        first = p.decode_server(await ws.recv())
        return ws, first

    got = await asyncio.gather(*(one() for _ in range(n)))
    ready = [g[0] for g in got if isinstance(g, tuple) and isinstance(g[1], p.Ready)]
    busy = sum(isinstance(g, tuple) and isinstance(g[1], p.Error) and g[1].code == "busy" for g in got)
    if len(ready) + busy != n:
        bench.fail(f"connection flood: {len(ready)} ready + {busy} busy of {n}")
    await asyncio.gather(*(ws.close() for ws in ready))
    for g in got:
        if isinstance(g, tuple) and not isinstance(g[1], p.Ready):
            await g[0].close()
    return {"ready": len(ready), "busy": busy}


async def text_flood(bench: Bench, frames: int) -> dict:
    counts: dict[str, int] = {}
    async with connect(bench.url, additional_headers=AUTH, compression=None) as ws:
        await ws.recv()

        async def drain():
            async for data in ws:
                m = p.decode_server(data)
                if isinstance(m, p.Error):
                    limit = m.message.split("limits.")[-1].split()[0] if "limits." in m.message else m.code
                    counts[limit] = counts.get(limit, 0) + 1

        reader = asyncio.create_task(drain())
        for i in range(frames):
            kind = i % 4
            if kind == 0:
                await ws.send(pack(type="Text", text="word " * 40))
            elif kind == 1:
                await ws.send(pack(type="Speak", text=LONG_TEXT[:400], id=i))
            elif kind == 2:
                await ws.send(pack(type="Marker", id=i))
            else:
                await ws.send("more words without an end " * 5)
        await ws.send(pack(type="Cancel"))
        await ws.send(pack(type="Eos"))  # the server closes (1000) once every reply has been sent
        await asyncio.wait_for(reader, 60)
    if ws.close_code != 1000:
        bench.fail(f"text flood: closed with {ws.close_code} {ws.close_reason}")
    return counts


async def slow_readers(bench: Bench, port: int, n: int) -> float:
    """`n` clients that speak and never read; seconds until the server has closed all of them."""
    before, conns = set(bench.server._streams), []
    t0 = time.perf_counter()
    for _ in range(n):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        ws = await connect(bench.url, sock=sock, additional_headers=AUTH, max_queue=1, compression=None)
        for i in range(8):
            await ws.send(pack(type="Speak", text=LONG_TEXT[:3000], id=i))
        conns.append(ws)
    ours = set(bench.server._streams) - before
    try:
        async with asyncio.timeout(120):
            while ours & bench.server._streams:
                await asyncio.sleep(0.05)
    except TimeoutError:
        bench.fail("slow readers not closed within 120 s")
    for ws in conns:
        ws.transport.abort()  # it reads nothing, so it would notice the server's close only by its own ping
    return time.perf_counter() - t0


async def silent_peer(port: int, handshake: bool) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.perf_counter()
    if handshake:
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            + f"kyutai-api-key: {KEY}\r\n".encode()
            + b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
    else:
        writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\n")  # and never the rest
    async with asyncio.timeout(60):
        while await reader.read(65536):  # Ready and pings we never answer, then EOF
            pass
    writer.close()
    return time.perf_counter() - t0


async def cancel_storm(bench: Bench, rounds: int, cancels: int) -> int:
    answered = 0
    async with connect(bench.url, additional_headers=AUTH, compression=None) as ws:
        await ws.recv()
        for r in range(rounds):
            await ws.send(pack(type="Speak", text=LONG_TEXT[:600], id=r))
            for _ in range(cancels):
                await ws.send(pack(type="Cancel", id=r if r % 2 else None))
            seen = 0
            while seen < cancels:
                m = p.decode_server(await ws.recv())
                seen += isinstance(m, p.Cancelled)
            answered += seen
    return answered


async def rapid(bench: Bench, cycles: int) -> None:
    for i in range(cycles):
        ws = await connect(bench.url, additional_headers=AUTH, compression=None)
        if i % 2:
            await ws.recv()
            await ws.send(pack(type="Speak", text="Quick one.", id=i))
        ws.transport.abort()


async def guarded(bench: Bench, name: str, work):
    """`await work`, or None with a failure recorded if it raised (the bench goes on)."""
    try:
        return await work
    except Exception as e:  # noqa: BLE001 - an abuse step that breaks is a finding, not the end of the run
        bench.fail(f"{name}: {type(e).__name__}: {e}")
        return None


async def run_floods(bench: Bench, cfg, scale: int) -> dict:
    port, out = bench.server.port, {}
    out["connection_flood"] = await guarded(
        bench, "connection flood", connection_flood(bench, cfg.limits.max_connections + 50)
    )
    floods = [await guarded(bench, "text flood", text_flood(bench, 500 * scale)) for _ in range(4)]
    floods = [f for f in floods if f is not None]
    out["text_flood_errors"] = {k: sum(f.get(k, 0) for f in floods) for k in set().union(*floods)}
    slow = await guarded(bench, "slow readers", slow_readers(bench, port, 4))
    out["slow_readers_closed_after_s"] = round(slow, 2) if slow is not None else None
    silent = await guarded(bench, "silent", asyncio.gather(*(silent_peer(port, True) for _ in range(8))))
    half_open = await guarded(bench, "half-open", asyncio.gather(*(silent_peer(port, False) for _ in range(8))))
    out["silent_peer_dropped_after_s"] = round(max(silent), 2) if silent else None
    out["half_open_dropped_after_s"] = round(max(half_open), 2) if half_open else None
    storms = await guarded(bench, "cancels", asyncio.gather(*(cancel_storm(bench, 5 * scale, 50) for _ in range(4))))
    out["cancels_answered"] = sum(storms or [])
    await guarded(bench, "rapid", asyncio.gather(*(rapid(bench, 50 * scale) for _ in range(8))))
    out["rapid_connects"] = 8 * 50 * scale
    return out


# -- faults -----------------------------------------------------------------------------------

KILLED_CLIENT = """
import asyncio, sys, msgpack
from websockets.asyncio.client import connect
async def main():
    ws = await connect(sys.argv[1], additional_headers={"kyutai-api-key": sys.argv[2]})
    await ws.recv()
    await ws.send(msgpack.packb({"type": "Speak", "text": sys.argv[3], "id": 1}))
    while msgpack.unpackb(await ws.recv())["type"] != "Audio":
        pass
    print("audio", flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


async def killed_client(bench: Bench) -> float:
    """A client process killed with SIGKILL mid-utterance; seconds until the server has dropped its stream."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", KILLED_CLIENT, bench.url, KEY, LONG_TEXT, stdout=subprocess.PIPE
    )
    assert (await asyncio.wait_for(proc.stdout.readline(), 60)).strip() == b"audio"
    streams = bench.server.open_streams
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    async with asyncio.timeout(30):
        while bench.server.open_streams >= streams:
            await asyncio.sleep(0.01)
    return time.perf_counter() - t0


async def poison(bench: Bench) -> int:
    """A request that fails for real fails alone: Error{internal} naming the key, then the stream goes on."""
    async with connect(bench.url, additional_headers=AUTH, compression=None) as ws:
        await ws.recv()
        await ws.send(pack(type="Speak", text=POISON, id="bad"))
        await ws.send(pack(type="Speak", text="Still fine.", id="ok"))
        got = []
        while not (got and isinstance(got[-1], p.Done)):
            got.append(p.decode_server(await ws.recv()))
    errors = [m for m in got if isinstance(m, p.Error)]
    if not (errors and errors[0].id == "bad" and "engine.max_tokens_per_slot" in errors[0].message):
        bench.fail(f"poison: {errors}")
    return len(errors)


async def sigterm_drain(model_dir: Path, backend: str) -> dict:
    """`pipecat-orpheus serve` in a subprocess, SIGTERM mid-utterance: the utterance finishes, then 1001."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, ORPHEUS_ENGINE_BACKEND=backend, ORPHEUS_SAMPLING_MAX_TOKENS="70")
    env.update(ORPHEUS_ENGINE_MAX_SLOTS="4", ORPHEUS_ENGINE_MAX_TOKENS_PER_SLOT="512", ORPHEUS_API_KEYS=KEY)
    cmd = [sys.executable, "-m", "pipecat_orpheus.cli", "serve", "--model", str(model_dir / "llm")]
    cmd += ["--codec", str(model_dir / "snac"), "--device", "cpu", "--port", str(port)]
    proc = await asyncio.create_subprocess_exec(*cmd, env=env, stderr=subprocess.DEVNULL)
    async with asyncio.timeout(180):
        while True:
            try:
                if await http_status(port, "/healthz") == 200:
                    break
            except OSError:
                pass
            await asyncio.sleep(0.2)
    async with connect(f"ws://127.0.0.1:{port}/ws", additional_headers=AUTH) as ws:
        await ws.recv()
        await ws.send(pack(type="Speak", text=LONG_TEXT[:500], id="u"))
        got = [p.decode_server(await ws.recv())]
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        try:
            async for data in ws:
                got.append(p.decode_server(data))
        except ConnectionClosed:
            pass
    rc = await asyncio.wait_for(proc.wait(), 60)
    return {
        "done_before_close": any(isinstance(m, p.Done) for m in got),
        "close_code": ws.close_code,
        "exit_code": rc,
        "drain_s": round(time.perf_counter() - t0, 2),
    }


async def restart_under_client(bench: Bench, cfg, rounds: int) -> dict:
    """A remote client's utterance cut by a server restart raises ConnectionError; the next one reconnects."""
    second = OrpheusServer(cfg, bench.synth, host="127.0.0.1", port=0, api_keys=[KEY])
    await second.start()
    port, cut, recovered = second.port, 0, 0
    client = OrpheusClient(f"ws://127.0.0.1:{port}", api_key=KEY, backoff_s=0.05)
    for _ in range(rounds):
        utterance = await client.speak(LONG_TEXT[:600])
        await anext(utterance)
        await second.shutdown(grace_s=0)
        try:
            await utterance.read_all()
        except ConnectionError:
            cut += 1
        second = OrpheusServer(cfg, bench.synth, host="127.0.0.1", port=port, api_keys=[KEY])
        await second.start()
        recovered += len(await (await client.speak("Back again.")).read_all()) > 0
    await client.close()
    await second.shutdown()
    if cut != rounds or recovered != rounds:
        bench.fail(f"restart: {cut} cut, {recovered} recovered of {rounds}")
    return {"restarts": rounds, "utterances_cut_with_error": cut, "next_utterance_ok": recovered}


def oom_message() -> dict:
    try:
        check_kv_fits(80 * 2**30, 40 * 2**30, load_config().engine)  # an H100 with other work on it
    except ModelLoadError as e:
        keys = [
            k for k in ("engine.max_slots", "engine.max_tokens_per_slot", "engine.gpu_memory_fraction") if k in str(e)
        ]
        return {"names_keys": keys}
    return {"names_keys": []}


async def run_faults(bench: Bench, cfg, model_dir: Path, scale: int) -> dict:
    poisoned = await guarded(bench, "poison", asyncio.gather(*(poison(bench) for _ in range(4 * scale))))
    out = {"poison_errors": sum(poisoned or [])}
    killed = [await guarded(bench, "killed client", killed_client(bench)) for _ in range(3)]
    out["killed_client_dropped_after_s"] = round(max((k for k in killed if k is not None), default=-1), 3)
    out["restart"] = await guarded(bench, "restart", restart_under_client(bench, cfg, 3 * scale))
    out["sigterm"] = s = await guarded(bench, "sigterm", sigterm_drain(model_dir, cfg.engine.backend))
    if s and not (s["done_before_close"] and s["close_code"] == 1001 and s["exit_code"] == 0):
        bench.data_lost += not s["done_before_close"]
        bench.fail(f"sigterm: {s}")
    out["oom"] = oom_message()
    if len(out["oom"]["names_keys"]) != 3:
        bench.fail(f"oom message: {out['oom']}")
    return out


# -- soak -------------------------------------------------------------------------------------


async def churner(bench: Bench, rng: random.Random, deadline: float, counts: dict) -> None:
    texts = ["Hi.", "How are you doing today?", "Let me check.", LONG_TEXT[:300]]
    while time.perf_counter() < deadline:
        ws = await connect(bench.url, additional_headers=AUTH, compression=None)
        await ws.recv()
        counts["connections"] += 1
        action = rng.choice(["read", "cancel", "abort", "eos"])
        await ws.send(pack(type="Speak", text=rng.choice(texts), id=1))
        if action == "abort":
            for _ in range(rng.randrange(3)):
                await ws.recv()
            ws.transport.abort()
        elif action == "cancel":
            await ws.recv()
            await ws.send(pack(type="Cancel", id=1))
            while not isinstance(p.decode_server(await ws.recv()), p.Cancelled):
                pass
            await ws.close()
        elif action == "read":
            while not isinstance(p.decode_server(await ws.recv()), p.Done):
                pass
            await ws.close()
        else:
            await ws.send(pack(type="Eos"))
            async for _ in ws:
                pass
            if ws.close_code != 1000:
                bench.fail(f"soak: Eos ended with {ws.close_code}")
        counts[action] += 1


async def run_soak(bench: Bench, seconds: float, concurrency: int, seed: int) -> dict:
    counts = {"connections": 0, "read": 0, "cancel": 0, "abort": 0, "eos": 0}
    start = time.perf_counter()
    warm = min(30.0, seconds / 4)  # allocator arenas and caches fill first; growth is measured after
    workers = [churner(bench, random.Random(seed + i), start + seconds, counts) for i in range(concurrency)]
    task = asyncio.gather(*workers)
    await asyncio.sleep(warm)
    gc.collect()
    rss0, samples = rss_mib(), []
    while not task.done():
        await asyncio.wait([task], timeout=5)
        samples.append(rss_mib())
    await task
    gc.collect()
    rss1 = rss_mib()
    growth = 100 * (rss1 - rss0) / rss0
    if growth >= 5:
        bench.fail(f"soak: RSS grew {growth:.1f} %")
    return {
        "soak_s": seconds,
        "concurrency": concurrency,
        "rss_after_warmup_mib": round(rss0, 1),
        "rss_end_mib": round(rss1, 1),
        "rss_max_mib": round(max(samples or [rss1]), 1),
        "rss_every_5s_mib": [round(x, 1) for x in samples],
        "soak_rss_growth_pct": round(growth, 2),
        **counts,
    }


# -- main -------------------------------------------------------------------------------------


async def main(args) -> dict:
    model_dir = Path(args.model_dir) if args.model_dir else Path(tempfile.mkdtemp(prefix="bench_rel_"))
    if not args.model_dir:
        from pipecat_orpheus.testing import make_tiny_model

        make_tiny_model(model_dir)
    overrides = {
        "model.llm": str(model_dir / "llm"),
        "model.codec": str(model_dir / "snac"),
        "model.device": "cpu",
        "engine.backend": args.backend,
        "engine.max_slots": args.slots,
        "engine.max_queue": 4 * args.slots,
        "engine.max_tokens_per_slot": 256,  # POISON's prompt (~460 tokens) does not fit: a real per-request fault
        "engine.max_chars_per_piece": 160,  # while every ASCII piece (<= ~175 tokens) + 70 audio tokens does
        "sampling.max_tokens": 70,  # 10 frames (0.85 s) per piece
        "sampling.seed": 7,  # every request of a text gets the same tokens: lengths are known
        "server.ping_interval_s": 1,
        "server.ping_timeout_s": 2,
        "limits.max_connections": 64,
        "limits.max_unsent_audio_s": 2,
    }
    cfg = load_config(overrides=overrides)
    synth = await asyncio.to_thread(load_synthesizer, cfg)
    solo = synth.submit(GOOD_TEXT)
    expected = len(await solo.read_all())
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)  # a slow reader's backlog reaches the server
    server = OrpheusServer(cfg, synth, sock=listener, api_keys=[KEY], close_timeout_s=2)
    await server.start()
    bench = Bench(server, synth, expected, args.good)
    leaks = {"lines": 0}

    def sink(message) -> None:
        leaks["lines"] += KEY in str(message) or KEY in str(message.record["exception"] or "")

    logger.remove()
    logger.add(sys.stderr, level="ERROR", format="{time:HH:mm:ss} {level} {name}: {message}")
    logger.add(sink, level="DEBUG")

    def on_unhandled(loop, context) -> None:
        bench.unhandled += 1
        loop.default_exception_handler(context)

    asyncio.get_running_loop().set_exception_handler(on_unhandled)
    phases = {}
    try:
        phases["baseline"] = await bench.phase("baseline", lambda: asyncio.sleep(args.baseline_s))  # no abuse
        phases["fuzz"] = await bench.phase("fuzz", lambda: run_fuzz(bench, cfg.limits, args.fuzz_frames, args.seed))
        phases["auth"] = await bench.phase("auth", lambda: run_auth(bench, args.auth_attempts))
        phases["floods"] = await bench.phase("floods", lambda: run_floods(bench, cfg, args.scale))
        phases["faults"] = await bench.phase("faults", lambda: run_faults(bench, cfg, model_dir, args.scale))
        soak = await bench.phase("soak", lambda: run_soak(bench, args.soak_s, args.slots, args.seed))
        phases["soak"] = soak
    finally:
        await server.shutdown(grace_s=1)
        synth.close()
    phases["auth"]["key_in_log_lines"] = leaks["lines"]
    if leaks["lines"]:
        phases["auth"]["failures"] += 1
    return {
        "frames_fuzzed": phases["fuzz"]["frames_fuzzed"],
        "auth_attempts": phases["auth"]["auth_attempts"],
        "failures": sum(ph["failures"] for ph in phases.values()),
        "data_lost": sum(ph["data_lost"] for ph in phases.values()),
        "rss_growth_pct": soak["soak_rss_growth_pct"],
        "soak_s": args.soak_s,
        "categories": phases,
        "setup": {
            "backend": cfg.engine.backend,
            "model": "tiny random Orpheus-format model (testing.make_tiny_model)"
            if not args.model_dir
            else args.model_dir,
            "engine_slots": args.slots,
            "good_clients": args.good,
            "expected_samples_per_good_utterance": expected,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), {platform.python_version()}",
            "command": " ".join(sys.argv),
        },
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--soak-s", type=float, default=600, help="length of the churn soak (seconds)")
    parser.add_argument("--fuzz-frames", type=int, default=20000, help="hostile frames sent")
    parser.add_argument("--auth-attempts", type=int, default=2000, help="handshakes with bad and good keys")
    parser.add_argument("--scale", type=int, default=4, help="multiplier of flood and fault rounds")
    parser.add_argument("--slots", type=int, default=16, help="engine.max_slots; also the soak's concurrency")
    parser.add_argument("--good", type=int, default=4, help="well-behaved clients running through every phase")
    parser.add_argument("--backend", default=load_config().engine.backend, choices=("batched", "reference"))
    parser.add_argument("--model-dir", default=None, help="a directory with llm/ and snac/ (default: a tiny model)")
    parser.add_argument("--baseline-s", type=float, default=20, help="good clients alone, for reference TTFA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/reliability.json")
    args = parser.parse_args()
    result = asyncio.run(main(args))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("categories", "setup")}))
    print(f"wrote {args.out}")
