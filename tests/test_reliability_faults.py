"""Faults: a request that fails, a client killed mid-utterance, SIGTERM, a server restart, memory at start."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pipecat.frames.frames import ErrorFrame, Frame, TTSAudioRawFrame, TTSSpeakFrame, TTSStartedFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from pipecat_orpheus.cli import USER_ERROR_EXIT, main
from pipecat_orpheus.config import load_config
from pipecat_orpheus.engine.runner import check_kv_fits
from pipecat_orpheus.errors import ModelLoadError
from pipecat_orpheus.wire import protocol as p
from pipecat_orpheus.wire.server import OrpheusServer, serve
from tests.helpers import Restart, http_get, messages, of, pack, samples, speak, until, with_
from tests.reliability_helpers import (  # noqa: F401 (fixtures)
    LONG,
    config,
    expected,
    good_client,
    idle,
    synth,
    tiny_overrides,
    utterance,
)

POISON = "\U0001f600" * 150  # 150 chars but 4 byte-tokens each: its prompt (~610) cannot fit a 512-token slot

KILLED_CLIENT = Path(__file__).resolve().parent / "killed_client.py"  # speaks, says "audio", waits to die


async def test_a_failing_request_fails_alone(config, synth, expected):
    """A text whose prompt cannot fit a slot fails alone with Error{bad_request} naming the key; the rest goes on."""
    async with serve(config, synth, port=0, api_keys=[]) as server:
        async with connect(server.url) as ws:
            await ws.recv()
            other = asyncio.create_task(good_client(server.url, 3))
            await ws.send(pack(type="Speak", text=POISON, id="bad"))
            error = p.decode_server(await ws.recv())
            assert (error.type, error.code, error.id) == ("Error", "bad_request", "bad")
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
                self.engine.backend.cancel(stream.request_id)

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


async def test_client_killed_mid_utterance_frees_its_slot(config, synth):
    """A client process killed with SIGKILL mid-utterance has its engine slot freed at once."""
    async with serve(with_(config, sampling={"max_tokens": 490}), synth, port=0, api_keys=[]) as server:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(KILLED_CLIENT), server.url, LONG, stdout=subprocess.PIPE
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
