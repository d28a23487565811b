"""A request's audio as the caller sees it: PCM chunks produced on the engine's thread, read on an event loop.

The producer never blocks: a slow reader costs memory bounded by the request's `max_tokens`,
never a stalled batch.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import numpy as np

from pipecat_orpheus.errors import RequestCancelled


class AudioStream:
    """Float32 mono 24 kHz PCM chunks of one request, as an async iterator.

    The producer (any thread) calls `put` and `finish`; the consumer iterates, and may
    `cancel()` at any time: iteration then ends at once and the producer is told through
    `on_cancel` so it can free the request's slot at its next step.
    """

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, on_cancel: Callable[[str], None]):
        self.request_id = request_id
        self.loop = loop
        self._on_cancel = on_cancel
        self._queue: asyncio.Queue[np.ndarray | BaseException | None] = asyncio.Queue()
        self._cancelled = threading.Event()
        self._done = False
        self.stop_reason: str | None = None  # why the audio ended (`engine.guard`), once it ended normally

    # -- producer side (any thread) --------------------------------------------------------

    @property
    def cancelled(self) -> bool:
        """Whether the consumer has cancelled; the producer should stop working on it."""
        return self._cancelled.is_set()

    def put(self, pcm: np.ndarray) -> None:
        """Hand one chunk of PCM to the consumer (thread-safe, never blocks)."""
        if not self.cancelled:
            self._call(self._queue.put_nowait, pcm)

    def finish(self, error: BaseException | None = None, reason: str | None = None) -> None:
        """End the stream, normally (why: `reason`, read as `stop_reason` once iteration ends) or with `error`."""
        if error is None:
            self.stop_reason = reason
        self._call(self._queue.put_nowait, error)

    def _call(self, fn: Callable, arg: object) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            fn(arg)
        elif not self.loop.is_closed():
            self.loop.call_soon_threadsafe(fn, arg)

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
