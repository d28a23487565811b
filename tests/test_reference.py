import asyncio
import time

import numpy as np
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from pipecat_orpheus import format as fmt
from pipecat_orpheus.codec import SnacCodec
from pipecat_orpheus.config import load_config
from pipecat_orpheus.engine.request import SamplingParams
from pipecat_orpheus.errors import EngineBusy, InvalidRequest, RequestCancelled
from pipecat_orpheus.reference import ReferenceSynthesizer, allowed_tokens, generate_tokens
from pipecat_orpheus.speech import open_backend, speech_for
from pipecat_orpheus.testing import tiny_model_overrides
from pipecat_orpheus.text import split_text

GREEDY = SamplingParams(temperature=0.0, repetition_penalty=1.1, max_tokens=35, seed=3)


def audio_constraint(scores: torch.Tensor, position: int) -> torch.Tensor:
    """The oracle: scores (1, V) with every token not allowed at frame position `position` set to -inf."""
    start, end = fmt.allowed_token_range(position)
    out = torch.full_like(scores, float("-inf"))  # (1, V)
    out[:, start:end] = scores[:, start:end]
    if position == 0:  # speech may only end between frames
        out[:, fmt.END_OF_SPEECH] = scores[:, fmt.END_OF_SPEECH]
    return out


def make_config(tiny_model_dir, **overrides):
    values = {
        "engine.backend": "reference",
        "engine.core_process": False,  # the reference path in this process (tests/core: in its own)
        **tiny_model_overrides(tiny_model_dir),
        "sampling.max_tokens": 70,
    }
    values.update(overrides)
    return load_config(overrides=values)


@pytest.fixture
def synth(tiny_models, tiny_model_dir):
    llm, tok, snac = tiny_models
    config = make_config(tiny_model_dir, **{"engine.max_queue": 1, "engine.max_chars_per_piece": 30})
    s = ReferenceSynthesizer(llm, tok, SnacCodec(snac, config.codec, "cpu"), config=config.engine)
    yield speech_for(s, config)
    s.close()


def prompt(tok, text="Hello there."):
    return fmt.build_prompt(tok, text, "tara")


class _AudioOnly(LogitsProcessor):
    """The audio constraint as a transformers processor, for comparison with `generate`."""

    def __init__(self, prompt_len):
        self.prompt_len = prompt_len

    def __call__(self, input_ids, scores):
        return audio_constraint(scores, (input_ids.shape[1] - self.prompt_len) % fmt.FRAME_TOKENS)


def test_tokens_respect_frame_positions(tiny_models):
    """Every generated token is an audio token of its frame position."""
    llm, tok, _ = tiny_models
    sampling = SamplingParams(temperature=1.0, top_p=1.0, repetition_penalty=1.0, max_tokens=49, seed=0)
    tokens = list(generate_tokens(llm, prompt(tok), sampling))
    assert len(tokens) == 49
    for i, t in enumerate(tokens):
        lo, hi = fmt.allowed_token_range(i % 7)
        assert lo <= t < hi


@pytest.mark.parametrize("position", [0, 3, 6])
def test_sampling_over_allowed_tokens_equals_masked_vocabulary(position):
    """Temperature + top-p over the allowed ids gives the distribution of the -inf-masked full vocabulary."""
    scores = torch.randn(1, fmt.VOCAB_SIZE, generator=torch.Generator().manual_seed(position)) * 3  # (1, V)
    allowed = allowed_tokens(position)

    def warp(x):
        return torch.softmax(TopPLogitsWarper(0.8)(None, TemperatureLogitsWarper(0.6)(None, x)), dim=-1)

    full = warp(audio_constraint(scores, position))  # (1, V)
    sub = warp(scores[:, allowed])  # (1, C)
    assert torch.allclose(full[:, allowed], sub, atol=1e-6)
    assert float(full[:, allowed].sum()) == pytest.approx(1.0, abs=1e-5)
    assert (position == 0) == (fmt.END_OF_SPEECH in allowed.tolist())
    assert allowed.tolist() == sorted(allowed.tolist())


def test_greedy_matches_transformers_generate(tiny_models):
    """Greedy decoding with our DynamicCache loop equals transformers' own generate under the same constraint."""
    llm, tok, _ = tiny_models
    ids = prompt(tok)
    sampling = SamplingParams(temperature=0.0, repetition_penalty=1.0, max_tokens=28)
    ours = list(generate_tokens(llm, ids, sampling))
    out = llm.generate(
        torch.tensor([ids]),
        max_new_tokens=28,
        do_sample=False,
        logits_processor=LogitsProcessorList([_AudioOnly(len(ids))]),
        eos_token_id=fmt.END_OF_SPEECH,
        pad_token_id=fmt.PAD,
    )
    assert ours == out[0, len(ids) :].tolist()


def test_greedy_deterministic_and_seed_reproducible(tiny_models):
    """Greedy gives the same tokens every time; a seed makes sampling reproducible and a new seed changes it."""
    llm, tok, _ = tiny_models
    ids = prompt(tok)
    assert list(generate_tokens(llm, ids, GREEDY)) == list(generate_tokens(llm, ids, GREEDY))
    seeded = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=21, seed=42)
    a = list(generate_tokens(llm, ids, seeded))
    assert a == list(generate_tokens(llm, ids, seeded))
    other = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=21, seed=43)
    assert a != list(generate_tokens(llm, ids, other))


def test_repetition_penalty_counts_generated_tokens_only(tiny_models):
    """The penalty applies to tokens of this generation, not the prompt: with a 1-token nucleus it avoids repeats."""
    llm, tok, _ = tiny_models
    ids = prompt(tok)
    strong = SamplingParams(temperature=0.0, repetition_penalty=5.0, max_tokens=70)
    tokens = list(generate_tokens(llm, ids, strong))
    plain = list(generate_tokens(llm, ids, SamplingParams(temperature=0.0, repetition_penalty=1.0, max_tokens=70)))
    assert tokens[0] == plain[0]  # nothing generated yet: the prompt is not penalised
    assert len(set(plain)) < len(plain) and len(set(tokens)) > len(set(plain))


class _StopAfter(torch.nn.Module):
    """The tiny model, with END_OF_SPEECH made the likeliest token after `n` decoding steps."""

    def __init__(self, llm, n):
        super().__init__()
        self.llm, self.n, self.calls, self.config = llm, n, 0, llm.config

    def forward(self, **kwargs):
        out = self.llm(**kwargs)
        self.calls += 1
        if self.calls > self.n:
            out.logits[..., fmt.END_OF_SPEECH] = 1e4
        return out


def test_stops_at_end_of_speech_on_frame_boundary(tiny_models):
    """END_OF_SPEECH ends generation, but only at a frame boundary, and is not yielded."""
    llm, tok, _ = tiny_models
    tokens = list(generate_tokens(_StopAfter(llm, 10), prompt(tok), SamplingParams(temperature=0.0, max_tokens=700)))
    assert len(tokens) == 14
    assert fmt.END_OF_SPEECH not in tokens


async def test_audio_length_matches_frames(synth, tiny_models):
    """Streamed audio is frames * 2048 samples, in chunks, equal to an offline decode of the same frames."""
    llm, tok, _ = tiny_models
    tokens = list(generate_tokens(llm, prompt(tok, "Hi there."), GREEDY))
    frames = len(tokens) // 7
    chunks = [c async for c in synth.submit("Hi there.", sampling=GREEDY)]
    assert len(chunks) > 1 and all(c.dtype == np.float32 and c.ndim == 1 for c in chunks)
    audio = np.concatenate(chunks)
    assert len(audio) == frames * fmt.SAMPLES_PER_FRAME
    offline = synth.backend.codec.decode_frames(fmt.frame_codes(tokens[: frames * 7]), seed=GREEDY.seed)
    snr = 10 * np.log10(np.sum(offline**2) / max(np.sum((audio - offline) ** 2), 1e-20))
    assert snr > 30, snr  # contiguous: no gaps, repeats or reordering between chunks


async def test_greedy_audio_deterministic_and_seeded_sampling(synth):
    """Greedy with a fixed seed gives identical audio twice; seeded sampling too."""
    a = await synth.submit("Hello.", sampling=GREEDY).read_all()
    b = await synth.submit("Hello.", sampling=GREEDY).read_all()
    assert len(a) > 0 and np.array_equal(a, b)
    seeded = SamplingParams(temperature=0.6, max_tokens=35, seed=9)
    c = await synth.submit("Hello.", sampling=seeded).read_all()
    d = await synth.submit("Hello.", sampling=seeded).read_all()
    assert np.array_equal(c, d)


async def test_long_text_streams_as_one_utterance(synth, tiny_models):
    """Text past max_chars_per_piece is split into pieces, spoken in order into one stream, one codec stream."""
    llm, tok, _ = tiny_models
    text = "The first sentence is here. A second one follows it. And a third ends it."
    pieces = split_text(text, synth.max_chars_per_piece)
    assert len(pieces) == 3
    tokens = []
    for piece in pieces:
        t = list(generate_tokens(llm, prompt(tok, piece), GREEDY))
        tokens += t[: len(t) // 7 * 7]
    audio = await synth.submit(text, sampling=GREEDY).read_all()
    assert len(audio) == len(tokens) // 7 * fmt.SAMPLES_PER_FRAME
    offline = synth.backend.codec.decode_frames(fmt.frame_codes(tokens), seed=GREEDY.seed)
    assert np.allclose(audio, offline, atol=1e-3)


async def test_cancel_stops_generation(synth):
    """Cancelling a long request frees the worker within a few tokens, and the next request runs."""
    stream = synth.submit("Talk for a long time.", sampling=SamplingParams(max_tokens=2000, seed=1))
    first = await stream.__anext__()
    assert len(first) > 0
    stream.cancel()
    deadline = time.monotonic() + 5
    while synth.active_requests and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert synth.active_requests == 0
    assert len(await synth.submit("Hi.", sampling=GREEDY).read_all()) > 0


async def test_busy_past_queue_bound(synth):
    """With max_queue 1, a third request while one runs and one waits fails at once with EngineBusy."""
    long = SamplingParams(max_tokens=2000, seed=1)
    running = synth.submit("One.", sampling=long)
    waiting = synth.submit("Two.", sampling=long)
    with pytest.raises(EngineBusy):
        synth.submit("Three.", sampling=long)
    assert synth.active_requests + synth.queued_requests == 2
    waiting.cancel()
    assert synth.active_requests + synth.queued_requests == 1  # the cancelled one left the queue at once
    running.cancel()


async def test_unknown_voice_and_close(tiny_models, tiny_model_dir):
    """An unknown voice is an InvalidRequest; close() ends queued streams with RequestCancelled."""
    llm, tok, snac = tiny_models
    config = make_config(tiny_model_dir)
    reference = ReferenceSynthesizer(llm, tok, SnacCodec(snac, config.codec, "cpu"), config=config.engine)
    s = speech_for(reference, config)
    with pytest.raises(InvalidRequest, match="voice") as e:
        s.submit("Hi.", voice="nobody")
    assert e.value.field == "voice" and e.value.code == "bad_request"
    long = SamplingParams(max_tokens=2000, seed=1)
    first, second = s.submit("One.", sampling=long), s.submit("Two.", sampling=long)
    await asyncio.to_thread(s.close)
    for stream in (first, second):
        with pytest.raises(RequestCancelled):
            await stream.read_all()
    assert not reference._worker.is_alive()


async def test_open_backend_loads_through_loader(tiny_model_dir):
    """open_backend loads the tiny model from local paths into the reference path (engine.backend), which speaks."""
    config = make_config(tiny_model_dir)
    backend = open_backend(config)
    assert isinstance(backend, ReferenceSynthesizer)
    s = speech_for(backend, config)
    try:
        audio = await s.submit("Hi.", sampling=GREEDY).read_all()
        assert len(audio) % fmt.SAMPLES_PER_FRAME == 0 and len(audio) > 0
    finally:
        s.close()
