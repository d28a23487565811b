"""What `speech.Speech` drives: a backend speaking prompts it has built, and how one is loaded here.

A backend is the batched engine or the reference path, in this process (`load_backend`), or
engine cores in processes of their own (`core.EngineCores`, one per device), each of which
loads one of these two with `load_backend` on its side.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from pipecat_orpheus.codec import AudioSink
from pipecat_orpheus.config import Config
from pipecat_orpheus.engine.engine import EngineStats
from pipecat_orpheus.engine.request import SamplingParams
from pipecat_orpheus.engine.stream import AudioStream


class Backend(Protocol):
    """Speaks token prompts: `submit_prompts` for an event loop's caller, `enqueue` for any sink."""

    tokenizer: object
    active_requests: int
    queued_requests: int
    closed: bool
    healthy: bool  # can speak now (False while an engine core restarts)
    engine_stats: list[EngineStats]  # each engine's counters (one per engine core; none for the reference path)

    def submit_prompts(self, prompts: list[list[int]], sampling: SamplingParams) -> AudioStream:
        """Speak `prompts` in order as one stream read on the running event loop; `EngineBusy` when full."""
        ...

    def close(self) -> None:
        """Stop and cancel everything in flight."""
        ...


class LocalBackend(Backend, Protocol):
    """A backend in this process, which the engine core serves to its clients."""

    on_step: Callable[[], None] | None  # called on the backend's thread after each delivery of audio

    def enqueue(self, prompts: list[list[int]], sampling: SamplingParams, sink: AudioSink) -> None:
        """Speak `prompts` into `sink` (any thread; a unique `sink.request_id`); `EngineBusy` when full."""
        ...

    def cancel(self, request_id: str) -> None:
        """Stop a request; its slot is freed at the next step."""
        ...


def load_backend(config: Config, *, enforce_eager: bool = False) -> LocalBackend:
    """Load the model named in `config.model` and start the configured backend in this process (blocking)."""
    from pipecat_orpheus.loader import load_models

    llm, tokenizer, snac, device = load_models(config.model)
    if config.engine.backend == "reference":
        from pipecat_orpheus.reference import ReferenceSynthesizer

        return ReferenceSynthesizer.from_models(llm, tokenizer, snac, device, config)
    from pipecat_orpheus.engine.engine import OrpheusEngine

    return OrpheusEngine.from_models(llm, tokenizer, snac, device, config, enforce_eager=enforce_eager)
