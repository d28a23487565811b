"""OrpheusTTSService where a voice agent puts it: LLM text frames in, audio out, heard text into the context."""

from __future__ import annotations

from pathlib import Path

from pipecat.frames.frames import (
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
from pipecat.tests.utils import SleepFrame, run_test

from pipecat_orpheus import format as fmt
from pipecat_orpheus.config import Config
from pipecat_orpheus.service import OrpheusTTSService, OrpheusTTSSettings
from pipecat_orpheus.synthesizer import Synthesizer
from tests.test_service import (
    LONG_TOKENS,
    MAX_TOKENS,
    START_TIMEOUT_S,
    config,  # noqa: F401 (fixture)
    index,
    llm_reply,
    of,
    samples,
    synth,  # noqa: F401 (fixture)
    wait_idle,
)

REPLY = ("Sure", ", I ", "can help. ", "What is ", "your name?")


async def agent_turn(tts: OrpheusTTSService, frames: list[Frame], rate: int = 16000) -> tuple[list[Frame], LLMContext]:
    """Run `frames` through tts -> assistant context aggregator, as in an STT -> LLM -> TTS agent."""
    context = LLMContext()
    assistant = LLMContextAggregatorPair(context).assistant()
    params = PipelineParams(audio_out_sample_rate=rate)
    down, _ = await run_test(
        Pipeline([tts, assistant]), frames_to_send=frames, pipeline_params=params, start_timeout=START_TIMEOUT_S
    )
    return list(down), context


def assistant_text(context: LLMContext) -> str:
    """Everything the assistant said, as committed to the conversation context."""
    return " ".join(m["content"] for m in context.get_messages() if m.get("role") == "assistant")


async def test_local_agent_turn(config: Config, synth: Synthesizer) -> None:
    """A streamed LLM reply comes out as one spoken turn of 16 kHz audio, and the context holds the reply."""
    down, context = await agent_turn(OrpheusTTSService(config=config), llm_reply(*REPLY))
    assert index(down, TTSStartedFrame) < index(down, TTSAudioRawFrame) < index(down, TTSStoppedFrame)
    assert all(f.sample_rate == 16000 and len(f.audio) % 2 == 0 for f in of(down, TTSAudioRawFrame))
    seconds = samples(down) / 16000
    assert 2 * fmt.SAMPLES_PER_FRAME / fmt.SAMPLE_RATE <= seconds <= 2 * MAX_TOKENS / fmt.TOKENS_PER_SECOND + 0.01
    assert assistant_text(context) == "Sure, I can help. What is your name?"
    await wait_idle(synth)


async def test_local_agent_barge_in(config: Config, synth: Synthesizer) -> None:
    """A user barging in mid-reply silences the bot and keeps the unspoken reply out of the context."""
    tts = OrpheusTTSService(config=config, settings=OrpheusTTSSettings(max_tokens=LONG_TOKENS))
    frames = [*llm_reply(*REPLY), SleepFrame(2.0), InterruptionFrame(), SleepFrame(0.5)]
    down, context = await agent_turn(tts, frames)
    cut = index(down, InterruptionFrame)
    assert samples(down[:cut]) > 0 and not of(down[cut:], TTSAudioRawFrame)
    assert "your name" not in assistant_text(context)
    await wait_idle(synth)
