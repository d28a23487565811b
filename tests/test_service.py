"""OrpheusTTSService through Pipecat's `run_test`, on the tiny real-format model: local and remote mode."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from pipecat.frames.frames import (
    ErrorFrame,
    Frame,
    InterruptionFrame,
    MetricsFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
    TTSUpdateSettingsFrame,
)
from pipecat.metrics.metrics import TTFBMetricsData, TTSUsageMetricsData
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.tests.utils import SleepFrame

from pipecat_orpheus import format as fmt
from pipecat_orpheus.config import Config
from pipecat_orpheus.engine.request import SamplingParams
from pipecat_orpheus.pcm import float_to_pcm16_bytes
from pipecat_orpheus.service import OrpheusTTSService, OrpheusTTSSettings
from pipecat_orpheus.speech import Synthesizer, load_synthesizer
from pipecat_orpheus.wire.client import OrpheusClient
from pipecat_orpheus.wire.server import OrpheusServer
from tests.helpers import (
    LONG_TOKENS,
    MAX_TOKENS,
    MODES,
    PROBE_S,
    EngineProbe,
    Restart,
    assert_whole_frames,
    index,
    llm_reply,
    of,
    orpheus_server,
    orpheus_tts,
    samples,
    speak,
    tiny_config,
    wait_idle,
)

# -- both modes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_frame_order_and_audio(mode: str, config: Config, synth: Synthesizer) -> None:
    """One sentence gives Started, exactly the engine's (seeded) 24 kHz audio, its words, then Stopped."""
    text = "Hello there, friend."
    sampling = SamplingParams.from_config(config.sampling)
    expected = float_to_pcm16_bytes(await synth.submit(text, sampling=sampling).read_all())
    async with orpheus_tts(mode, config) as (tts, _):
        down, up = await speak(tts, [TTSSpeakFrame(text)])
    assert not of(up, ErrorFrame)
    audio = of(down, TTSAudioRawFrame)
    assert audio and all(f.sample_rate == fmt.SAMPLE_RATE and len(f.audio) % 2 == 0 for f in audio)
    assert index(down, TTSStartedFrame) < index(down, TTSAudioRawFrame)
    assert index(down, TTSAudioRawFrame, last=True) < index(down, TTSStoppedFrame)
    assert_whole_frames(samples(down))
    assert b"".join(f.audio for f in audio) == expected, "audio lost, added or altered on the way"
    assert [f.text for f in of(down, TTSTextFrame)] == ["Hello", "there,", "friend."]
    assert index(down, TTSTextFrame, last=True) < index(down, TTSStoppedFrame)
    await wait_idle(synth)


@pytest.mark.parametrize("mode", MODES)
async def test_sentences_of_a_turn(mode: str, config: Config, synth: Synthesizer) -> None:
    """A streamed reply of three sentences is one Started/Stopped pair with word times cumulative over the turn."""
    async with orpheus_tts(mode, config) as (tts, _):
        down, _ = await speak(tts, llm_reply("Hi ", "there. ", "How are ", "you today? ", "Fine."))
    assert len(of(down, TTSStartedFrame)) == 1 and len(of(down, TTSStoppedFrame)) == 1
    assert len({f.context_id for f in of(down, TTSAudioRawFrame)}) == 1
    total = samples(down)
    assert total % fmt.SAMPLES_PER_FRAME == 0
    assert 3 <= total // fmt.SAMPLES_PER_FRAME <= 3 * (MAX_TOKENS // fmt.FRAME_TOKENS)
    words = of(down, TTSTextFrame)
    assert [w.text for w in words] == ["Hi", "there.", "How", "are", "you", "today?", "Fine."]
    pts = [w.pts for w in words]
    assert pts == sorted(pts) and len(set(pts)) == len(pts), "word times restart within the turn"
    assert 0 < (pts[-1] - pts[0]) / 1e9 < total / fmt.SAMPLE_RATE
    await wait_idle(synth)


@pytest.mark.parametrize("mode", MODES)
async def test_interruption_stops_audio_and_frees_engine(mode: str, tiny_model_dir: Path, synth: Synthesizer) -> None:
    """An interruption mid-sentence frees the engine request at once; no audio or words of the turn follow it."""
    config = tiny_config(tiny_model_dir, **{"sampling.max_tokens": LONG_TOKENS})
    frames = [TTSSpeakFrame("This sentence is long enough to be cut off."), SleepFrame(2.0), InterruptionFrame()]
    async with orpheus_tts(mode, config) as (tts, server):
        probe = EngineProbe(synth, server)
        down, _ = await speak(Pipeline([tts, probe]), [*frames, SleepFrame(PROBE_S + 0.3)])
    cut = index(down, InterruptionFrame)
    before = samples(down[:cut])
    assert 0 < before < LONG_TOKENS // fmt.FRAME_TOKENS * fmt.SAMPLES_PER_FRAME, "interrupted before or after speech"
    assert not of(down[cut:], TTSAudioRawFrame) and not of(down[cut:], TTSStoppedFrame)
    assert not of(down, TTSTextFrame), "words of an unfinished sentence reached the context"
    assert probe.freed, "the engine request outlived the interruption"
    if mode == "remote":
        assert probe.streams_open == 1, "freed by a disconnect, not by Cancel{id}"
    await wait_idle(synth)


@pytest.mark.parametrize("mode", MODES)
async def test_metrics(mode: str, config: Config, synth: Synthesizer) -> None:
    """TTFB and usage (characters) metrics are reported for a sentence."""
    text = "Metrics, please."
    async with orpheus_tts(mode, config) as (tts, _):
        down, _ = await speak(tts, [TTSSpeakFrame(text)], metrics=True)
    data = [d for f in of(down, MetricsFrame) for d in f.data]
    ttfb = [d.value for d in data if isinstance(d, TTFBMetricsData) and d.value > 0]
    assert ttfb and ttfb[0] < 30
    assert [d.value for d in data if isinstance(d, TTSUsageMetricsData)] == [len(text)]
    await wait_idle(synth)


@pytest.mark.parametrize("mode", MODES)
async def test_resamples_to_pipeline_rate(mode: str, config: Config, synth: Synthesizer) -> None:
    """At a 16 kHz output rate every frame is 16 kHz, even-length, and as long as the same (seeded) 24 kHz audio."""
    text = [TTSSpeakFrame("Sixteen kilohertz.")]
    async with orpheus_tts(mode, config) as (tts_24k, _):
        native, _ = await speak(tts_24k, text)
    async with orpheus_tts(mode, config) as (tts_16k, _):
        down, _ = await speak(tts_16k, text, rate=16000)
    audio = of(down, TTSAudioRawFrame)
    assert audio and all(f.sample_rate == 16000 and len(f.audio) % 2 == 0 for f in audio)
    assert_whole_frames(samples(native))
    assert abs(samples(down) - samples(native) * 16000 / fmt.SAMPLE_RATE) <= 2, (samples(down), samples(native))
    await wait_idle(synth)


# -- settings -----------------------------------------------------------------------------------


async def test_local_settings_update(config: Config, synth: Synthesizer) -> None:
    """A TTSUpdateSettingsFrame changes the next sentence's sampling and voice; a bad value is refused."""
    tts = OrpheusTTSService(config=config)
    update = TTSUpdateSettingsFrame(delta=OrpheusTTSSettings(max_tokens=7, voice="leo"))
    bad = TTSUpdateSettingsFrame(delta=OrpheusTTSSettings(top_p=0.0))
    down, up = await speak(tts, [TTSSpeakFrame("First one."), update, bad, TTSSpeakFrame("Second one.")])
    stops = [i for i, f in enumerate(down) if isinstance(f, TTSStoppedFrame)]
    assert len(stops) == 2
    assert assert_whole_frames(samples(down[: stops[0]])) > 1
    assert samples(down[stops[0] :]) == fmt.SAMPLES_PER_FRAME, "max_tokens=7 allows exactly one frame"
    assert tts._settings.voice == "leo" and tts._settings.top_p == config.sampling.top_p
    errors = of(up, ErrorFrame)
    assert len(errors) == 1 and "top_p" in errors[0].error
    await wait_idle(synth)


async def test_remote_settings_update(config: Config, synth: Synthesizer) -> None:
    """Remotely the voice follows updates (the server samples as configured); an unknown voice is refused."""
    async with orpheus_tts("remote", config) as (tts, _):
        update = TTSUpdateSettingsFrame(delta=OrpheusTTSSettings(voice="zoe", temperature=0.9))
        bad = TTSUpdateSettingsFrame(delta=OrpheusTTSSettings(voice="nobody"))
        down, up = await speak(tts, [update, bad, TTSSpeakFrame("Hello again.")])
    assert tts._settings.voice == "zoe"
    assert assert_whole_frames(samples(down)) >= 1
    errors = of(up, ErrorFrame)
    assert len(errors) == 1 and "nobody" in errors[0].error
    await wait_idle(synth)


# -- errors -------------------------------------------------------------------------------------


async def test_local_bad_model_path_is_an_error_frame(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A model that cannot load becomes a permanent ErrorFrame naming the problem, and no audio."""
    config = tiny_config(tiny_model_dir, **{"model.llm": str(tmp_path / "missing")})
    tts = OrpheusTTSService(config=config, stop_frame_timeout_s=0.2)
    down, up = await speak(tts, [TTSSpeakFrame("Nothing to hear.")])
    errors = of(up, ErrorFrame)
    assert len(errors) == 1 and "could not load the Orpheus model" in errors[0].error
    assert str(tmp_path / "missing") in errors[0].error
    assert not of(down, TTSAudioRawFrame) and not tts.is_usable


async def test_local_busy_engine_is_an_error_frame(tiny_model_dir: Path) -> None:
    """An engine with no free slot and no queue refuses at once: an ErrorFrame, and the service stays usable."""
    config = tiny_config(tiny_model_dir, **{"engine.max_queue": 0})
    busy = load_synthesizer(config)  # one slot, no queue
    blocker = busy.submit("I hold the only slot.", sampling=SamplingParams(max_tokens=LONG_TOKENS))
    try:
        tts = OrpheusTTSService(config=config, stop_frame_timeout_s=0.2)
        down, up = await speak(tts, [TTSSpeakFrame("Let me in.")])
    finally:
        blocker.cancel()
    errors = of(up, ErrorFrame)
    assert any("at capacity" in e.error for e in errors), [e.error for e in errors]
    assert not of(down, TTSAudioRawFrame) and tts.is_usable
    await wait_idle(busy)


async def test_remote_wrong_api_key_is_an_error_frame(config: Config) -> None:
    """A server refusing the API key gives an authentication ErrorFrame, and the service stops trying."""
    async with orpheus_server(config, api_keys=["the-right-key"]) as server:
        tts = OrpheusTTSService(config=config, url=server.url, api_key="a-wrong-key", stop_frame_timeout_s=0.2)
        down, up = await speak(tts, [TTSSpeakFrame("Am I allowed?")])
    errors = of(up, ErrorFrame)
    assert len(errors) == 1 and "refused the API key" in errors[0].error
    assert not of(down, TTSAudioRawFrame) and not tts.is_usable


async def test_remote_server_at_capacity_is_an_error_frame(tiny_model_dir: Path) -> None:
    """A server at its connection limit gives a retryable 'at capacity' ErrorFrame."""
    config = tiny_config(tiny_model_dir, **{"limits.max_connections": 1})
    async with orpheus_server(config) as server, OrpheusClient(server.url):
        client = OrpheusClient(server.url, max_retries=0)  # a client of our own: refused at once, no backoff
        tts = OrpheusTTSService(config=config, client=client, stop_frame_timeout_s=0.2)
        down, up = await speak(tts, [TTSSpeakFrame("Any room?")])
    errors = of(up, ErrorFrame)
    assert any("at capacity" in e.error for e in errors), [e.error for e in errors]
    assert not of(down, TTSAudioRawFrame) and tts.is_usable


async def test_remote_reconnects_after_drop_between_turns(config: Config, synth: Synthesizer) -> None:
    """When the server drops the connection between turns, the next turn reconnects and speaks, with no error."""
    spoke = asyncio.Event()  # turn one's TTSStoppedFrame came out
    servers: list[OrpheusServer] = []

    class Restarter(FrameProcessor):
        """Upstream of the service: at `Restart`, once turn one is over, restarts the server on its port."""

        async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
            await super().process_frame(frame, direction)
            if not isinstance(frame, Restart):
                await self.push_frame(frame, direction)
                return
            await spoke.wait()
            await servers[0].shutdown(grace_s=0)  # closes the service's connection (1001)
            servers.append(OrpheusServer(config, synth, host="127.0.0.1", port=servers[0].port, api_keys=[]))
            await servers[-1].start()

    class StopWatch(FrameProcessor):
        """Downstream of the service: notes the end of turn one."""

        async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
            await super().process_frame(frame, direction)
            if isinstance(frame, TTSStoppedFrame):
                spoke.set()
            await self.push_frame(frame, direction)

    async with orpheus_server(config) as first:
        servers.append(first)
        tts = OrpheusTTSService(config=config, url=first.url)
        try:
            frames = [TTSSpeakFrame("Turn one."), Restart(), TTSSpeakFrame("Turn two.")]
            down, up = await speak(Pipeline([Restarter(), tts, StopWatch()]), frames)
        finally:
            for server in servers[1:]:
                await server.shutdown(grace_s=0)
    assert not of(up, ErrorFrame)
    stops = [i for i, f in enumerate(down) if isinstance(f, TTSStoppedFrame)]
    assert len(stops) == 2 and samples(down[: stops[0]]) > 0 and samples(down[stops[0] :]) > 0
    await wait_idle(synth)
