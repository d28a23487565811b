"""CodecFeed: what the engine step hands the codec, and every request's end delivered."""

from __future__ import annotations

import numpy as np
import pytest

from pipecat_orpheus import format as fmt
from pipecat_orpheus.codec import CodecFeed, SnacCodec
from pipecat_orpheus.codec.feed import decode_wait_s
from pipecat_orpheus.codec.stream import FRAME_S
from pipecat_orpheus.config import CodecConfig
from pipecat_orpheus.loader import load_snac


class Sink:
    """Records what the feed delivers to one request."""

    cancelled = False

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.chunks: list[np.ndarray] = []
        self.ended: tuple | None = None

    def put(self, pcm: np.ndarray) -> None:
        self.chunks.append(pcm)

    def finish(self, error=None, reason=None) -> None:
        self.ended = (error, reason)


def test_an_end_with_every_frame_already_out_still_ends_the_sink(tiny_model_dir):
    """Frames sent early (deadlines) leave nothing to flush at the end: the sink still ends, with its reason."""
    config = CodecConfig()
    feed = CodecFeed(SnacCodec(load_snac(str(tiny_model_dir / "snac"), device="cpu"), config, "cpu"))
    feed.record_step(FRAME_S / (fmt.FRAME_TOKENS + 1) / config.step_margin)  # each frame due as soon as it comes
    assert decode_wait_s(feed.step_s, config.step_margin) == pytest.approx(FRAME_S)
    sink = Sink("r")
    feed.open("r", seed=1, sink=sink)
    codes = np.random.default_rng(0).integers(0, fmt.CODEBOOK_SIZE, (4, fmt.FRAME_TOKENS))
    for i in range(len(codes)):  # one frame per step, each pushed as playback reaches it
        feed.push([("r", fmt.codes_to_tokens(codes[i : i + 1]))], [], now=i * FRAME_S)
        feed.launch(None)
        feed.deliver()
    assert len(sink.chunks) == len(codes) and sink.ended is None  # every frame out before the end
    feed.push([], [("r", "end_of_speech")], now=len(codes) * FRAME_S)
    assert feed.busy
    feed.launch(None)
    feed.deliver()
    assert sink.ended == (None, "end_of_speech") and not feed.busy
