"""Streaming checks: the audio a client got against one offline decode of the same codes, first audio, pace.

The engine decodes each frame in a window as it comes (`codec.CodecStream`), early and with less
lookahead when its playback deadline requires it; an offline decode of the whole utterance in
one window is what that windowing approximates. `CodecTap` keeps the codes each stream of an
in-process backend's codec receives (the eval runs the engine in its own process for this) and
its seed, which fixes the codec's noise, so the offline decode is of exactly the same input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipecat_orpheus.codec import CodecStream, SnacCodec, Window
from pipecat_orpheus.format import FRAME_TOKENS, SAMPLE_RATE
from pipecat_orpheus.noise import noise_key
from pipecat_orpheus.pcm import snr_db


class _TappedStream(CodecStream):
    """A codec stream that also keeps every frame pushed into it, and counts those sent before their lookahead."""

    def __init__(self, seed: int, left_context: int, lookahead: int):
        super().__init__(noise_key(seed), left_context, lookahead)
        self.seed = seed
        self.lookahead = lookahead
        self.frames: list[np.ndarray] = []
        self.early = 0  # frames emitted for their playback deadline with less than the full lookahead

    def push(self, frame_codes: np.ndarray, **live) -> list[Window]:
        self.frames.append(np.asarray(frame_codes, dtype=np.int64).reshape(FRAME_TOKENS))
        windows = super().push(frame_codes, **live)
        self.early += sum(w.emit for w in windows if len(w.codes) - w.left - w.emit < self.lookahead)
        return windows


@dataclass(frozen=True, slots=True)
class Codes:
    """The SNAC codes of one utterance as the engine generated them, and the seed of its codec noise."""

    seed: int
    frames: np.ndarray = field(repr=False)  # (n, 7) in frame order
    early_frames: int  # sent before their full lookahead had come (the end of speech aside)


class CodecTap:
    """Keeps the codes of every stream `codec` opens from now on (the eval speaks one utterance at a time)."""

    def __init__(self, codec: SnacCodec):
        self.codec = codec
        self._streams: list[_TappedStream] = []
        codec.open_stream = self._open  # this codec instance only: the backend's own, in this process

    def _open(self, seed: int | None = None) -> CodecStream:
        if seed is None:
            raise ValueError("the eval seeds every utterance: a codec stream without a seed cannot be decoded again")
        stream = _TappedStream(seed, self.codec.config.left_context_frames, self.codec.config.lookahead_frames)
        self._streams.append(stream)
        return stream

    def take(self) -> Codes | None:
        """The codes of the utterance just spoken (None if it had no frames), forgetting every stream so far."""
        spoken = [s for s in self._streams if s.frames]
        self._streams = []
        if len(spoken) > 1:
            raise RuntimeError(f"{len(spoken)} codec streams since the last utterance: the eval speaks one at a time")
        if not spoken:
            return None
        return Codes(spoken[0].seed, np.stack(spoken[0].frames), spoken[0].early)


def stream_fidelity_db(codec: SnacCodec, streamed: np.ndarray, codes: Codes | None) -> float | None:
    """Streamed audio against one offline decode of the same codes (dB, higher is closer); None if not comparable.

    Call it while the backend is idle: the decode uses the backend's own codec.
    """
    if codes is None:
        return None
    offline = codec.decode_frames(codes.frames, codes.seed)
    if offline.shape != streamed.shape or not np.any(offline):
        return None
    return snr_db(streamed, offline)


def real_time_factor(total_s: float, audio: np.ndarray) -> float | None:
    """Seconds taken per second of audio (below 1 is faster than real time); None without audio."""
    return total_s / (len(audio) / SAMPLE_RATE) if len(audio) else None
