"""OrpheusTTSService through Pipecat's `run_test`, on the tiny real-format model: local and remote mode."""

from __future__ import annotations

import asyncio
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
from loguru import logger
from pipecat.frames.frames import (
    DataFrame,
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
from pipecat.services.tts_service import TextAggregationMode
from pipecat.tests.utils import SleepFrame
from pipecat.utils import deprecation
from pipecat.utils.errors import ErrorCategory

from pipecat_orpheus import format as fmt
from pipecat_orpheus.config import Config
from pipecat_orpheus.engine.guard import duration_budget
from pipecat_orpheus.engine.request import SamplingParams
from pipecat_orpheus.pcm import float_to_pcm16_bytes
from pipecat_orpheus.service import OrpheusTTSService, OrpheusTTSSettings
from pipecat_orpheus.speech import Synthesizer, load_synthesizer
from pipecat_orpheus.wire.client import OrpheusClient
from pipecat_orpheus.wire.server import OrpheusServer
from tests.helpers import (
    GUARD,
    LONG_TOKENS,
    MAX_TOKENS,
    MODES,
    PROBE_S,
    BargeIn,
    EngineProbe,
    Hold,
    HoldUntilInterrupted,
    Restart,
    assert_whole_frames,
    heard_words,
    index,
    llm_reply,
    of,
    orpheus_server,
    orpheus_tts,
    samples,
    speak,
    tiny_config,
    until,
    wait_idle,
)

# Long enough to be interrupted mid-way: ~7.7 s at the estimated pace, 24 s of (noise) audio.
LONG_SENTENCE = (
    "This sentence goes on and on, long enough that the listener only hears its first few words "
    "before somebody talks over it."
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
    """An interruption mid-sentence frees the engine request at once; the words heard before it came with the audio."""
    config = tiny_config(tiny_model_dir, **{"sampling.max_tokens": LONG_TOKENS})
    frames = [TTSSpeakFrame(LONG_SENTENCE), SleepFrame(2.0), InterruptionFrame()]
    async with orpheus_tts(mode, config) as (tts, server):
        probe = EngineProbe(synth, server)
        down, _ = await speak(Pipeline([tts, probe]), [*frames, SleepFrame(PROBE_S + 0.3)])
    cut = index(down, InterruptionFrame)
    before = samples(down[:cut])
    assert 0 < before < LONG_TOKENS // fmt.FRAME_TOKENS * fmt.SAMPLES_PER_FRAME, "interrupted before or after speech"
    assert not of(down[cut:], TTSAudioRawFrame) and not of(down[cut:], TTSStoppedFrame)
    words = [f.text for f in of(down, TTSTextFrame)]
    assert abs(len(words) - len(heard_words(LONG_SENTENCE, before / fmt.SAMPLE_RATE))) <= 1
    assert LONG_SENTENCE.split()[: len(words)] == words, "only heard words, in order"
    assert probe.freed, "the engine request outlived the interruption"
    if mode == "remote":
        assert probe.streams_open == 1, "freed by a disconnect, not by Cancel{id}"
    await wait_idle(synth)


@pytest.mark.parametrize("mode", MODES)
async def test_barge_in_leaves_the_heard_words(mode: str, tiny_model_dir: Path, synth: Synthesizer) -> None:
    """Talked over 1.5 s into a long sentence, the words downstream are those heard (within one), none after."""
    config = tiny_config(tiny_model_dir, **{"sampling.max_tokens": LONG_TOKENS})
    async with orpheus_tts(mode, config) as (tts, _):
        pipeline = Pipeline([HoldUntilInterrupted(), tts, BargeIn(after_s=1.5)])
        down, _ = await speak(pipeline, [TTSSpeakFrame(LONG_SENTENCE), Hold()])
    cut = index(down, InterruptionFrame)
    heard_s = samples(down[:cut]) / fmt.SAMPLE_RATE
    assert 1.5 <= heard_s < 1.5 + 0.05  # a 40 ms frame at most past the barge-in point
    words = [f.text for f in of(down[:cut], TTSTextFrame)]
    expected = heard_words(LONG_SENTENCE, heard_s)
    assert 3 <= len(expected) < len(LONG_SENTENCE.split()), "the barge-in lands mid-sentence"
    assert abs(len(words) - len(expected)) <= 1 and LONG_SENTENCE.split()[: len(words)] == words
    first_audio = index(down, TTSAudioRawFrame)
    assert index(down, TTSTextFrame) < first_audio, "the first word comes with the first audio, not after the sentence"
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


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rate, frame_ms", [(fmt.SAMPLE_RATE, 40), (16000, 20)])
async def test_one_audio_frame_size(mode: str, rate: int, frame_ms: int, config: Config, synth: Synthesizer) -> None:
    """Every audio frame holds `audio_frame_ms` (40 ms by default) in both modes; only a sentence's last is shorter."""
    async with orpheus_tts(mode, config, **({} if frame_ms == 40 else {"audio_frame_ms": frame_ms})) as (tts, _):
        down, _ = await speak(tts, llm_reply("One sentence. ", "And another one."), rate=rate)
    sizes = [len(f.audio) // 2 for f in of(down, TTSAudioRawFrame)]
    full = rate * frame_ms // 1000
    assert sizes and all(n <= full for n in sizes) and sum(n < full for n in sizes) <= 2, sizes
    await wait_idle(synth)


# -- the constructor ----------------------------------------------------------------------------


def test_constructor_refusals_list_what_works(config: Config) -> None:
    """Arguments Orpheus cannot honour are ValueErrors naming what it can do instead."""
    settings = OrpheusTTSService.Settings
    cases = [
        ({"config": config, "settings": settings(voice="nobody")}, "'nobody' is not one of tara, leah, jess"),
        ({"config": config, "settings": settings(top_p=0.0)}, r"top_p: 0.0 is out of range \(0.0, 1.0\]"),
        ({"config": config, "text_aggregation_mode": TextAggregationMode.TOKEN}, "TextAggregationMode.SENTENCE"),
        ({"config": config, "aggregate_sentences": False}, "TextAggregationMode.SENTENCE"),
        ({"config": config, "audio_frame_ms": 25}, r"multiple of 10 in \[10, 1000\]"),
        ({"url": "ws://gpu:8000", "model": "canopylabs/orpheus-3b-0.1-ft"}, "server's model"),
        ({"url": "ws://gpu:8000", "settings": settings(max_tokens=3)}, r"max_tokens: 3 is out of range \[7,"),
        ({"url": "ws://gpu:8000", "client": OrpheusClient("ws://gpu:8000")}, "not both"),
        ({"url": "ftp://gpu"}, "ws://, wss://"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message), warnings.catch_warnings(record=True):  # model= warns too
            OrpheusTTSService(**kwargs)


async def test_voice_id_warns_and_works(config: Config, synth: Synthesizer) -> None:
    """voice_id= gives the deprecation warning of Pipecat's built-ins and speaks with that voice."""
    deprecation._warned_sites.clear()  # Pipecat warns once per call site and process
    with pytest.warns(DeprecationWarning, match=r"OrpheusTTSService\(voice_id=\.\.\.\)` is deprecated"):
        tts = OrpheusTTSService(config=config, voice_id="leo")
    sampling = SamplingParams.from_config(config.sampling)
    expected = float_to_pcm16_bytes(await synth.submit("Hello.", voice="leo", sampling=sampling).read_all())
    down, _ = await speak(tts, [TTSSpeakFrame("Hello.")])
    assert b"".join(f.audio for f in of(down, TTSAudioRawFrame)) == expected
    await wait_idle(synth)


@pytest.mark.parametrize("mode", MODES)
async def test_mode_is_logged_at_start(mode: str, config: Config, synth: Synthesizer) -> None:
    """Which mode the service runs in (and what it loads or reaches) is logged when the pipeline starts."""
    lines: list[str] = []
    sink = logger.add(lines.append, level="INFO", format="{message}")
    try:
        async with orpheus_tts(mode, config) as (tts, server):
            await speak(tts, [])
    finally:
        logger.remove(sink)
    where = config.model.llm if mode == "local" else server.url
    assert any(f"{mode} mode" in line and where in line for line in lines), lines


@pytest.mark.parametrize("mode", MODES)
async def test_a_sentence_the_guard_cut_short_is_logged(mode: str, tiny_model_dir: Path) -> None:
    """The random model runs past "Hi."'s duration budget: its audio stops there and the service says why."""
    config = tiny_config(tiny_model_dir, **{"sampling.max_tokens": 300, **GUARD})
    lines: list[str] = []
    sink = logger.add(lines.append, level="WARNING", format="{message}")
    try:
        async with orpheus_tts(mode, config) as (tts, _):
            down, _ = await speak(tts, [TTSSpeakFrame("Hi.")])
    finally:
        logger.remove(sink)
    assert samples(down) == duration_budget("Hi.", config.guard) // fmt.FRAME_TOKENS * fmt.SAMPLES_PER_FRAME
    assert any("guard cut 'Hi.' short (duration)" in line for line in lines), lines


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
    """Remotely voice and sampling follow updates (sent with each Speak); a voice the server lacks is refused."""
    async with orpheus_tts("remote", config) as (tts, _):
        update = TTSUpdateSettingsFrame(delta=OrpheusTTSSettings(voice="zoe", max_tokens=7))
        bad = TTSUpdateSettingsFrame(delta=OrpheusTTSSettings(voice="nobody"))
        down, up = await speak(tts, [update, bad, TTSSpeakFrame("Hello again.")])
    assert tts._settings.voice == "zoe"
    assert samples(down) == fmt.SAMPLES_PER_FRAME, "max_tokens=7 reached the server: exactly one frame"
    errors = of(up, ErrorFrame)
    assert len(errors) == 1 and "'nobody' is not one of tara" in errors[0].error
    await wait_idle(synth)


async def test_remote_voices_are_the_servers(tiny_model_dir: Path, synth: Synthesizer) -> None:
    """The server's default voice and voices rule: one only it has works; one it lacks is refused before speaking."""
    served = tiny_config(tiny_model_dir, **{"voices.available": ["tara", "nova"], "voices.default": "nova"})
    expected = load_synthesizer(served).submit("Only here.", sampling=SamplingParams.from_config(served.sampling))
    async with orpheus_server(served) as server:
        down, up = await speak(OrpheusTTSService(url=server.url), [TTSSpeakFrame("Only here.")])
        assert not of(up, ErrorFrame)
        assert b"".join(f.audio for f in of(down, TTSAudioRawFrame)) == float_to_pcm16_bytes(await expected.read_all())
        deprecation._warned_sites.clear()
        with pytest.warns(DeprecationWarning, match="voice_id"):
            tts = OrpheusTTSService(url=server.url, voice_id="nova")
        down, up = await speak(tts, [TTSSpeakFrame("Mine too.")])
        assert not of(up, ErrorFrame) and samples(down) > 0
        tts = OrpheusTTSService(url=server.url, settings=OrpheusTTSSettings(voice="leo"), stop_frame_timeout_s=0.2)
        down, up = await speak(tts, [TTSSpeakFrame("Not here.")])
    errors = of(up, ErrorFrame)
    assert len(errors) == 1 and "'leo' is not one of tara, nova" in errors[0].error
    assert errors[0].category == ErrorCategory.INVALID_REQUEST and not tts.is_usable
    assert not of(down, TTSAudioRawFrame)
    await wait_idle(synth)


async def test_remote_sampling_past_the_servers_bound_is_refused_at_start(config: Config) -> None:
    """A max_tokens over the server's own is refused when connecting, naming the field, before any sentence."""
    async with orpheus_server(config) as server:
        settings = OrpheusTTSSettings(max_tokens=config.sampling.max_tokens + 1)
        tts = OrpheusTTSService(url=server.url, settings=settings, stop_frame_timeout_s=0.2)
        down, up = await speak(tts, [TTSSpeakFrame("Too long.")])
    errors = of(up, ErrorFrame)
    assert len(errors) == 1 and "max_tokens" in errors[0].error and not of(down, TTSAudioRawFrame)


# -- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["config", "settings", "model="])
async def test_local_bad_model_path_is_an_error_frame(how: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    """A model that cannot load (named by config, Settings or model=) is an invalid_request ErrorFrame, and no audio."""
    missing = str(tmp_path / "missing")
    config = tiny_config(tiny_model_dir, **({"model.llm": missing} if how == "config" else {}))
    named = {"settings": {"settings": OrpheusTTSSettings(model=missing)}, "model=": {"model": missing}}.get(how, {})
    deprecation._warned_sites.clear()  # Pipecat warns once per call site and process
    with warnings.catch_warnings(record=True) as warned:
        tts = OrpheusTTSService(config=config, stop_frame_timeout_s=0.2, **named)
    assert ["model=" in str(w.message) for w in warned] == ([True] if how == "model=" else [])
    down, up = await speak(tts, [TTSSpeakFrame("Nothing to hear.")])
    errors = of(up, ErrorFrame)
    assert len(errors) == 1 and "could not load the Orpheus model" in errors[0].error and missing in errors[0].error
    assert errors[0].category == ErrorCategory.INVALID_REQUEST  # Pipecat's "names something that doesn't exist"
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


@dataclass
class Down(DataFrame):
    """Test marker: the server goes away here."""


@dataclass
class Up(DataFrame):
    """Test marker: the server comes back here."""


async def test_remote_connection_events_and_an_outage(config: Config, synth: Synthesizer) -> None:
    """on_connected at start, on_disconnected at server loss, on_connected when it is back. Meanwhile each sentence
    fails at once (connectivity); Pipecat writes the silent service off, and the reconnect brings it back."""
    events: list[str] = []
    spoke = asyncio.Event()
    servers: list[OrpheusServer] = []

    class Outage(FrameProcessor):
        """Upstream of the service: takes the server down at `Down`, brings it back at `Up`."""

        async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
            await super().process_frame(frame, direction)
            if isinstance(frame, Down):
                await spoke.wait()
                await servers[0].shutdown(grace_s=0)
                await until(lambda: "disconnected" in events)
            elif isinstance(frame, Up):
                await until(lambda: not tts.is_usable, timeout=30)  # two turns without audio: written off
                servers.append(OrpheusServer(config, synth, host="127.0.0.1", port=servers[0].port, api_keys=[]))
                await servers[-1].start()
                await until(lambda: events.count("connected") == 2, timeout=10)
            else:
                await self.push_frame(frame, direction)

    class StopWatch(FrameProcessor):
        """Downstream of the service: notes the end of a turn that had audio."""

        heard = False

        async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
            await super().process_frame(frame, direction)
            self.heard |= isinstance(frame, TTSAudioRawFrame)
            if isinstance(frame, TTSStoppedFrame) and self.heard:
                spoke.set()
            await self.push_frame(frame, direction)

    async with orpheus_server(config) as first:
        servers.append(first)
        client = OrpheusClient(first.url, backoff_s=0.05, max_backoff_s=0.2)
        tts = OrpheusTTSService(client=client, stop_frame_timeout_s=1.0, max_consecutive_zero_audio_contexts=2)
        for name in ("on_connected", "on_disconnected", "on_connection_error"):
            tts.add_event_handler(name, lambda service, *args, name=name: events.append(name[3:]))
        lost = [TTSSpeakFrame("Nobody hears this."), TTSSpeakFrame("Nor this.")]
        frames = [TTSSpeakFrame("Turn one."), Down(), *lost, Up(), TTSSpeakFrame("Back.")]
        try:
            down, up = await speak(Pipeline([Outage(), tts, StopWatch()]), frames)
        finally:
            for server in servers[1:]:
                await server.shutdown(grace_s=0)
    assert events[:2] == ["connected", "disconnected"] and "connection_error" in events
    assert events[-2:] == ["connected", "disconnected"] and events.count("connected") == 2
    connectivity = [e for e in of(up, ErrorFrame) if e.category == ErrorCategory.CONNECTIVITY]
    assert len(connectivity) == 2 and "Nobody hears" in connectivity[0].error
    starts = [i for i, f in enumerate(down) if isinstance(f, TTSStartedFrame)]
    assert samples(down[: starts[1]]) > 0 and samples(down[starts[-1] :]) > 0 and tts.is_usable
    await wait_idle(synth)
