"""Reliability bench, fuzz phase: hostile frames from seeded random generators over real sockets.

Bad msgpack, non-maps, unknown types, wrong field types, huge and nested values, invalid UTF-8,
text frames, frames past both size limits, valid messages in invalid orders. Every stream must end
only with a close code in ALLOWED_CLOSES.
"""

from __future__ import annotations

import asyncio
import random

import msgpack
from bench_reliability_common import ALLOWED_CLOSES, AUTH, Bench, pack
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from pipecat_orpheus.wire import protocol as p


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
