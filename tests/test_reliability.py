"""The server under attack and faults: auth, floods, slow and silent peers, killed clients, SIGTERM, a short soak.

Real sockets, the batched engine on the tiny model; the long versions are bench/bench_reliability.py.
"""

import asyncio
import gc
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from loguru import logger
from pipecat.frames.frames import ErrorFrame, Frame, TTSAudioRawFrame, TTSSpeakFrame, TTSStartedFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from pipecat_orpheus import protocol as p
from pipecat_orpheus.cli import USER_ERROR_EXIT, main
from pipecat_orpheus.config import LimitsConfig, VoiceConfig, load_config
from pipecat_orpheus.engine.runner import check_kv_fits
from pipecat_orpheus.errors import ModelLoadError
from pipecat_orpheus.server import OrpheusServer, serve
from pipecat_orpheus.session import Abort, Session
from pipecat_orpheus.synthesizer import load_synthesizer
from tests.test_server import http_get, messages, pack, until, with_
from tests.test_service import Restart, of, samples, speak

KEY = "Rel-k3y-5ecret"
TEXT = "Hello there, how are you?"
LONG = "One two three four five six seven eight nine ten. " * 6
POISON = "\U0001f600" * 150  # 150 chars but 4 byte-tokens each: its prompt (~610) cannot fit a 512-token slot


def tiny_overrides(model_dir: Path) -> dict:
    return {
        "model.llm": str(model_dir / "llm"),
        "model.codec": str(model_dir / "snac"),
        "model.device": "cpu",
        "engine.backend": "batched",
        "engine.max_slots": 8,
        "engine.max_queue": 32,
        "engine.max_tokens_per_slot": 512,
        "engine.max_chars_per_piece": 160,
        "sampling.max_tokens": 28,  # 4 frames per piece: quick on CPU
        "sampling.seed": 7,  # the same text always gives the same tokens: the expected length is known
        "server.shutdown_grace_s": 5,
    }


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


# -- auth ---------------------------------------------------------------------------------------

H, B = "kyutai-api-key", "Authorization"
REFUSED = {
    "missing": ("", []),
    "wrong header": ("", [(H, "nope")]),
    "wrong bearer": ("", [(B, "Bearer nope")]),
    "wrong query": ("?auth_id=nope", []),
    "empty header": ("", [(H, "")]),
    "empty bearer": ("", [(B, "Bearer ")]),
    "empty query": ("?auth_id=", []),
    "overlong header": ("", [(H, KEY * 300)]),
    "overlong bearer": ("", [(B, "Bearer " + KEY * 300)]),
    "overlong query": ("?auth_id=" + KEY * 300, []),
    "duplicated wrong header": ("", [(H, "a"), (H, "b")]),
    "duplicated header right+wrong": ("", [(H, "a"), (H, KEY)]),
    "duplicated bearer right+wrong": ("", [(B, f"Bearer {KEY}"), (B, "Bearer a")]),
    "duplicated query right+wrong": (f"?auth_id={KEY}&auth_id=a", []),
    "header right, query wrong": ("?auth_id=a", [(H, KEY)]),
    "basic scheme": ("", [(B, f"Basic {KEY}")]),
    "prefix": ("", [(H, KEY[:-1])]),
}
ACCEPTED = {
    "header": ("", [(H, KEY)]),
    "bearer": ("", [(B, f"Bearer {KEY}")]),
    "query": (f"?auth_id={KEY}", []),
    "same key twice": (f"?auth_id={KEY}", [(H, KEY)]),
}
UPGRADE = (
    "Upgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: AQIDBAUGBwgJCgsMDQ4PEA==\r\n"
)


async def handshake_status(port, query, headers):
    lines = UPGRADE + "".join(f"{k}: {v}\r\n" for k, v in headers)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /api/tts_streaming{query} HTTP/1.1\r\nHost: x\r\n{lines}\r\n".encode())
    status = (await reader.readline()).split()[1]
    writer.transport.abort()
    return int(status)


async def test_auth_refuses_every_bad_key_before_upgrade_and_never_logs_it(config, synth):
    """Missing, wrong, empty, overlong, duplicated keys (header, bearer, query) get 401; the key is never logged."""
    lines = []
    sink = logger.add(lambda m: lines.append(str(m) + str(m.record["extra"])), level="DEBUG")
    try:
        async with serve(config, synth, port=0, api_keys=[KEY]) as server:
            for name, (query, headers) in REFUSED.items():
                assert await handshake_status(server.port, query, headers) == 401, name
            for name, (query, headers) in ACCEPTED.items():
                assert await handshake_status(server.port, query, headers) == 101, name
            async with connect(server.url, additional_headers={H: KEY}) as ws:
                assert p.decode_server(await ws.recv()) == p.Ready()
                assert (await utterance(ws, 1))[0] > 0
            too_long = await handshake_status(server.port, "", [(H, "k" * 20000)])  # past websockets' line limit
            assert too_long != 101 and (await http_get(server.port, "/healthz"))[0] == 200
            await idle(server, synth)
    finally:
        logger.remove(sink)
    assert lines and not [line for line in lines if KEY in line]


# -- exhaustion ---------------------------------------------------------------------------------


async def test_connection_flood_gets_busy_and_the_server_goes_on(config, synth):
    """Past limits.max_connections every extra client gets Error{busy} and 1013; the admitted ones still speak."""
    async with serve(with_(config, limits={"max_connections": 4}), synth, port=0, api_keys=[]) as server:

        async def one():
            ws = await connect(server.url)
            return ws, p.decode_server(await ws.recv())

        got = await asyncio.gather(*(one() for _ in range(20)))
        ready = [ws for ws, m in got if m == p.Ready()]
        busy = [ws for ws, m in got if isinstance(m, p.Error) and m.code == "busy"]
        assert len(ready) == 4 and len(busy) == 16
        for ws in busy:
            assert (await messages(ws))[1] == 1013
        assert [(await utterance(ws, 1))[0] > 0 for ws in ready] == [True] * 4
        await asyncio.gather(*(ws.close() for ws in ready))
        await idle(server, synth)


async def test_floods_slow_and_silent_peers_do_not_starve_a_good_client(config, synth, expected):
    """Floods, slow readers, silent peers, cancel storms and churn at once: a good client still gets all its audio."""
    cfg = with_(config, server={"ping_interval_s": 0.2, "ping_timeout_s": 0.5}, limits={"max_unsent_audio_s": 0.3})
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)  # a slow reader's backlog reaches the server
    async with serve(cfg, synth, sock=listener, api_keys=[KEY], close_timeout_s=0.5) as server:
        auth = {"kyutai-api-key": KEY}

        async def flooder():
            async with connect(server.url, additional_headers=auth) as ws:
                await ws.recv()
                for i in range(300):
                    await ws.send([pack(type="Text", text="word " * 50), pack(type="Speak", text=LONG, id=i)][i % 2])
                    await ws.send(pack(type="Marker", id=i))
                await ws.send(pack(type="Cancel"))
                await ws.send(pack(type="Eos"))
                got, code = await messages(ws)
            limits = {m.message.split("limits.")[1].split()[0] for m in got if isinstance(m, p.Error)}
            assert code == 1000 and limits == {"max_buffered_chars", "max_queued_utterances"}

        async def slow_reader():
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", server.port))
            sock.setblocking(False)
            ws = await connect(server.url, sock=sock, additional_headers=auth, max_queue=1)
            for i in range(8):
                await ws.send(pack(type="Speak", text=LONG, id=i))
            return ws

        async def silent_peer():
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(f"GET /ws HTTP/1.1\r\nHost: x\r\n{UPGRADE}kyutai-api-key: {KEY}\r\n\r\n".encode())
            t0 = time.monotonic()
            while await reader.read(65536):  # Ready, then pings never answered, then EOF
                pass
            writer.close()
            return time.monotonic() - t0

        async def cancel_storm():
            async with connect(server.url, additional_headers=auth) as ws:
                await ws.recv()
                await ws.send(pack(type="Speak", text=LONG, id="c"))
                for _ in range(200):
                    await ws.send(pack(type="Cancel", id="c"))
                got = [p.decode_server(await ws.recv())]
                while sum(isinstance(m, p.Cancelled) for m in got) < 200:
                    got.append(p.decode_server(await ws.recv()))
                first = got.index(p.Cancelled("c"))
                assert not [m for m in got[first:] if isinstance(m, (p.Audio, p.Done))]

        async def churn():
            for i in range(40):
                ws = await connect(server.url, additional_headers=auth)
                if i % 2:
                    await ws.recv()
                    await ws.send(pack(type="Speak", text=TEXT, id=i))
                ws.transport.abort()

        slow = await asyncio.gather(*(slow_reader() for _ in range(2)))
        results = await asyncio.gather(
            good_client(server.url, 4),
            *(flooder() for _ in range(2)),
            *(silent_peer() for _ in range(3)),
            *(cancel_storm() for _ in range(2)),
            churn(),
        )
        assert results[0] == [expected] * 4  # every sample of every utterance
        assert all(0.3 < t < 5 for t in results[3:6])  # silent peers dropped after the ping timeout
        await until(lambda: server.open_streams == 0, 30)  # slow readers too, closed at the buffer bound
        for ws in slow:
            ws.transport.abort()
        await idle(server, synth)


def test_unread_replies_are_bounded():
    """Unread replies past limits.max_unsent_messages close the client; waiting Markers are capped too."""
    session = Session(
        limits=LimitsConfig(max_unsent_messages=50, max_queued_utterances=3),
        voices=VoiceConfig(),
        voice="tara",
        max_chars_per_piece=100,
    )
    session.start()
    session.receive(p.Speak("A long one.", id="a"))
    for i in range(5):
        session.receive(p.Marker(i))
    errors = [o.message for o in session.outbox if isinstance(o.message, p.Error)]
    assert len(errors) == 2 and all("limits.max_queued_utterances" in e.message for e in errors)
    for _ in range(100):
        session.receive(p.Cancel("zz"))
    assert session.closed and len(session.outbox) == 1 and "limits.max_unsent_messages" in session.pop().message
    assert any(isinstance(a, Abort) for a in session.take_actions())


# -- faults -------------------------------------------------------------------------------------


async def test_a_failing_request_fails_alone(config, synth, expected):
    """A text whose prompt cannot fit a slot fails alone with Error{internal} naming the key; the rest goes on."""
    async with serve(config, synth, port=0, api_keys=[]) as server:
        async with connect(server.url) as ws:
            await ws.recv()
            other = asyncio.create_task(good_client(server.url, 3))
            await ws.send(pack(type="Speak", text=POISON, id="bad"))
            error = p.decode_server(await ws.recv())
            assert (error.type, error.code, error.id) == ("Error", "internal", "bad")
            assert "engine.max_tokens_per_slot" in error.message
            assert (await utterance(ws, "ok"))[0] == expected
            assert await other == [expected] * 3
        await idle(server, synth)


class FailsMidStream:
    """Test-only `Synthesizer`: the real engine, except that a text starting with FAIL breaks after one chunk.

    The fault enters where a broken device or codec would surface it, on the request's own
    `AudioStream` (finish with an error), and the engine is told to drop the request.
    """

    def __init__(self, engine):
        self.engine = engine

    def submit(self, text, **kwargs):
        stream = self.engine.submit(text, **kwargs)
        if text.startswith("FAIL"):
            put = stream.put

            def put_then_fail(pcm):
                put(pcm)
                stream.finish(RuntimeError("injected device fault"))
                self.engine.cancel(stream.request_id)

            stream.put = put_then_fail
        return stream

    @property
    def active_requests(self):
        return self.engine.active_requests

    @property
    def queued_requests(self):
        return self.engine.queued_requests

    def close(self):
        pass


async def test_a_request_failing_mid_stream_fails_alone(config, synth, expected):
    """A request whose audio breaks mid-stream ends with Error{internal}; its stream and every other go on."""
    async with serve(config, FailsMidStream(synth), port=0, api_keys=[]) as server:
        async with connect(server.url) as ws:
            await ws.recv()
            other = asyncio.create_task(good_client(server.url, 3))
            await ws.send(pack(type="Speak", text="FAIL " + LONG, id="bad"))
            got = [p.decode_server(await ws.recv())]
            while not isinstance(got[-1], p.Error):
                got.append(p.decode_server(await ws.recv()))
            assert got[0].type == "Audio" and (got[-1].code, got[-1].id) == ("internal", "bad")
            assert "injected device fault" in got[-1].message
            assert (await utterance(ws, "ok"))[0] == expected
            assert await other == [expected] * 3
        await idle(server, synth)


KILLED_CLIENT = """
import asyncio, sys, msgpack
from websockets.asyncio.client import connect
async def main():
    ws = await connect(sys.argv[1])
    await ws.recv()
    await ws.send(msgpack.packb({"type": "Speak", "text": sys.argv[2], "id": 1}))
    while msgpack.unpackb(await ws.recv())["type"] != "Audio":
        pass
    print("audio", flush=True)
    await asyncio.sleep(60)
asyncio.run(main())
"""


async def test_client_killed_mid_utterance_frees_its_slot(config, synth):
    """A client process killed with SIGKILL mid-utterance has its engine slot freed at once."""
    async with serve(with_(config, sampling={"max_tokens": 490}), synth, port=0, api_keys=[]) as server:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", KILLED_CLIENT, server.url, LONG, stdout=subprocess.PIPE
        )
        try:
            assert (await asyncio.wait_for(proc.stdout.readline(), 30)).strip() == b"audio"
            assert synth.active_requests == 1
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            t0 = time.monotonic()
            await idle(server, synth)
            assert time.monotonic() - t0 < 1.0  # its 490 tokens would take many seconds
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_sigterm_drains_a_real_serve_process(tiny_model_dir, tmp_path):
    """SIGTERM to `pipecat-orpheus serve` mid-utterance: new streams refused, the utterance gets Done, then 1001."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {f"ORPHEUS_{k.replace('.', '_').upper()}": str(v) for k, v in tiny_overrides(tiny_model_dir).items()}
    env.update(ORPHEUS_SAMPLING_MAX_TOKENS="140", ORPHEUS_SERVER_SHUTDOWN_GRACE_S="30", ORPHEUS_API_KEYS="")
    env = {**os.environ, **env}
    cmd = [sys.executable, "-m", "pipecat_orpheus.cli", "serve", "--port", str(port)]
    proc = await asyncio.create_subprocess_exec(*cmd, env=env, stderr=subprocess.DEVNULL)
    try:
        async with asyncio.timeout(90):
            while not await _healthy(port):
                await asyncio.sleep(0.1)
        async with connect(f"ws://127.0.0.1:{port}/ws") as ws:
            await ws.recv()
            await ws.send(pack(type="Speak", text=LONG, id="u"))
            got = [p.decode_server(await ws.recv())]
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(10):
                while (await http_get(port, "/healthz"))[0] != 503:
                    await asyncio.sleep(0.02)
            with pytest.raises((InvalidStatus, OSError)):
                await connect(f"ws://127.0.0.1:{port}/ws")  # 503 while draining
            rest, code = await messages(ws)
        got += rest
        assert got[0].type == "Audio" and isinstance(got[-1], p.Done) and code == 1001
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _healthy(port):
    try:
        return (await http_get(port, "/healthz"))[0] == 200
    except OSError:
        return False


async def test_server_restart_mid_turn_under_remote_service(config, synth):
    """The server going down mid-turn gives that turn an ErrorFrame; the next turn reconnects and speaks."""
    from pipecat_orpheus.service import OrpheusTTSService

    cfg = with_(config, sampling={"max_tokens": 490})  # turn one is still generating when the server goes
    heard = asyncio.Event()
    servers = []

    class Restarter(FrameProcessor):
        async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
            await super().process_frame(frame, direction)
            if isinstance(frame, Restart):
                await heard.wait()
                await servers[0].shutdown(grace_s=0)
                servers.append(OrpheusServer(cfg, synth, host="127.0.0.1", port=servers[0].port, api_keys=[]))
                await servers[-1].start()
            else:
                await self.push_frame(frame, direction)

    class Ear(FrameProcessor):
        async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
            await super().process_frame(frame, direction)
            if isinstance(frame, TTSAudioRawFrame):
                heard.set()
            await self.push_frame(frame, direction)

    async with serve(cfg, synth, host="127.0.0.1", port=0, api_keys=[]) as first:
        servers.append(first)
        tts = OrpheusTTSService(config=cfg, url=first.url)
        try:
            frames = [TTSSpeakFrame(LONG), Restart(), TTSSpeakFrame("Turn two.")]
            down, up = await speak(Pipeline([Restarter(), tts, Ear()]), frames)
        finally:
            for server in servers[1:]:
                await server.shutdown(grace_s=0)
    errors = of(up, ErrorFrame)
    assert len(errors) == 1 and "connection closed" in errors[0].error
    starts = [i for i, f in enumerate(down) if isinstance(f, TTSStartedFrame)]
    assert len(starts) == 2 and samples(down[: starts[1]]) > 0 and samples(down[starts[1] :]) > 0
    await until(lambda: synth.active_requests == 0)


def test_gpu_memory_check_and_start_failure_name_what_to_change(tiny_model_dir, capsys):
    """A KV cache that does not fit names the keys to lower; a model that cannot load ends serve with one line."""
    with pytest.raises(ModelLoadError) as info:
        check_kv_fits(need=60 * 2**30, free=40 * 2**30, config=load_config().engine)  # a busy 80 GB card
    for key in ("engine.max_slots", "engine.max_tokens_per_slot", "engine.gpu_memory_fraction"):
        assert key in str(info.value)
    argv = ["serve", "--model", str(tiny_model_dir / "missing"), "--codec", str(tiny_model_dir / "snac")]
    assert main([*argv, "--device", "cpu", "--port", "0"]) == USER_ERROR_EXIT
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("pipecat-orpheus: error:")] and "Traceback" not in err


# -- soak ---------------------------------------------------------------------------------------


def rss_mib():
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS"))
    return int(line.split()[1]) / 1024


async def test_short_soak_leaves_nothing_behind(config, synth):
    """~20 s of churn (connect, speak, read/cancel/abort, leave) at full concurrency: no slot, task or memory leak."""
    rng = random.Random(0)

    async def churner(deadline):
        while time.monotonic() < deadline:
            async with connect(server.url) as ws:
                await ws.recv()
                await ws.send(pack(type="Speak", text=rng.choice([TEXT, LONG]), id=1))
                action = rng.choice(["read", "cancel", "abort"])
                if action == "abort":
                    await ws.recv()
                    ws.transport.abort()
                elif action == "cancel":
                    await ws.send(pack(type="Cancel", id=1))
                    while p.decode_server(await ws.recv()) != p.Cancelled(1):
                        pass
                else:
                    while not isinstance(p.decode_server(await ws.recv()), p.Done):
                        pass

    async with serve(config, synth, port=0, api_keys=[]) as server:
        tasks = len(asyncio.all_tasks())
        slots = config.engine.max_slots
        await asyncio.gather(*(churner(time.monotonic() + 6) for _ in range(slots)))  # warm-up: arenas fill
        await idle(server, synth)
        gc.collect()
        before = rss_mib()
        await asyncio.gather(*(churner(time.monotonic() + 14) for _ in range(slots)))
        await idle(server, synth)
        gc.collect()
        assert len(asyncio.all_tasks()) == tasks
        assert (rss_mib() - before) / before < 0.05
