"""What the engine step hands the codec (each request's new frames) and gets back (its PCM, in order).

The feed owns one `CodecStream` per request and the windows the last step completed. Each
step it launches their SNAC decode on the engine's CUDA stream just before the next LLM step
(so the GPU runs them back to back and the host reads the PCM while that step runs), then
delivers each request's PCM to its sink. It knows request ids and frames as plain values,
never the engine's requests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from pipecat_orpheus import format as fmt
from pipecat_orpheus.codec.runtime import DecodedAudio, SnacCodec
from pipecat_orpheus.codec.stream import CodecStream, Window
from pipecat_orpheus.errors import RequestCancelled

_STEP_EWMA = 0.1  # weight of the newest step in the step-time average (~ the last 10 steps)


def decode_wait_s(step_s: float, margin: float) -> float:
    """How long until a window held back now could be decoded: one more frame (7 steps) and its decode (1)."""
    return (fmt.FRAME_TOKENS + 1) * step_s * margin


class AudioSink(Protocol):
    """Where a request's PCM goes (`engine.stream.AudioStream` is one); called on the engine's thread."""

    request_id: str
    cancelled: bool  # the consumer stopped listening: a producer may stop early

    def put(self, pcm: np.ndarray) -> None:
        """Take one chunk of float32 PCM."""

    def finish(self, error: BaseException | None = None, reason: str | None = None) -> None:
        """End the request's audio, normally (with why it ended: `engine.guard`'s reasons) or with `error`."""


@dataclass(slots=True)
class _Audio:
    """Windows of one request to decode at the next step; `final` ends its sink after them, for `reason`."""

    stream: CodecStream
    windows: list[Window]
    sink: AudioSink
    final: bool
    reason: str | None = None


class CodecFeed:
    """Per-request codec streams, timed against playback deadlines (see `stream.CodecStream`).

    Args:
        codec: the SNAC codec that decodes the windows.
    """

    def __init__(self, codec: SnacCodec):
        self.codec = codec
        self._margin = codec.config.step_margin
        self._streams: dict[str, tuple[CodecStream, AudioSink]] = {}
        self._ready: list[_Audio] = []  # windows the last step completed, launched at the next
        self._decoding: tuple[list[_Audio], DecodedAudio | None] | None = None  # launched, not yet delivered
        self.step_s: float | None = None  # EWMA of measured step seconds (times each frame against its deadline)

    @property
    def busy(self) -> bool:
        """Whether windows wait to be launched or delivered."""
        return bool(self._ready) or self._decoding is not None

    def open(self, request_id: str, seed: int, sink: AudioSink) -> None:
        """Start a request's stream; `seed` fixes its SNAC noise."""
        self._streams[request_id] = (self.codec.open_stream(seed), sink)

    def cancel(self, request_id: str) -> None:
        """Drop a request: its windows not yet delivered are discarded (its sink is the caller's to end)."""
        entry = self._streams.pop(request_id, None)
        if entry is not None:
            entry[0].cancel()

    def deadlines(self) -> Iterator[tuple[str, float]]:
        """(request id, `CodecStream.deadline_s`) of every stream that is playing: what admission may not delay."""
        for request_id, (stream, _) in self._streams.items():
            deadline = stream.deadline_s
            if deadline is not None:
                yield request_id, deadline

    def record_step(self, seconds: float) -> None:
        """One engine step took `seconds`: the deadline timing of later frames uses the average."""
        self.step_s = seconds if self.step_s is None else self.step_s + _STEP_EWMA * (seconds - self.step_s)

    def push(
        self, frames: Iterable[tuple[str, Sequence[int]]], finished: Iterable[tuple[str, str]], now: float
    ) -> None:
        """Each (request id, 7 audio token ids) to its stream; `finished` (request id, why) flush their last windows.

        A window held back now could be decoded one frame (7 steps) and one step (its decode) later.
        """
        live = {} if self.step_s is None else {"now": now, "wait_s": decode_wait_s(self.step_s, self._margin)}
        for request_id, ids in frames:
            entry = self._streams.get(request_id)
            if entry is None or entry[0].cancelled:
                continue
            windows = entry[0].push(fmt.frame_codes(ids)[0], **live)
            if windows:
                self._ready.append(_Audio(entry[0], windows, entry[1], final=False))
        for request_id, reason in finished:
            entry = self._streams.pop(request_id, None)
            if entry is not None:
                self._ready.append(_Audio(entry[0], entry[0].finish(), entry[1], final=True, reason=reason))

    def launch(self, cuda_stream: torch.cuda.Stream | None) -> None:
        """Queue the SNAC decode of the ready windows on `cuda_stream` (runs now on CPU)."""
        audio, self._ready = self._ready, []
        windows = [w for a in audio for w in a.windows]
        if not windows:  # a request whose frames have all gone out may still end here: deliver ends its sink
            self._decoding = (audio, None) if audio else None
            return
        with torch.cuda.stream(cuda_stream) if cuda_stream is not None else contextlib.nullcontext():
            self._decoding = (audio, self.codec.launch(windows))

    def deliver(self) -> int:
        """Put each request's PCM of the last launch on its sink, in order, and end the sinks that are done.

        Returns the number of windows decoded.
        """
        if self._decoding is None:
            return 0
        audio, decoded = self._decoding
        pcm = iter(decoded.wait() if decoded is not None else ())
        self._decoding = None
        for a in audio:
            chunks = [next(pcm) for _ in a.windows]
            if a.stream.cancelled:
                continue
            for chunk in chunks:
                a.sink.put(chunk)
            if a.final:
                a.sink.finish(None, a.reason)
        return sum(len(a.windows) for a in audio)

    def fail(self, error: BaseException) -> list[str]:
        """End every request with windows pending or in decode with `error`; returns their ids."""
        audio = self._ready + (self._decoding[0] if self._decoding is not None else [])
        self._ready, self._decoding = [], None
        failed = []
        for a in audio:
            if not a.stream.cancelled:
                a.stream.cancel()
                a.sink.finish(error)
                failed.append(a.sink.request_id)
        return failed

    def close(self) -> None:
        """End the sinks of requests that finished generating but whose last windows were not delivered."""
        for a in self._ready + (self._decoding[0] if self._decoding is not None else []):
            if a.final and not a.stream.cancelled:
                a.sink.finish(RequestCancelled(a.sink.request_id))
        self._ready, self._decoding = [], None
        self._streams.clear()

    def __repr__(self) -> str:
        return f"CodecFeed(streams={len(self._streams)}, {self.codec})"
