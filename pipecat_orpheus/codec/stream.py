"""Streaming windows: each request's SNAC frames in, the windows to decode out, in playback time.

Each request owns a `CodecStream`: frames of codes go in as the LLM produces them and
`Window`s come out, one per frame once `lookahead_frames` later frames exist (all that is left
at `finish()`), or earlier when a live stream's playback deadline requires it. A window holds up
to `left_context_frames` frames before the frames it emits, so every output sample is decoded
with (nearly) the context an offline decode of the whole utterance would give it.
`codec.SnacCodec` decodes windows; nothing here touches torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipecat_orpheus.format import CODEBOOK_SIZE, FRAME_TOKENS, SAMPLE_RATE, SAMPLES_PER_FRAME

FRAME_S = SAMPLES_PER_FRAME / SAMPLE_RATE  # 85.3 ms of audio per frame


def graphed_shapes(left: int, lookahead: int) -> list[tuple[int, int, int]]:
    """Window shapes (frames, left, emit) of every stream of more than `left + lookahead` frames.

    One frame with any left context up to `left` and any lookahead up to `lookahead` (frames
    emitted early for their deadline, the steady state), and the tail flushed at the end of
    speech (full left context, up to `lookahead` frames). Shorter streams decode eagerly.
    """
    shapes = {(ctx + 1 + ahead, ctx, 1) for ctx in range(left + 1) for ahead in range(lookahead + 1)}
    shapes |= {(left + emit, left, emit) for emit in range(1, lookahead + 1)}
    return sorted(shapes)


@dataclass(frozen=True, slots=True, eq=False)
class Window:
    """Frames of one request to decode together; the middle `emit` frames are output.

    `codes` is (frames, 7) in frame order starting at absolute frame `start`; the first `left`
    frames are context before the emitted ones and the rest after them are lookahead.
    """

    stream: CodecStream
    codes: np.ndarray
    start: int
    left: int
    emit: int

    @property
    def shape_key(self) -> tuple[int, int, int]:
        """Windows with equal keys decode in one batched call."""
        return len(self.codes), self.left, self.emit


class CodecStream:
    """One request's frame buffer: push frames, get the windows that became ready.

    Offline (`push(codes)`), frame k waits for `lookahead` later frames. Live, the engine also
    passes the time and how long until a window held back now could be decoded (`wait_s`: one
    more frame plus a step): frame 0 then goes out as soon as the frames here play for longer than
    that (at once when frames come faster than they play), and until the stream has caught up (a
    frame went out with its full lookahead), frame k goes out early, with the lookahead it has, as
    soon as waiting longer would deliver it after its playback deadline (frame 0's emission plus k
    frames of audio). Once caught up, a stream that is generated faster than it plays only gets
    further ahead; if the engine later falls behind real time, frames still wait for the full
    lookahead: sending them early would only spend the buffer sooner, with worse sound.
    """

    def __init__(self, key: int, left_context: int, lookahead: int):
        self.key = key
        self._left = left_context
        self._lookahead = lookahead
        self._frames: list[np.ndarray] = []  # frames from absolute index self._base on
        self._base = 0
        self._pushed = 0
        self._next = 0  # first frame not yet handed out in a window
        self._start_s: float | None = None  # when frame 0 was handed out: playback starts about then
        self._caught_up = False  # a frame went out with its full lookahead: no more early frames
        self.finished = False
        self.cancelled = False

    def push(self, frame_codes: np.ndarray, *, now: float | None = None, wait_s: float = 0.0) -> list[Window]:
        """Add one frame of 7 codes (frame order, as format.frame_to_codes gives them).

        With `now` (seconds, any clock): frames whose deadline is within `wait_s` are emitted now.
        """
        if self.finished:
            raise RuntimeError("push() after finish()")
        codes = np.asarray(frame_codes, dtype=np.int64).reshape(-1)
        if codes.shape != (FRAME_TOKENS,) or codes.min() < 0 or codes.max() >= CODEBOOK_SIZE:
            raise ValueError(f"a frame is {FRAME_TOKENS} codes in [0, {CODEBOOK_SIZE}), got {frame_codes!r}")
        self._frames.append(codes)
        self._pushed += 1
        windows = []
        while self._next < self._pushed and self._due(now, wait_s):
            if self._next == 0:
                self._start_s = now
            end = min(self._pushed, self._next + 1 + self._lookahead)
            windows.append(self._window(self._next, 1, end))
        return windows

    def _due(self, now: float | None, wait_s: float) -> bool:
        """Whether frame `_next` goes out now: its full lookahead is here, or waiting would make it late."""
        if self._next + self._lookahead < self._pushed:
            self._caught_up = now is not None
            return True
        if now is None or self._caught_up:
            return False
        if self._next == 0:  # start once the frames here play for longer than the next one takes to come
            return self._pushed * FRAME_S >= wait_s
        return now + wait_s >= self._start_s + self._next * FRAME_S

    @property
    def deadline_s(self) -> float | None:
        """When the first frame not yet handed out must start playing (None before playback or after the end).

        Playback is taken to start when frame 0 was handed out, a step before it reaches the
        listener, so the slack this gives (`deadline_s - now`) errs on the short side.
        """
        if self._start_s is None or self.finished:
            return None
        return self._start_s + self._next * FRAME_S

    def finish(self) -> list[Window]:
        """End of speech: one window emitting every frame not yet emitted (none if all were)."""
        if self.finished:
            return []
        self.finished = True
        if self._next >= self._pushed:
            return []
        return [self._window(self._next, self._pushed - self._next, self._pushed)]

    def cancel(self) -> None:
        """Drop this request: the engine discards its pending windows and PCM."""
        self.cancelled = True

    def _window(self, first: int, emit: int, end: int) -> Window:
        start = max(0, first - self._left)
        codes = np.stack(self._frames[start - self._base : end - self._base])  # (end - start, 7)
        self._next = first + emit
        keep_from = max(0, self._next - self._left)  # older frames are never context again
        if keep_from > self._base:
            del self._frames[: keep_from - self._base]
            self._base = keep_from
        return Window(self, codes, start, first - start, emit)
