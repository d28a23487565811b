"""core/: the engine core as a real child process (tiny real-format model, batched engine, on the CPU)."""

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import websockets
from pipecat.frames.frames import ErrorFrame, TTSSpeakFrame

from bench.serving import engine_cores
from pipecat_orpheus import format as fmt
from pipecat_orpheus.backend import load_backend
from pipecat_orpheus.config import load_config
from pipecat_orpheus.core import EngineClient, EngineCores
from pipecat_orpheus.engine.guard import duration_budget
from pipecat_orpheus.engine.request import SamplingParams
from pipecat_orpheus.errors import EngineBusy, EngineFailed, InvalidRequest, ModelLoadError
from pipecat_orpheus.service import OrpheusTTSService
from pipecat_orpheus.speech import load_synthesizer, speech_for
from pipecat_orpheus.testing import tiny_model_overrides
from pipecat_orpheus.wire import protocol as p
from pipecat_orpheus.wire.server import serve
from tests.helpers import LONG_TEXT, eventually, http_get, of, samples, speak, until, with_

SEEDED = SamplingParams(max_tokens=70, seed=3)
LONG = SamplingParams(max_tokens=1400, min_tokens=1400, seed=4)  # 17 s of audio: still speaking when cut


def core_config(tiny_model_dir, **extra):
    return load_config(
        overrides={
            **tiny_model_overrides(tiny_model_dir),
            "engine.core_process": True,
            "engine.max_slots": 4,
            "engine.max_queue": 2,
            "engine.core_restarts": 1,
            "engine.core_restart_backoff_s": 0.1,
            "sampling.max_tokens": 70,
            **extra,
        }
    )


@pytest.fixture(scope="module")
def core(tiny_model_dir):
    client = EngineClient.start(core_config(tiny_model_dir, **{"codec.lookahead_frames": 0}))
    yield client
    client.close()


async def test_speaks_what_the_engine_in_this_process_speaks(tiny_model_dir, core):
    """Seeded audio through the core process is the audio of the same engine in this process, sample for sample.

    Without lookahead every frame is decoded the same way however fast the steps run (with it, a slow
    step may send a frame early with less lookahead: timing, not the process, would differ).
    """
    config = core_config(tiny_model_dir, **{"engine.core_process": False, "codec.lookahead_frames": 0})
    here = load_backend(config)
    try:
        expected = await speech_for(here, config).submit("Hello there.", sampling=SEEDED).read_all()
    finally:
        here.close()
    heard = await speech_for(core, config).submit("Hello there.", sampling=SEEDED).read_all()
    assert len(heard) > 0 and len(heard) % fmt.SAMPLES_PER_FRAME == 0
    np.testing.assert_array_equal(heard, expected)


async def test_many_streams_share_one_core(tiny_model_dir, core):
    """Four streams at once each get their whole utterance; fronts of different voices share one core."""
    config = core_config(tiny_model_dir)
    speech = speech_for(core, config)
    streams = [speech.submit(f"Stream {i}.", sampling=SEEDED) for i in range(4)]
    audio = await asyncio.gather(*(s.read_all() for s in streams))
    assert all(len(a) > 0 for a in audio)
    await until(lambda: core.active_requests == 0)
    assert core.stats.steps > 0 and core.stats.decode_tokens >= 4 * SEEDED.max_tokens  # the core's own counters
    assert 0 <= core.stats.headroom <= 4 and speech.engine_stats[0].headroom == core.stats.headroom


async def test_why_the_audio_ended_crosses_the_process(tiny_model_dir, core):
    """A piece past its duration budget ends as `duration`, one at max_tokens as `max_tokens`; the core counts them."""
    guard = {"guard.duration_factor": 1.0, "guard.duration_margin_s": 0.5}  # the front's budgets: "Hi." gets 0.7 s
    speech = speech_for(core, core_config(tiny_model_dir, **guard))
    before = core.stats.guard_duration
    runaway = speech.submit("Hi.", sampling=SamplingParams(max_tokens=300, seed=3))
    capped = speech.submit("Hello there.", sampling=SEEDED)
    audio = await asyncio.gather(runaway.read_all(), capped.read_all())
    budget = duration_budget("Hi.", speech.guard) // fmt.FRAME_TOKENS
    assert (runaway.stop_reason, capped.stop_reason) == ("duration", "max_tokens")
    assert [len(a) // fmt.SAMPLES_PER_FRAME for a in audio] == [budget, SEEDED.max_tokens // fmt.FRAME_TOKENS]
    assert await eventually(lambda: core.stats.guard_duration == before + 1, timeout_s=2.0), "not in the core's beat"


async def test_cancel_frees_the_slot_at_once(tiny_model_dir, core):
    """A cancelled stream ends now, and the core frees its slot at its next step."""
    stream = speech_for(core, core_config(tiny_model_dir)).submit(LONG_TEXT, sampling=LONG)
    await anext(stream)
    await until(lambda: core.active_requests == 1)
    t0 = time.perf_counter()
    stream.cancel()
    assert len(await stream.read_all()) == 0
    assert await eventually(lambda: core.active_requests == 0, timeout_s=2.0), "the slot outlived the cancel"
    assert time.perf_counter() - t0 < 2.0


async def test_refusals_cross_the_process_typed(tiny_model_dir, core):
    """A full queue ends the extra stream with EngineBusy; a prompt longer than a slot with InvalidRequest."""
    speech = speech_for(core, core_config(tiny_model_dir))
    held = [speech.submit(LONG_TEXT, sampling=LONG) for _ in range(6)]  # 4 slots + 2 queued
    extra = speech.submit("One too many.", sampling=SEEDED)
    with pytest.raises(EngineBusy):
        await extra.read_all()
    for stream in held:
        stream.cancel()
    await until(lambda: core.active_requests == 0 and core.queued_requests == 0)
    too_long = core.submit_prompts([[fmt.START_OF_HUMAN] * 3000], SEEDED)
    with pytest.raises(InvalidRequest) as refused:
        await too_long.read_all()
    assert "max_tokens_per_slot" in str(refused.value)


def test_a_core_that_cannot_load_says_why(tmp_path, tiny_model_dir):
    """A model the core cannot load raises ModelLoadError in the client with the loader's message."""
    bad = core_config(tiny_model_dir, **{"model.codec": str(tmp_path / "no-snac")})
    with pytest.raises(ModelLoadError, match="model.codec"):
        EngineClient.start(bad)


async def test_a_killed_core_fails_its_requests_and_comes_back(tiny_model_dir):
    """SIGKILL mid-utterance: the client gets Error{internal}, /healthz is 503, then the core restarts and speaks."""
    config = core_config(tiny_model_dir, **{"engine.core_restart_backoff_s": 2.0})  # down for > 2 s
    synth = load_synthesizer(config)
    assert isinstance(synth.backend, EngineCores)
    (core,) = synth.backend.cores
    try:
        async with serve(with_(config, sampling={"max_tokens": 1400}), synth, port=0, api_keys=[]) as server:
            async with websockets.connect(server.url) as ws:
                assert p.decode_server(await ws.recv()).type == "Ready"
                stream = synth.submit(LONG_TEXT, sampling=LONG)
                await anext(stream)
                await ws.send(p.encode(p.Speak(LONG_TEXT, id="cut")))
                os.kill(core.owner.process.pid, signal.SIGKILL)
                with pytest.raises(EngineFailed, match="died"):
                    await stream.read_all()
                assert await eventually(lambda: not core.healthy, timeout_s=5)
                errors = []
                async with asyncio.timeout(10):
                    while not errors:
                        message = p.decode_server(await ws.recv())
                        if isinstance(message, p.Error):
                            errors.append(message)
                assert errors[0].code == "internal" and errors[0].id == "cut"
                assert (await http_get(server.port, "/healthz"))[0] == 503
            assert await eventually(lambda: core.healthy, timeout_s=60), "the core did not restart"
            assert (await http_get(server.port, "/healthz"))[0] == 200
            assert len(await synth.submit("Back again.", sampling=SEEDED).read_all()) > 0
    finally:
        synth.close()


def test_the_core_exits_when_its_parent_is_killed(tiny_model_dir):
    """A bot killed with SIGKILL leaves no core process behind holding the device."""
    script = textwrap.dedent(
        f"""
        from pipecat_orpheus.core import EngineClient
        from tests.core.test_core import core_config
        client = EngineClient.start(core_config({str(tiny_model_dir)!r}))
        print(client.owner.process.pid, flush=True)
        import time; time.sleep(600)
        """
    )
    bot = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=os.getcwd())
    try:
        core_pid = int(bot.stdout.readline())
    finally:
        bot.kill()
        bot.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(core_pid):
        time.sleep(0.1)
    assert not _alive(core_pid), "the engine core outlived the process that started it"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has exited (its parent, init, reaps it)
    except FileNotFoundError:
        return False


async def test_services_of_one_bot_share_one_core(tiny_model_dir):
    """Two local-mode `OrpheusTTSService`s in one process speak through one engine core child process."""
    config = core_config(tiny_model_dir, **{"sampling.seed": 5})
    before = _cores()
    first, second = OrpheusTTSService(config=config), OrpheusTTSService(config=config)
    (down_a, up_a), (down_b, up_b) = await asyncio.gather(
        speak(first, [TTSSpeakFrame("First bot speaking.")]), speak(second, [TTSSpeakFrame("Second bot speaking.")])
    )
    assert not of(up_a, ErrorFrame) and not of(up_b, ErrorFrame)
    assert samples(down_a) > 0 and samples(down_b) > 0
    synth = load_synthesizer(config)
    assert isinstance(synth.backend, EngineCores)
    started = _cores() - before
    assert len(started) == 1, started
    synth.close()


def _cores() -> set[int]:
    """Pids of the engine core processes this process has started and that still run."""
    return set(engine_cores(os.getpid()))
