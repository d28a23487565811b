"""OrpheusTTSService through Pipecat's `run_test`, on the tiny real-format model: local and remote mode."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest
from pipecat.frames.frames import (
    ErrorFrame,
    Frame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    MetricsFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
    TTSUpdateSettingsFrame,
)
from pipecat.metrics.metrics import TTFBMetricsData, TTSUsageMetricsData
from pipecat.pipeline.worker import PipelineParams
from pipecat.tests.utils import SleepFrame, run_test

from pipecat_orpheus import format as fmt
from pipecat_orpheus.config import Config, load_config
from pipecat_orpheus.service import OrpheusTTSService, OrpheusTTSSettings
from pipecat_orpheus.synthesizer import Synthesizer, load_synthesizer

MAX_TOKENS = 28  # 4 frames (341 ms) per sentence: enough to stream several chunks, quick on CPU
LONG_TOKENS = 1400  # 200 frames: a sentence still generating when the interruption lands
START_TIMEOUT_S = 60.0  # the first test of the session loads the tiny model inside StartFrame


def tiny_config(model_dir: Path, **overrides: object) -> Config:
    """The tiny model on the reference path, short sentences, reproducible sampling."""
    return load_config(
        overrides={
            "engine.backend": "reference",
            "model.llm": str(model_dir / "llm"),
            "model.codec": str(model_dir / "snac"),
            "model.device": "cpu",
            "sampling.max_tokens": MAX_TOKENS,
            "sampling.seed": 7,
            **overrides,
        }
    )


@pytest.fixture(scope="module")
def config(tiny_model_dir: Path) -> Config:
    """Config of the tiny model, reference backend."""
    return tiny_config(tiny_model_dir)


@pytest.fixture(scope="module")
def synth(config: Config) -> Synthesizer:
    """The process-wide shared synthesizer the local service uses (loaded here once)."""
    return load_synthesizer(config)


async def speak(
    service: OrpheusTTSService, frames: Sequence[Frame], *, rate: int = fmt.SAMPLE_RATE, metrics: bool = False
) -> tuple[list[Frame], list[Frame]]:
    """Run `frames` through the service in a pipeline whose output rate is `rate`."""
    params = PipelineParams(audio_out_sample_rate=rate, enable_metrics=metrics, enable_usage_metrics=metrics)
    down, up = await run_test(service, frames_to_send=frames, pipeline_params=params, start_timeout=START_TIMEOUT_S)
    return list(down), list(up)


def of(frames: Sequence[Frame], kind: type) -> list:
    """The frames of one type, in order."""
    return [f for f in frames if isinstance(f, kind)]


def index(frames: Sequence[Frame], kind: type, last: bool = False) -> int:
    """Position of the first (or last) frame of a type."""
    hits = [i for i, f in enumerate(frames) if isinstance(f, kind)]
    assert hits, f"no {kind.__name__} in {[type(f).__name__ for f in frames]}"
    return hits[-1] if last else hits[0]


def samples(frames: Sequence[Frame]) -> int:
    """Total 16-bit samples in the audio frames."""
    return sum(len(f.audio) // 2 for f in of(frames, TTSAudioRawFrame))


def assert_whole_frames(n: int, max_tokens: int = MAX_TOKENS) -> int:
    """`n` 24 kHz samples are 1..max_tokens/7 whole SNAC frames; return the count."""
    frames, rest = divmod(n, fmt.SAMPLES_PER_FRAME)
    assert rest == 0 and 1 <= frames <= max_tokens // fmt.FRAME_TOKENS, n
    return frames


async def wait_idle(synth: Synthesizer, timeout_s: float = 5.0) -> None:
    """Wait until the engine holds no request (a cancel frees the slot at its next step)."""
    for _ in range(int(timeout_s / 0.02)):
        if synth.active_requests == 0 and synth.queued_requests == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"engine still busy: {synth.active_requests} active, {synth.queued_requests} queued")


def llm_reply(*tokens: str) -> list[Frame]:
    """The frames an LLM service pushes for one streamed reply."""
    return [LLMFullResponseStartFrame(), *(LLMTextFrame(t) for t in tokens), LLMFullResponseEndFrame()]


# -- local mode --------------------------------------------------------------------------------


async def test_local_frame_order_and_audio(config: Config, synth: Synthesizer) -> None:
    """One sentence gives Started, then whole SNAC frames of 24 kHz audio, word frames, then Stopped."""
    down, up = await speak(OrpheusTTSService(config=config), [TTSSpeakFrame("Hello there, friend.")])
    assert not of(up, ErrorFrame)
    audio = of(down, TTSAudioRawFrame)
    assert len(audio) >= 1 and all(f.sample_rate == fmt.SAMPLE_RATE and len(f.audio) % 2 == 0 for f in audio)
    assert index(down, TTSStartedFrame) < index(down, TTSAudioRawFrame)
    assert index(down, TTSAudioRawFrame, last=True) < index(down, TTSStoppedFrame)
    assert_whole_frames(samples(down))
    assert [f.text for f in of(down, TTSTextFrame)] == ["Hello", "there,", "friend."]
    assert index(down, TTSTextFrame, last=True) < index(down, TTSStoppedFrame)
    await wait_idle(synth)


async def test_local_sentences_of_a_turn(config: Config, synth: Synthesizer) -> None:
    """A streamed reply of three sentences is one Started/Stopped pair with cumulative word times."""
    reply = llm_reply("Hi ", "there. ", "How are ", "you today? ", "Fine.")
    down, _ = await speak(OrpheusTTSService(config=config), reply)
    assert len(of(down, TTSStartedFrame)) == 1 and len(of(down, TTSStoppedFrame)) == 1
    contexts = {f.context_id for f in of(down, TTSAudioRawFrame)}
    assert len(contexts) == 1
    total = samples(down)
    assert 3 <= total // fmt.SAMPLES_PER_FRAME <= 3 * (MAX_TOKENS // fmt.FRAME_TOKENS)
    assert total % fmt.SAMPLES_PER_FRAME == 0
    words = of(down, TTSTextFrame)
    assert [w.text for w in words] == ["Hi", "there.", "How", "are", "you", "today?", "Fine."]
    pts = [w.pts for w in words]
    assert pts == sorted(pts) and len(set(pts)) == len(pts), "word times restart within the turn"
    spread_s = (pts[-1] - pts[0]) / 1e9
    assert 0 < spread_s < total / fmt.SAMPLE_RATE
    await wait_idle(synth)


async def test_local_interruption_stops_audio_and_frees_slot(config: Config, synth: Synthesizer) -> None:
    """An interruption mid-sentence cancels the engine request and no audio of the turn follows it."""
    service = OrpheusTTSService(config=config, settings=OrpheusTTSSettings(max_tokens=LONG_TOKENS))
    frames = [TTSSpeakFrame("This sentence is long enough to be cut off."), SleepFrame(2.0), InterruptionFrame()]
    down, _ = await speak(service, [*frames, SleepFrame(0.5)])
    cut = index(down, InterruptionFrame)
    before = samples(down[:cut])
    assert 0 < before < LONG_TOKENS // fmt.FRAME_TOKENS * fmt.SAMPLES_PER_FRAME, "interrupted before or after speech"
    assert not of(down[cut:], TTSAudioRawFrame) and not of(down[cut:], TTSStoppedFrame)
    assert not of(down, TTSTextFrame), "words of an unfinished sentence were committed"
    await wait_idle(synth)


async def test_local_settings_update(config: Config, synth: Synthesizer) -> None:
    """A TTSUpdateSettingsFrame changes the next sentence's sampling; a bad value is refused with an error."""
    service = OrpheusTTSService(config=config)
    update = TTSUpdateSettingsFrame(delta=OrpheusTTSSettings(max_tokens=7, voice="leo"))
    bad = TTSUpdateSettingsFrame(delta=OrpheusTTSSettings(top_p=0.0))
    frames = [TTSSpeakFrame("First one."), update, bad, TTSSpeakFrame("Second one.")]
    down, up = await speak(service, frames)
    stops = [i for i, f in enumerate(down) if isinstance(f, TTSStoppedFrame)]
    assert len(stops) == 2
    assert_whole_frames(samples(down[: stops[0]]))
    assert samples(down[stops[0] :]) == fmt.SAMPLES_PER_FRAME, "max_tokens=7 allows exactly one frame"
    assert service._settings.voice == "leo" and service._settings.top_p == config.sampling.top_p
    errors = of(up, ErrorFrame)
    assert len(errors) == 1 and "top_p" in errors[0].error
    await wait_idle(synth)


async def test_local_metrics(config: Config, synth: Synthesizer) -> None:
    """TTFB and usage metrics are reported for a sentence."""
    text = "Metrics, please."
    down, _ = await speak(OrpheusTTSService(config=config), [TTSSpeakFrame(text)], metrics=True)
    data = [d for f in of(down, MetricsFrame) for d in f.data]
    ttfb = [d.value for d in data if isinstance(d, TTFBMetricsData) and d.value > 0]
    usage = [d.value for d in data if isinstance(d, TTSUsageMetricsData)]
    assert ttfb and 0 < ttfb[0] < 30
    assert usage == [len(text)]
    await wait_idle(synth)


async def test_local_resamples_to_pipeline_rate(config: Config, synth: Synthesizer) -> None:
    """At a 16 kHz output rate every frame is 16 kHz, even-length, and as long as the 24 kHz audio."""
    down, _ = await speak(OrpheusTTSService(config=config), [TTSSpeakFrame("Sixteen kilohertz.")], rate=16000)
    audio = of(down, TTSAudioRawFrame)
    assert audio and all(f.sample_rate == 16000 and len(f.audio) % 2 == 0 for f in audio)
    at_24k = samples(down) * fmt.SAMPLE_RATE / 16000
    whole = round(at_24k / fmt.SAMPLES_PER_FRAME) * fmt.SAMPLES_PER_FRAME
    assert whole >= fmt.SAMPLES_PER_FRAME and abs(at_24k - whole) <= 3, at_24k
    await wait_idle(synth)


async def test_local_bad_model_path_is_an_error_frame(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A model that cannot load becomes a permanent ErrorFrame naming the problem, and no audio."""
    config = tiny_config(tiny_model_dir, **{"model.llm": str(tmp_path / "missing")})
    service = OrpheusTTSService(config=config, stop_frame_timeout_s=0.2)
    down, up = await speak(service, [TTSSpeakFrame("Nothing to hear.")])
    errors = of(up, ErrorFrame)
    assert len(errors) == 1 and "could not load the Orpheus model" in errors[0].error
    assert not of(down, TTSAudioRawFrame) and not service.is_usable
