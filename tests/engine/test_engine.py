import asyncio

import numpy as np
import pytest

from pipecat_orpheus import format as fmt
from pipecat_orpheus.codec import SnacCodec
from pipecat_orpheus.codec.feed import decode_wait_s
from pipecat_orpheus.codec.stream import CodecStream
from pipecat_orpheus.config import load_config
from pipecat_orpheus.engine import OrpheusEngine, SamplingParams
from pipecat_orpheus.engine.guard import duration_budget
from pipecat_orpheus.errors import EngineBusy, RequestCancelled
from pipecat_orpheus.format import SAMPLES_PER_FRAME
from pipecat_orpheus.noise import noise_key
from pipecat_orpheus.reference import ReferenceSynthesizer
from pipecat_orpheus.speech import speech_for
from pipecat_orpheus.testing import tiny_model_overrides
from tests.helpers import GUARD, GUARD_LOOP, forced_by_text, guard_scripts

GREEDY = SamplingParams(temperature=0.0, repetition_penalty=1.1, max_tokens=35, seed=5)
LONG_TEXT = "First sentence is here. " * 3 + "And the second piece follows it."  # two pieces at 60 chars


def make_config(tiny_model_dir, **overrides):
    values = {
        **tiny_model_overrides(tiny_model_dir),
        "engine.max_slots": 3,
        "engine.max_tokens_per_slot": 160,
        "engine.prefill_chunk_tokens": 16,
        "engine.prefill_tokens_while_decoding": 16,  # at most prefill_chunk_tokens
        "engine.max_chars_per_piece": 60,
        "sampling.max_tokens": 35,
    }
    values.update(overrides)
    return load_config(overrides=values)


def make_engine(tiny_models, config) -> OrpheusEngine:
    llm, tokenizer, snac = tiny_models
    return OrpheusEngine(llm, tokenizer, SnacCodec(snac, config.codec, "cpu"), config=config.engine)


async def test_greedy_audio_matches_reference_with_staggered_joins(tiny_models, tiny_model_dir):
    """Greedy requests joining a running batch at different times give the reference path's audio, multi-piece too.

    Tokens are compared exactly in test_runner; here the audio, frame by frame.
    """
    config = make_config(tiny_model_dir)
    llm, tokenizer, snac = tiny_models
    texts = ["hello there", LONG_TEXT, "hi"]
    reference = speech_for(
        ReferenceSynthesizer(llm, tokenizer, SnacCodec(snac, config.codec, "cpu"), config=config.engine), config
    )
    try:
        expected = [await reference.submit(t, sampling=GREEDY).read_all() for t in texts]
    finally:
        reference.close()
    engine = make_engine(tiny_models, config)
    speech = speech_for(engine, config)
    try:
        first = speech.submit(texts[0], sampling=GREEDY)
        chunk = await first.__anext__()  # the batch is running when the others join
        rest = [speech.submit(t, sampling=GREEDY) for t in texts[1:]]
        got = [np.concatenate([chunk, await first.read_all()])] + list(
            await asyncio.gather(*(s.read_all() for s in rest))
        )
    finally:
        engine.close()
    assert len(expected[1]) > len(expected[0])  # both pieces were spoken
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape
        # frames timed against their deadline may go out with less lookahead (timing-dependent): each is
        # then close to the reference, not equal; a wrong token would make its frame unrelated
        frames = zip(g.reshape(-1, SAMPLES_PER_FRAME), e.reshape(-1, SAMPLES_PER_FRAME), strict=True)
        assert all(np.allclose(a, b, atol=1e-4) or np.corrcoef(a, b)[0, 1] > 0.9 for a, b in frames)


async def test_full_engine_raises_busy_and_cancel_frees_slot(tiny_models, tiny_model_dir):
    """With every slot and queue place taken submit fails fast; cancelling a live stream lets a waiting one run."""
    config = make_config(tiny_model_dir, **{"engine.max_slots": 1, "engine.max_queue": 1})
    engine = make_engine(tiny_models, config)
    speech = speech_for(engine, config)
    try:
        live = speech.submit("one", sampling=GREEDY)
        waiting = speech.submit("two", sampling=GREEDY)
        with pytest.raises(EngineBusy):
            speech.submit("three", sampling=GREEDY)
        assert (engine.active_requests, engine.queued_requests) == (1, 1)
        waiting.cancel()  # a waiting request leaves the queue at once: its place is free now, not a step later
        assert engine.queued_requests == 0
        waiting = speech.submit("three", sampling=GREEDY)
        live.cancel()
        audio = await asyncio.wait_for(waiting.read_all(), timeout=60)
        assert len(audio) > 0 and engine.active_requests == 0 and engine.queued_requests == 0
    finally:
        engine.close()


class FailingCodec(SnacCodec):
    """The real codec, with a launch that fails for one request's windows (fault injection at its boundary)."""

    fail_key: int | None = None

    def launch(self, windows):
        if any(w.stream.key == self.fail_key for w in windows):
            raise RuntimeError("injected SNAC failure")
        return super().launch(windows)


async def test_codec_failure_fails_the_request_and_frees_its_slot(tiny_models, tiny_model_dir):
    """When SNAC fails on a request its caller gets the error and the engine stops generating it at once."""
    config = make_config(tiny_model_dir, **{"engine.max_tokens_per_slot": 1100, "sampling.max_tokens": 1050})
    llm, tokenizer, snac = tiny_models
    codec = FailingCodec(snac, config.codec, "cpu")
    codec.fail_key = noise_key(11)
    engine = OrpheusEngine(llm, tokenizer, codec, config=config.engine)
    try:
        sampling = SamplingParams(max_tokens=1050, min_tokens=1050, seed=11)
        stream = speech_for(engine, config).submit("one", sampling=sampling)
        with pytest.raises(RuntimeError, match="injected"):
            await asyncio.wait_for(stream.read_all(), timeout=60)
        for _ in range(200):
            if engine.active_requests == 0:
                break
            await asyncio.sleep(0.05)
        assert engine.active_requests == 0 and engine.stats.decode_tokens < 300  # not run to its 1050 tokens
    finally:
        engine.close()


async def test_explicit_cancel_and_close_end_streams_with_request_cancelled(tiny_models, tiny_model_dir):
    """`cancel(request_id)` and `close()` end in-flight streams with RequestCancelled."""
    config = make_config(tiny_model_dir, **{"sampling.max_tokens": 140})
    engine = make_engine(tiny_models, config)
    speech = speech_for(engine, config)
    a = speech.submit("one")
    b = speech.submit("two")
    engine.cancel(a.request_id)
    with pytest.raises(RequestCancelled):
        await asyncio.wait_for(a.read_all(), timeout=60)
    engine.close()
    with pytest.raises(RequestCancelled):
        await asyncio.wait_for(b.read_all(), timeout=60)
    assert engine.active_requests == 0


@pytest.mark.parametrize("seed", range(4))
def test_deadline_timing_delivers_every_frame_before_playback_reaches_it(seed):
    """Steps slowing from 3 to 11.5 ms (joins) with prefill spikes: no frame is delivered after its playback time."""
    rng = np.random.default_rng(seed)
    n_steps = 7 * 150
    steps_ms = np.linspace(3.0, 11.5, n_steps) + (rng.random(n_steps) < 0.2) * 4.0  # a prefill now and then
    stream = CodecStream(0, 2, 2)
    t, ewma, frames, delivered = 0.0, None, [], []
    for i, dt in enumerate(steps_ms):
        t += dt / 1e3
        delivered += [t] * frames.pop() if frames else []  # windows emitted last step decode in this one
        ewma = dt / 1e3 if ewma is None else ewma + 0.1 * (dt / 1e3 - ewma)
        if (i + 1) % 7 == 0:
            frames.append(len(stream.push(np.zeros(7, dtype=np.int64), now=t, wait_s=decode_wait_s(ewma, 1.25))))
    due = delivered[0] + SAMPLES_PER_FRAME / 24000 * np.arange(len(delivered))
    assert len(delivered) >= 145 and np.all(np.array(delivered) <= due)


async def test_engine_times_frames_against_their_deadlines(tiny_models, tiny_model_dir):
    """Once a step is measured, each frame reaches its codec stream with the time and the wait a held-back one costs."""
    config = make_config(tiny_model_dir)
    engine = make_engine(tiny_models, config)
    pushes = []

    class Recording(CodecStream):
        def push(self, frame_codes, **live):
            pushes.append(live)
            return super().push(frame_codes, **live)

    engine.codec.open_stream = lambda seed: Recording(0, 2, 2)
    try:
        await speech_for(engine, config).submit("one", sampling=GREEDY).read_all()
        margin = engine.codec.config.step_margin
        assert len(pushes) == GREEDY.max_tokens // 7 and all(set(p) == {"now", "wait_s"} for p in pushes)
        assert [p["now"] for p in pushes] == sorted(p["now"] for p in pushes)
        assert all(0 < p["wait_s"] <= decode_wait_s(1.0, margin) for p in pushes)  # steps well under a second
    finally:
        engine.close()


async def test_warm_up_runs_every_first_window_shape_and_leaves_the_engine_idle(tiny_models, tiny_model_dir):
    """warm_up() speaks two short requests (offline timing, then live) and returns with no request left."""
    engine = make_engine(tiny_models, make_config(tiny_model_dir))
    try:
        await asyncio.to_thread(engine.warm_up)
        requests = 2
        assert engine.stats.decode_tokens == requests * 4 * 7 and engine.active_requests == 0  # 4 frames each
        assert engine.stats.codec_windows >= 2 * requests  # at least a first window and a last one each
    finally:
        engine.close()


async def test_guard_stops_a_loop_and_a_runaway_not_a_normal_utterance(tiny_models, tiny_model_dir):
    """Forced tokens on the tiny model: a loop stops at detection, a runaway at its budget, a normal one at its end."""
    config = make_config(tiny_model_dir, **{"engine.max_tokens_per_slot": 600, "sampling.max_tokens": 560, **GUARD})
    llm, tokenizer, snac = tiny_models
    codec = SnacCodec(snac, config.codec, "cpu")
    engine = OrpheusEngine(llm, tokenizer, codec, config=config.engine, guard=config.guard)
    texts = guard_scripts()
    engine.rewrite_tokens = forced_by_text(tokenizer, config.voices.default, texts)
    try:
        speech = speech_for(engine, config)
        streams = [speech.submit(text) for text in texts]
        audio = await asyncio.gather(*(s.read_all() for s in streams))
    finally:
        engine.close()
    budget = duration_budget("Hi.", config.guard) // fmt.FRAME_TOKENS
    assert [s.stop_reason for s in streams] == ["loop", "duration", "end_of_speech"]
    assert [len(a) // SAMPLES_PER_FRAME for a in audio] == [GUARD_LOOP, budget, 5]  # the loop: to the frame that fired
    assert (engine.stats.guard_loop, engine.stats.guard_duration) == (1, 1)
