"""Faults: a request that fails, a client killed mid-utterance, SIGTERM, a server restart, memory at start."""

import asyncio

from pipecat.frames.frames import ErrorFrame, Frame, TTSAudioRawFrame, TTSSpeakFrame, TTSStartedFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from websockets.asyncio.client import connect

from bench.reliability.common import AUTH, KEY, LONG_TEXT, Bench, Findings, idle, pack, utterance
from bench.reliability.faults import killed_client, oom_message, poison, restart_under_client, sigterm_drain
from pipecat_orpheus.cli import USER_ERROR_EXIT, main
from pipecat_orpheus.wire import protocol as p
from pipecat_orpheus.wire.server import OrpheusServer, serve
from tests.helpers import Restart, of, samples, speak, until, with_
from tests.reliability_helpers import config, expected, synth, tiny_overrides  # noqa: F401 (fixtures)


async def test_a_failing_request_fails_alone(config, synth, expected):
    """A text whose prompt cannot fit a slot fails alone with Error{bad_request} naming the key; the rest goes on."""
    async with serve(config, synth, port=0, api_keys=[KEY]) as server:
        bench = Bench(server, synth, expected)
        failed_alone, others = await asyncio.gather(poison(bench), bench.speak(3))
        assert not bench.failures, bench.failures  # the Error, then a whole utterance on the same stream
        assert failed_alone == 1 and others == [expected] * 3
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
    async with serve(config, FailsMidStream(synth), port=0, api_keys=[KEY]) as server:
        bench = Bench(server, synth, expected)
        async with connect(server.url, additional_headers=AUTH) as ws:
            await ws.recv()
            other = asyncio.create_task(bench.speak(3))
            await ws.send(pack(type="Speak", text="FAIL " + LONG_TEXT[:300], id="bad"))
            got = [p.decode_server(await ws.recv())]
            while not isinstance(got[-1], p.Error):
                got.append(p.decode_server(await ws.recv()))
            first = next(m for m in got if not isinstance(m, p.Word))  # a word's time may come before its audio
            assert first.type == "Audio" and (got[-1].code, got[-1].id) == ("internal", "bad")
            assert "injected device fault" in got[-1].message
            assert (await utterance(ws, "ok"))[0] == expected
            assert await other == [expected] * 3
        await idle(server, synth)


async def test_client_killed_mid_utterance_frees_its_slot(config, synth, expected):
    """A client process killed with SIGKILL mid-utterance has its engine slot freed at once."""
    async with serve(with_(config, sampling={"max_tokens": 490}), synth, port=0, api_keys=[KEY]) as server:
        result = await killed_client(Bench(server, synth, expected), engine_alone=True)
    assert result["active_at_kill"] == 1
    assert result["slot_freed_after_s"] < 1.0  # its 490 tokens a piece would take many seconds


async def test_sigterm_drains_a_real_serve_process(tiny_model_dir):
    """SIGTERM to `pipecat-orpheus serve` mid-utterance: new streams refused, the utterance gets Done, then 1001."""
    findings = Findings()
    drain = {**tiny_overrides(tiny_model_dir), "sampling.max_tokens": 140, "server.shutdown_grace_s": 30}
    result = await sigterm_drain(findings, drain, text=LONG_TEXT[:300])
    assert not findings.failures, findings.failures
    assert result["first_message_audio"] and result["new_stream_refused"] and result["healthz_503_after_s"] < 10
    assert result["done_before_close"] and result["close_code"] == 1001 and result["exit_code"] == 0


async def test_server_restart_under_a_client_cuts_that_utterance_only(config, synth, expected):
    """An `OrpheusClient` utterance cut by a server restart raises ConnectionError; the next one reconnects, whole."""
    async with serve(config, synth, port=0, api_keys=[KEY]) as server:
        bench = Bench(server, synth, expected)
        result = await restart_under_client(bench, config, rounds=2)
    assert not bench.failures, bench.failures
    assert result["utterances_cut_with_error"] == result["next_utterance_whole"] == 2


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
            frames = [TTSSpeakFrame(LONG_TEXT[:300]), Restart(), TTSSpeakFrame("Turn two.")]
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
    assert len(oom_message()["names_keys"]) == 3  # engine.max_slots, max_tokens_per_slot, gpu_memory_fraction
    argv = ["serve", "--model", str(tiny_model_dir / "missing"), "--codec", str(tiny_model_dir / "snac")]
    assert main([*argv, "--device", "cpu", "--port", "0"]) == USER_ERROR_EXIT
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("pipecat-orpheus: error:")] and "Traceback" not in err
