"""The codec tap keeps the codes a backend generated, and their offline decode is what was streamed."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest

from pipecat_orpheus.engine.request import SamplingParams
from pipecat_orpheus.eval.flags import NOT_REPORTED
from pipecat_orpheus.eval.runner import guard_verdict
from pipecat_orpheus.eval.streaming import CodecTap, real_time_factor, stream_fidelity_db
from pipecat_orpheus.format import SAMPLE_RATE, SAMPLES_PER_FRAME
from pipecat_orpheus.reference import ReferenceSynthesizer
from pipecat_orpheus.speech import speak, speech_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_tapped_codes_decode_offline_to_the_streamed_audio(tiny_models, config):
    """Two utterances on the reference path: each take() has its own frames and seed; streamed vs offline >= 40 dB."""
    llm, tokenizer, snac = tiny_models
    backend = ReferenceSynthesizer.from_models(llm, tokenizer, snac, "cpu", config)  # its own codec: tapped alone
    tap = CodecTap(backend.codec)
    speech = speech_for(backend, config)

    async def utterance(seed: int):
        return await speak(speech, "Hello there.", sampling=SamplingParams(max_tokens=70, seed=seed))

    try:
        first = asyncio.run(utterance(3))
        first_codes = tap.take()
        second = asyncio.run(utterance(4))
        second_codes = tap.take()
    finally:
        backend.close()
    assert tap.take() is None  # nothing spoken since
    for spoken, codes, seed in ((first, first_codes, 3), (second, second_codes, 4)):
        assert codes.seed == seed and codes.frames.shape == (10, 7) and codes.early_frames == 0  # offline timing
        assert len(spoken.audio) == 10 * SAMPLES_PER_FRAME
        assert stream_fidelity_db(backend.codec, spoken.audio, codes) >= 40
    assert not np.array_equal(first_codes.frames, second_codes.frames)
    assert stream_fidelity_db(backend.codec, second.audio, first_codes) < 10  # other codes: not the same audio
    assert stream_fidelity_db(backend.codec, first.audio, None) is None
    assert guard_verdict(first.stream) in (NOT_REPORTED, "max_tokens")  # 70 tokens: the tiny model never stops


def test_real_time_factor_and_the_guards_verdict():
    """RTF is seconds taken per audio second; a stream's stop_reason is the verdict, none is "not reported"."""
    assert real_time_factor(0.5, np.zeros(SAMPLE_RATE, dtype=np.float32)) == 0.5
    assert real_time_factor(0.5, np.zeros(0, dtype=np.float32)) is None
    assert guard_verdict(SimpleNamespace(stop_reason="loop")) == "loop"
    assert guard_verdict(SimpleNamespace()) == NOT_REPORTED
