"""`CodecWorker`: decodes the ready windows of every live request on one thread, in batches.

The engine's step thread hands each request's windows over as they become ready; this thread
takes everything queued as soon as its previous batch is done, so a lone request waits only for
its own decode and batches grow by themselves under load (no polling, no fixed wait).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from loguru import logger

from pipecat_orpheus.codec import CodecStream, SnacCodec, Window
from pipecat_orpheus.errors import RequestCancelled


class AudioSink(Protocol):
    """Where a request's PCM goes (`synthesizer.AudioStream` is one); called on the worker thread."""

    def put(self, pcm: np.ndarray) -> None:
        """Take one chunk of float32 PCM."""

    def finish(self, error: BaseException | None = None) -> None:
        """End the request's audio, normally or with `error`."""


@dataclass(slots=True)
class _Job:
    stream: CodecStream
    window: Window | None  # None: the end marker of a stream
    sink: AudioSink


class CodecWorker:
    """Decodes the windows of every live request on one thread, one batch as soon as the last is done.

    No polling and no fixed wait: `submit` wakes the thread through a condition variable, and it
    takes every queued window (up to `codec.max_batch`, oldest first), so a lone request waits
    only for its own decode, and under load batches grow by themselves. Each request's audio is
    delivered in order; a cancelled stream's (or sink's) queued windows are dropped unseen.
    """

    def __init__(self, codec: SnacCodec, *, name: str = "snac-codec", warmup: bool | None = None):
        self._codec = codec
        self._warmup = codec.device.type == "cuda" if warmup is None else warmup  # submits queue meanwhile
        self._jobs: deque[_Job] = deque()
        self._cv = threading.Condition()
        self._busy = self._warmup  # wait_idle() also waits for the warm-up
        self._closed = False
        self.batches = 0
        self.windows = 0
        self.decode_seconds = 0.0  # time spent in SNAC decode calls (the codec's share of the device)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, stream: CodecStream, windows: list[Window], sink: AudioSink, *, final: bool = False) -> None:
        """Queue `windows` of `stream` for `sink`; with `final`, call `sink.finish()` after them."""
        with self._cv:
            if self._closed:
                raise RuntimeError("CodecWorker is closed")
            self._jobs.extend(_Job(stream, w, sink) for w in windows)
            if final:
                self._jobs.append(_Job(stream, None, sink))
            self._cv.notify()

    @property
    def closed(self) -> bool:
        """Whether `close()` has been called."""
        return self._closed

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is queued or decoding; False on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._jobs and not self._busy, timeout)

    def close(self) -> None:
        """Stop the thread; requests still queued end with `RequestCancelled`."""
        with self._cv:
            self._closed = True
            left, self._jobs = self._jobs, deque()
            self._cv.notify_all()
        self._thread.join()
        for stream, sink in {id(j.stream): (j.stream, j.sink) for j in left}.values():
            if not stream.cancelled:
                sink.finish(RequestCancelled("the codec worker was closed"))

    def __enter__(self) -> CodecWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _take(self) -> list[_Job] | None:
        with self._cv:
            self._busy = False
            self._cv.notify_all()
            self._cv.wait_for(lambda: self._jobs or self._closed)
            if self._closed:
                return None
            batch, n = [], 0
            while self._jobs and n < self._codec.config.max_batch:
                job = self._jobs.popleft()
                if not (job.stream.cancelled or getattr(job.sink, "cancelled", False)):
                    batch.append(job)
                    n += job.window is not None
            self._busy = True
            return batch

    def _loop(self) -> None:
        if self._warmup:
            self._codec.warmup()
        while (batch := self._take()) is not None:
            windows = [j.window for j in batch if j.window is not None]
            t0 = time.perf_counter()
            try:
                pcm = iter(self._codec.decode(windows))
            except Exception as e:  # noqa: BLE001 - every request in the batch gets the error
                logger.exception(f"{self}: SNAC decode of {len(windows)} windows failed")
                for stream, sink in {id(j.stream): (j.stream, j.sink) for j in batch}.values():
                    stream.cancel()
                    sink.finish(e)
                continue
            self.decode_seconds += time.perf_counter() - t0
            self.batches += 1
            self.windows += len(windows)
            for job in batch:
                chunk = next(pcm) if job.window is not None else None
                if job.stream.cancelled:
                    continue
                if chunk is not None:
                    job.sink.put(chunk)
                else:
                    job.sink.finish(None)
