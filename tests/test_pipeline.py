"""OrpheusTTSService where a voice agent puts it: LLM text frames in, audio out, heard text into the context."""

from __future__ import annotations

from pathlib import Path

import pytest
from pipecat.frames.frames import (
    ErrorFrame,
    Frame,
    InterruptionFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.tests.utils import run_test

from pipecat_orpheus import format as fmt
from pipecat_orpheus.config import Config
from pipecat_orpheus.service import OrpheusTTSService
from pipecat_orpheus.speech import Synthesizer
from tests.helpers import (
    LONG_TOKENS,
    MAX_TOKENS,
    MODES,
    START_TIMEOUT_S,
    BargeIn,
    Hold,
    HoldUntilInterrupted,
    heard_words,
    index,
    llm_reply,
    of,
    orpheus_tts,
    samples,
    tiny_config,
    wait_idle,
)

REPLY = ("Sure", ", I ", "can help. ", "What is ", "your name?")  # two sentences, streamed as LLM tokens
LONG_REPLY = ("This answer ", "goes on and on, ", "long enough that ", "you only hear ", "its first words. ", "Name?")
OUT_RATE = 16000  # a telephony-style transport rate, so the service resamples


async def agent_turn(
    tts: OrpheusTTSService, frames: list[Frame], *, barge_in_s: float | None = None
) -> tuple[list[Frame], list[Frame], LLMContext]:
    """Run LLM frames through tts -> assistant context aggregator, the tail of an STT -> LLM -> TTS agent.

    With `barge_in_s`, a listener talks over the bot once that much audio has gone by.
    """
    context = LLMContext()
    assistant = LLMContextAggregatorPair(context).assistant()
    listener = [] if barge_in_s is None else [HoldUntilInterrupted(), tts, BargeIn(barge_in_s)]
    down, up = await run_test(
        Pipeline([*(listener or [tts]), assistant]),
        frames_to_send=frames + ([Hold()] if listener else []),
        pipeline_params=PipelineParams(audio_out_sample_rate=OUT_RATE),
        start_timeout=START_TIMEOUT_S,
    )
    return list(down), list(up), context


def assistant_text(context: LLMContext) -> str:
    """Everything the assistant said, as committed to the conversation context."""
    return " ".join(m["content"] for m in context.get_messages() if m.get("role") == "assistant")


@pytest.mark.parametrize("mode", MODES)
async def test_agent_turn(mode: str, config: Config, synth: Synthesizer) -> None:
    """A streamed LLM reply comes out as one spoken turn of 16 kHz audio, and the context holds the reply."""
    async with orpheus_tts(mode, config) as (tts, _):
        down, up, context = await agent_turn(tts, llm_reply(*REPLY))
    assert not of(up, ErrorFrame)
    assert index(down, TTSStartedFrame) < index(down, TTSAudioRawFrame) < index(down, TTSStoppedFrame)
    assert all(f.sample_rate == OUT_RATE and len(f.audio) % 2 == 0 for f in of(down, TTSAudioRawFrame))
    seconds = samples(down) / OUT_RATE
    frame_s = fmt.SAMPLES_PER_FRAME / fmt.SAMPLE_RATE
    assert 2 * frame_s - 0.01 <= seconds <= 2 * (MAX_TOKENS // fmt.FRAME_TOKENS) * frame_s + 0.01
    assert assistant_text(context) == "Sure, I can help. What is your name?"
    await wait_idle(synth)


@pytest.mark.parametrize("mode", MODES)
async def test_agent_barge_in(mode: str, tiny_model_dir: Path, synth: Synthesizer) -> None:
    """Talked over mid-reply, the bot goes quiet and the context holds the words heard (within one), not the rest."""
    config = tiny_config(tiny_model_dir, **{"sampling.max_tokens": LONG_TOKENS})
    async with orpheus_tts(mode, config) as (tts, _):
        down, _, context = await agent_turn(tts, llm_reply(*LONG_REPLY), barge_in_s=1.5)
    cut = index(down, InterruptionFrame)
    expected = heard_words("".join(LONG_REPLY[:-1]), samples(down[:cut]) / OUT_RATE)
    said = assistant_text(context).split()
    assert 3 <= len(expected) and abs(len(said) - len(expected)) <= 1, (said, expected)
    assert said == "".join(LONG_REPLY).split()[: len(said)] and "name?" not in said
    await wait_idle(synth)
