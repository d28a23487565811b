import asyncio

import numpy as np
import pytest

from pipecat_orpheus.codec import SnacCodec
from pipecat_orpheus.config import load_config
from pipecat_orpheus.engine import OrpheusEngine, SamplingParams
from pipecat_orpheus.engine.engine import first_lookahead
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
        got = [np.concatenate([chunk, await first.read_all()])] + list(
            await asyncio.gather(*(s.read_all() for s in rest))
        )
    finally:
        engine.close()
    assert len(expected[1]) > len(expected[0])  # both pieces were spoken
    for g, e in zip(got, expected, strict=False):
        assert g.shape == e.shape
        # the first frame may have been decoded with less lookahead (first_lookahead): close, not equal
        np.testing.assert_allclose(g[SAMPLES_PER_FRAME:], e[SAMPLES_PER_FRAME:], atol=1e-4)
        assert np.corrcoef(g[:SAMPLES_PER_FRAME], e[:SAMPLES_PER_FRAME])[0, 1] > 0.99


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


def test_first_lookahead_follows_the_step_time():
    """The first frame waits for no later frame at fast steps, for the full lookahead at slow steps or before any."""
    assert first_lookahead(None, 2) == 2
    assert first_lookahead(0.0035, 2) == 0  # 7 * 3.5 ms * 3 frames = 73.5 ms <= 85.3 ms of audio
    assert first_lookahead(0.005, 2) == 1
    assert first_lookahead(0.010, 2) == 2 and first_lookahead(0.1, 2) == 2
    assert first_lookahead(0.001, 0) == 0


async def test_engine_opens_codec_streams_with_the_first_lookahead(tiny_models, tiny_model_dir):
    """A request submitted while steps are fast gets a first window after one frame; before any step, the full one."""
    engine = make_engine(tiny_models, make_config(tiny_model_dir))
    try:
        lookahead = engine.codec.config.lookahead_frames
        assert lookahead > 0
        slow = engine.submit("one", sampling=GREEDY)
        with engine._cond:
            first_slow = engine._codec_streams[slow.request_id]._first_lookahead
        await slow.read_all()
        engine.step_s = 1e-4  # as if steps took 0.1 ms
        fast = engine.submit("two", sampling=GREEDY)
        with engine._cond:
            first_fast = engine._codec_streams[fast.request_id]._first_lookahead
        await fast.read_all()
        assert (first_slow, first_fast) == (lookahead, 0)
        assert engine.step_s is not None and engine.step_s > 1e-4  # measured steps moved the average again
    finally:
        engine.close()


async def test_warm_up_runs_every_first_window_shape_and_leaves_the_engine_idle(tiny_models, tiny_model_dir):
    """warm_up() speaks one short request per first-window lookahead and returns with no request left."""
    engine = make_engine(tiny_models, make_config(tiny_model_dir))
    try:
        await asyncio.to_thread(engine.warm_up)
        requests = engine.codec.config.lookahead_frames + 1  # first lookahead 0, 1, ..., L
        assert engine.stats.decode_tokens == requests * 4 * 7 and engine.active_requests == 0  # 4 frames each
        assert engine.stats.codec_windows >= 2 * requests  # at least a first window and a last one each
    finally:
        engine.close()
