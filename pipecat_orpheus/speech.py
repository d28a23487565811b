"""What every speech source offers its callers, and the one front that turns text into prompts.

`Speech` implements `Synthesizer` over a backend (the batched engine or the reference path):
it checks the voice, applies the sampling defaults, splits the text into pieces once and builds
each piece's prompt, so the server and the Pipecat service run on either backend with no change.
`load_synthesizer` keeps one per configuration in the process, shared by every caller.
"""

from __future__ import annotations

import threading
from typing import Protocol

import numpy as np

from pipecat_orpheus import format as fmt
from pipecat_orpheus.backend import Backend, load_backend
from pipecat_orpheus.config import Config, SamplingConfig, VoiceConfig
from pipecat_orpheus.engine.request import SamplingParams
from pipecat_orpheus.engine.stream import AudioStream
from pipecat_orpheus.text import split_text


class SpeechStream(Protocol):
    """One text's audio: float32 mono 24 kHz PCM chunks, as an async iterator, cancellable at once."""

    cancelled: bool

    def __aiter__(self) -> SpeechStream: ...

    async def __anext__(self) -> np.ndarray: ...

    def cancel(self) -> None:
        """Stop now: iteration ends and the source frees the request."""
        ...

    async def aclose(self) -> None:
        """Cancel unless finished."""
        ...


class Synthesizer(Protocol):
    """A source of speech: the shared engine (`Speech`) or a server (`wire.remote.RemoteSynthesizer`)."""

    def submit(self, text: str, *, voice: str | None = None, sampling: SamplingParams | None = None) -> SpeechStream:
        """Start speaking `text`; raises `EngineBusy` at once when the queue is full."""
        ...

    @property
    def active_requests(self) -> int:
        """Requests holding a slot (generating) right now."""
        ...

    @property
    def queued_requests(self) -> int:
        """Requests waiting for a slot."""
        ...

    @property
    def headroom(self) -> int | None:
        """Streams the engine can admit now and stay real time (None when it does not know)."""
        ...

    @property
    def closed(self) -> bool:
        """Whether `close()` has been called (a closed synthesizer takes no more requests)."""
        ...

    @property
    def healthy(self) -> bool:
        """Whether it can speak now (False while an engine core restarts; `/healthz` says 503)."""
        ...

    def close(self) -> None:
        """Stop the worker and cancel everything in flight."""
        ...


class Speech:
    """The one submit front: voice check, sampling defaults, one text split, prompts; a `Synthesizer`.

    Args:
        backend: the engine or the reference path.
        voices: the `voices` section (default voice, the voices a request may name).
        sampling: the `sampling` section (defaults of requests that bring none).
        max_chars_per_piece: longest text spoken by one prompt (`engine.max_chars_per_piece`).
    """

    def __init__(self, backend: Backend, *, voices: VoiceConfig, sampling: SamplingConfig, max_chars_per_piece: int):
        self.backend = backend
        self.voices = voices
        self.sampling = SamplingParams.from_config(sampling)
        self.max_chars_per_piece = max_chars_per_piece

    def submit(self, text: str, *, voice: str | None = None, sampling: SamplingParams | None = None) -> AudioStream:
        """Start speaking `text` (call from the event loop that reads the stream); `EngineBusy` when full."""
        voice = self.voices.check(voice)
        pieces = split_text(text, self.max_chars_per_piece) or [""]
        prompts = [fmt.build_prompt(self.backend.tokenizer, piece, voice) for piece in pieces]
        return self.backend.submit_prompts(prompts, sampling or self.sampling)

    @property
    def active_requests(self) -> int:
        """Requests holding a slot."""
        return self.backend.active_requests

    @property
    def queued_requests(self) -> int:
        """Requests waiting for a slot."""
        return self.backend.queued_requests

    @property
    def headroom(self) -> int | None:
        """The engine's headroom as its counters last said (the reference path keeps none: None)."""
        stats = getattr(self.backend, "stats", None)  # the engine's, or the engine core's as of its last beat
        return None if stats is None else stats.headroom

    @property
    def closed(self) -> bool:
        """Whether `close()` has been called."""
        return self.backend.closed

    @property
    def healthy(self) -> bool:
        """Whether the backend can speak now."""
        return self.backend.healthy

    def close(self) -> None:
        """Stop the backend; everything in flight ends with `RequestCancelled`."""
        self.backend.close()

    def __repr__(self) -> str:
        return f"Speech({self.backend!r})"


def open_backend(config: Config) -> Backend:
    """The configured backend, started (blocking): in an engine core process of its own, or in this one."""
    if config.engine.core_process:
        from pipecat_orpheus.core.client import EngineClient

        return EngineClient.start(config)
    return load_backend(config)


def speech_for(backend: Backend, config: Config) -> Speech:
    """`backend` behind the front that `config`'s voices, sampling and piece length describe."""
    return Speech(
        backend, voices=config.voices, sampling=config.sampling, max_chars_per_piece=config.engine.max_chars_per_piece
    )


_backends: dict[tuple, Backend] = {}  # one per model, engine and codec: the GPU's one copy of the weights
_fronts: dict[Config, Speech] = {}
_shared_lock = threading.Lock()


def load_synthesizer(config: Config) -> Speech:
    """The process-wide speech source for `config`, loaded once and shared by every caller.

    Callers whose configurations differ only in voices or sampling share one engine, each with
    its own front. Blocking (loads weights and warms up): call it off the event loop.
    """
    key = (config.model, config.engine, config.codec)
    with _shared_lock:
        if key not in _backends or _backends[key].closed:
            _backends[key] = open_backend(config)
        front = _fronts.get(config)
        if front is None or front.backend is not _backends[key]:
            front = _fronts[config] = speech_for(_backends[key], config)
        return front
