"""What the reliability tests share: the key, the texts, the engine on the tiny model, a well-behaved client.

The fixtures are imported by each tests/test_reliability_*.py module (real sockets, the batched
engine); the long versions of those tests are bench/bench_reliability.py.
"""

import asyncio
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from pipecat_orpheus.config import load_config
from pipecat_orpheus.speech import load_synthesizer
from pipecat_orpheus.wire import protocol as p
from tests.helpers import overrides, pack, until

KEY = "Rel-k3y-5ecret"
TEXT = "Hello there, how are you?"
LONG = "One two three four five six seven eight nine ten. " * 6
UPGRADE = (
    "Upgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: AQIDBAUGBwgJCgsMDQ4PEA==\r\n"
)


def tiny_overrides(model_dir: Path) -> dict:
    """The server tests' overrides with the batched engine, seeded sampling and room for the fault tests."""
    return overrides(
        model_dir,
        **{
            "engine.backend": "batched",
            "engine.max_slots": 8,
            "engine.max_queue": 32,
            "engine.max_tokens_per_slot": 512,
            "engine.max_chars_per_piece": 160,
            "sampling.max_tokens": 28,  # 4 frames per piece: quick on CPU
            "sampling.seed": 7,  # the same text always gives the same tokens: the expected length is known
            "server.shutdown_grace_s": 5,
        },
    )


@pytest.fixture(scope="module")
def config(tiny_model_dir):
    return load_config(overrides=tiny_overrides(tiny_model_dir))


@pytest.fixture(scope="module")
def synth(config):
    engine = load_synthesizer(config)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def expected(synth):
    """Samples of one utterance of TEXT, spoken alone."""
    return sum(len(c) for c in asyncio.run(_read_all(synth, TEXT)))


async def _read_all(synth, text):
    return [chunk async for chunk in synth.submit(text)]


async def utterance(ws, id, text=TEXT):
    """Speak `text` on an open stream; (samples, time to first audio) once Done arrives."""
    t0, first, n = time.perf_counter(), None, 0
    await ws.send(pack(type="Speak", text=text, id=id))
    while True:
        m = p.decode_server(await ws.recv())
        if isinstance(m, p.Audio):
            first = first or time.perf_counter() - t0
            n += len(m.pcm)
        elif isinstance(m, p.Done) and m.id == id:
            return n, first
        elif isinstance(m, p.Error):
            raise AssertionError(m)


async def good_client(url, utterances):
    async with connect(url, additional_headers={"kyutai-api-key": KEY}) as ws:
        assert p.decode_server(await ws.recv()) == p.Ready()
        return [(await utterance(ws, i))[0] for i in range(utterances)]


async def idle(server, synth):
    await until(lambda: synth.active_requests == 0 and synth.queued_requests == 0 and server.open_streams == 0, 10)
