"""What the reliability tests share: the key, the texts, the engine on the tiny model, a well-behaved client.

The fixtures are imported by each tests/test_reliability_*.py module (real sockets, the batched
engine); the long versions of those tests are bench/bench_reliability.py.
"""

import asyncio
import logging
import os
import socket
import sys
import time
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest
from loguru import logger
from websockets.asyncio.client import connect

from pipecat_orpheus.config import load_config
from pipecat_orpheus.speech import load_synthesizer
from pipecat_orpheus.wire import protocol as p
from tests.helpers import http_get, overrides, pack, until

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


# -- peers that never read, and what the server logs at ERROR ---------------------------------------


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One masked, final client frame (payload under 64 KiB)."""
    mask = os.urandom(4)
    size = bytes([0x80 | len(payload)]) if len(payload) < 126 else bytes([0x80 | 126]) + len(payload).to_bytes(2, "big")
    return bytes([0x80 | opcode]) + size + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


PING = client_frame(0x9, b"p" * 125)  # the largest ping a control frame allows; the server owes a pong for each


def deaf_peer(port: int) -> socket.socket:
    """A raw client that sends the upgrade and will never read a byte (a 4 KiB receive window).

    The answer, Ready and everything after it stay unread: what the server cannot send piles up on its side.
    """
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET /ws HTTP/1.1\r\nHost: x\r\n{UPGRADE}\r\n".encode())
    sock.setblocking(False)
    return sock


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@asynccontextmanager
async def serve_process(tiny_model_dir: Path, port: int, **env: str):
    """`pipecat-orpheus serve` on the tiny model in a subprocess, healthy; `env` adds ORPHEUS_* variables.

    Killed on the way out if the test left it running.
    """
    settings = {f"ORPHEUS_{k.replace('.', '_').upper()}": str(v) for k, v in tiny_overrides(tiny_model_dir).items()}
    cmd = [sys.executable, "-m", "pipecat_orpheus.cli", "serve", "--port", str(port)]
    proc = await asyncio.create_subprocess_exec(
        *cmd, env={**os.environ, **settings, "ORPHEUS_API_KEYS": "", **env}, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        async with asyncio.timeout(120):
            while not await _healthy(port):
                await asyncio.sleep(0.1)
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _healthy(port: int) -> bool:
    try:
        return (await http_get(port, "/healthz"))[0] == 200
    except OSError:
        return False
