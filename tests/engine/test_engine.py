import asyncio

import numpy as np
import pytest

from pipecat_orpheus.codec import CodecStream, SnacCodec
from pipecat_orpheus.config import load_config
from pipecat_orpheus.engine import OrpheusEngine, SamplingParams
from pipecat_orpheus.engine.engine import lookahead_ramp
from pipecat_orpheus.errors import EngineBusy, RequestCancelled
from pipecat_orpheus.format import SAMPLES_PER_FRAME
from pipecat_orpheus.noise import noise_key
from pipecat_orpheus.reference import ReferenceSynthesizer

GREEDY = SamplingParams(temperature=0.0, repetition_penalty=1.1, max_tokens=35, seed=5)
LONG_TEXT = "First sentence is here. " * 3 + "And the second piece follows it."  # two pieces at 60 chars


def make_config(tiny_model_dir, **overrides):
    values = {
        "model.llm": str(tiny_model_dir / "llm"),
        "model.codec": str(tiny_model_dir / "snac"),
        "model.device": "cpu",
        "engine.max_slots": 3,
        "engine.max_tokens_per_slot": 160,
        "engine.prefill_chunk_tokens": 16,
        "engine.max_chars_per_piece": 60,
        "sampling.max_tokens": 35,
    }
    values.update(overrides)
    return load_config(overrides=values)


def make_engine(tiny_models, config) -> OrpheusEngine:
    llm, tokenizer, snac = tiny_models
    return OrpheusEngine(llm, tokenizer, SnacCodec(snac, config.codec, "cpu"), config=config)


async def test_greedy_audio_matches_reference_with_staggered_joins(tiny_models, tiny_model_dir):
    """Greedy requests joining a running batch at different times give the reference path's audio, multi-piece too."""
    config = make_config(tiny_model_dir)
    llm, tokenizer, snac = tiny_models
    texts = ["hello there", LONG_TEXT, "hi"]
    reference = ReferenceSynthesizer(llm, tokenizer, SnacCodec(snac, config.codec, "cpu"), config=config)
    try:
        expected = [await reference.submit(t, sampling=GREEDY).read_all() for t in texts]
    finally:
        reference.close()
    engine = make_engine(tiny_models, config)
    try:
        first = engine.submit(texts[0], sampling=GREEDY)
        chunk = await first.__anext__()  # the batch is running when the others join
        rest = [engine.submit(t, sampling=GREEDY) for t in texts[1:]]
        with engine._cond:  # frames before the lookahead ramp reaches full lookahead are decoded with less
            streams = [engine._codec_streams[s.request_id] for s in rest]
        lookahead = config.codec.lookahead_frames
        ramped = [0] + [next(k for k in range(100) if s.lookahead(k) == lookahead) for s in streams]
        got = [np.concatenate([chunk, await first.read_all()])] + list(
            await asyncio.gather(*(s.read_all() for s in rest))
        )
    finally:
        engine.close()
    assert len(expected[1]) > len(expected[0])  # both pieces were spoken
    for g, e, k in zip(got, expected, ramped, strict=True):
        assert g.shape == e.shape
        full = k * SAMPLES_PER_FRAME  # from here on every frame had the full lookahead: equal to the reference
        np.testing.assert_allclose(g[full:], e[full:], atol=1e-4)
        assert full == 0 or np.corrcoef(g[:full], e[:full])[0, 1] > 0.9


async def test_full_engine_raises_busy_and_cancel_frees_slot(tiny_models, tiny_model_dir):
    """With every slot and queue place taken submit fails fast; cancelling a live stream lets a waiting one run."""
    engine = make_engine(tiny_models, make_config(tiny_model_dir, **{"engine.max_slots": 1, "engine.max_queue": 1}))
    try:
        live = engine.submit("one", sampling=GREEDY)
        waiting = engine.submit("two", sampling=GREEDY)
        with pytest.raises(EngineBusy):
            engine.submit("three", sampling=GREEDY)
        assert (engine.active_requests, engine.queued_requests) == (1, 1)
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
    engine = OrpheusEngine(llm, tokenizer, codec, config=config)
    try:
        stream = engine.submit("one", sampling=SamplingParams(max_tokens=1050, min_tokens=1050, seed=11))
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
    engine = make_engine(tiny_models, make_config(tiny_model_dir, **{"sampling.max_tokens": 140}))
    a = engine.submit("one")
    b = engine.submit("two")
    engine.cancel(a.request_id)
    with pytest.raises(RequestCancelled):
        await asyncio.wait_for(a.read_all(), timeout=60)
    engine.close()
    with pytest.raises(RequestCancelled):
        await asyncio.wait_for(b.read_all(), timeout=60)
    assert engine.active_requests == 0


def test_lookahead_ramp_follows_the_step_time():
    """Fast steps let the lookahead grow back at once, slow ones slowly; none before any step or below real time."""
    assert lookahead_ramp(None, 1.25) is None
    assert lookahead_ramp(0.0032, 1.25) == pytest.approx(85.333 / (7 * 3.2 * 1.25) - 1, rel=1e-3)  # 2.05
    assert lookahead_ramp(0.008, 1.0) == pytest.approx(0.524, rel=1e-2)
    assert lookahead_ramp(0.008, 2.0) is None and lookahead_ramp(0.013, 1.0) is None


@pytest.mark.parametrize("step_ms", [1.0, 3.2, 5.0, 8.0, 10.0, 12.0])
def test_lookahead_ramp_keeps_every_frame_ahead_of_playback(step_ms):
    """At a steady step time, each frame's window is ready before playback, started at the first frame, reaches it."""
    ramp = lookahead_ramp(step_ms / 1e3, 1.0)
    stream = CodecStream(0, 2, 2, ramp)
    frame_ms = 7 * step_ms  # one frame of tokens
    ready_ms = []
    for k in range(200):  # at 12 ms per step the lookahead is full from frame 125
        ready_ms += [(k + 1) * frame_ms] * len(stream.push(np.zeros(7, dtype=np.int64)))
    assert len(ready_ms) >= 197 and stream.lookahead(len(ready_ms)) == 2  # the ramp reached the full lookahead
    played_ms = ready_ms[0] + 1e3 * SAMPLES_PER_FRAME / 24000 * np.arange(len(ready_ms))  # when each frame is due
    assert np.all(np.array(ready_ms) <= played_ms + 1e-9)


async def test_engine_opens_codec_streams_with_a_lookahead_ramp(tiny_models, tiny_model_dir):
    """A request submitted while steps are fast gets a steep lookahead ramp; before any step, the full lookahead."""
    engine = make_engine(tiny_models, make_config(tiny_model_dir))
    try:
        slow = engine.submit("one", sampling=GREEDY)
        with engine._cond:
            slow_stream = engine._codec_streams[slow.request_id]
        await slow.read_all()
        engine.step_s = 1e-4  # as if steps took 0.1 ms
        fast = engine.submit("two", sampling=GREEDY)
        with engine._cond:
            fast_stream = engine._codec_streams[fast.request_id]
        await fast.read_all()
        lookahead = engine.codec.config.lookahead_frames
        assert [slow_stream.lookahead(k) for k in range(3)] == [lookahead] * 3
        assert [fast_stream.lookahead(k) for k in range(3)] == [0, lookahead, lookahead]
        assert engine.step_s is not None and engine.step_s > 1e-4  # measured steps moved the average again
    finally:
        engine.close()


async def test_warm_up_runs_every_first_window_shape_and_leaves_the_engine_idle(tiny_models, tiny_model_dir):
    """warm_up() speaks two short requests (full lookahead, then a ramp) and returns with no request left."""
    engine = make_engine(tiny_models, make_config(tiny_model_dir))
    try:
        await asyncio.to_thread(engine.warm_up)
        requests = 2
        assert engine.stats.decode_tokens == requests * 4 * 7 and engine.active_requests == 0  # 4 frames each
        assert engine.stats.codec_windows >= 2 * requests  # at least a first window and a last one each
    finally:
        engine.close()
