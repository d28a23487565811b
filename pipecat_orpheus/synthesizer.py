"""What every speech source offers its callers: `submit()` returning an `AudioStream`.

The reference path and the batched engine both implement `Synthesizer`, so the server and the
Pipecat service run on either with no change. Audio is produced on a worker thread and handed
to the caller's event loop through the stream, which never blocks the producer: a slow reader
costs memory bounded by the request's `max_tokens`, never a stalled batch.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Protocol

import numpy as np

from pipecat_orpheus.config import Config
from pipecat_orpheus.engine.request import SamplingParams
from pipecat_orpheus.errors import RequestCancelled


class AudioStream:
    """Float32 mono 24 kHz PCM chunks of one request, as an async iterator.

    The producer (any thread) calls `put` and `finish`; the consumer iterates, and may
    `cancel()` at any time: iteration then ends at once and the producer is told through
    `on_cancel` so it can free the request's slot at its next step.
    """

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, on_cancel: Callable[[str], None]):
        self.request_id = request_id
        self._loop = loop
        self._on_cancel = on_cancel
        self._queue: asyncio.Queue[np.ndarray | BaseException | None] = asyncio.Queue()
        self._cancelled = threading.Event()
        self._done = False

    # -- producer side (any thread) --------------------------------------------------------

    @property
    def cancelled(self) -> bool:
        """Whether the consumer has cancelled; the producer should stop working on it."""
        return self._cancelled.is_set()

    def put(self, pcm: np.ndarray) -> None:
        """Hand one chunk of PCM to the consumer (thread-safe, never blocks)."""
        if not self.cancelled:
            self._call(self._queue.put_nowait, pcm)

    def finish(self, error: BaseException | None = None) -> None:
        """End the stream, normally or with `error` (thread-safe)."""
        self._call(self._queue.put_nowait, error)

    def _call(self, fn: Callable, arg: object) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            fn(arg)
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, arg)

    # -- consumer side (the caller's event loop) -------------------------------------------

    def __aiter__(self) -> AudioStream:
        return self

    async def __anext__(self) -> np.ndarray:
        if self._done or self.cancelled:
            raise StopAsyncIteration
        item = await self._queue.get()
        if self.cancelled:
            raise StopAsyncIteration
        if item is None:
            self._done = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return item

    def cancel(self) -> None:
        """Stop the request: no more audio is delivered, and the producer frees its slot."""
        if self._done or self.cancelled:
            return
        self._cancelled.set()
        self._queue.put_nowait(RequestCancelled(self.request_id))
        self._on_cancel(self.request_id)

    async def aclose(self) -> None:
        """Cancel unless finished (so `async with contextlib.aclosing(stream)` frees the slot)."""
        self.cancel()

    async def read_all(self) -> np.ndarray:
        """Every remaining sample, concatenated (for tests and offline use)."""
        chunks = [chunk async for chunk in self]
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)


class Synthesizer(Protocol):
    """A source of speech shared by every caller in the process."""

    def submit(self, text: str, *, voice: str | None = None, sampling: SamplingParams | None = None) -> AudioStream:
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
    def closed(self) -> bool:
        """Whether `close()` has been called (a closed synthesizer takes no more requests)."""
        ...

    def close(self) -> None:
        """Stop the worker and cancel everything in flight."""
        ...


_shared: dict[tuple, Synthesizer] = {}
_shared_lock = threading.Lock()


def load_synthesizer(config: Config) -> Synthesizer:
    """The process-wide speech source for `config`'s model: loaded once, shared by every caller.

    Blocking (loads weights and warms up): call it off the event loop.
    """
    key = (config.model, config.engine, config.codec)
    with _shared_lock:
        if key not in _shared or _shared[key].closed:
            if config.engine.backend == "reference":
                from pipecat_orpheus.reference import ReferenceSynthesizer

                _shared[key] = ReferenceSynthesizer.from_config(config)
            else:
                from pipecat_orpheus.engine.engine import OrpheusEngine

                _shared[key] = OrpheusEngine.from_config(config)
        return _shared[key]
