"""One conversation of `bench.service.pipelines`: a pipeline's `Recorder`, and the utterances it times.

A conversation queues a `TTSSpeakFrame`, waits for its `TTSStoppedFrame` (or all its audio) and
until the audio has played, pauses, and speaks again. Lateness is `bench.server.load_client`'s:
playback starts at an utterance's first audio frame, and a frame is late when it arrives after
the audio before it has finished playing. An interrupted utterance gets an `InterruptionFrame`
queued at the pipeline's start part-way; from then on nothing is late, and the last audio frame
to arrive after it gives the stop time.
"""

from __future__ import annotations

import asyncio
import random
import time

from pipecat.frames.frames import InterruptionFrame, TTSAudioRawFrame, TTSSpeakFrame, TTSStartedFrame, TTSStoppedFrame
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from pipecat_orpheus.format import SAMPLE_RATE

UTTERANCE_TIMEOUT_S = 120.0  # an utterance still open after this is recorded as a timeout
QUIET_S = 0.5  # after an interruption, this long without audio of that utterance: it has stopped


class Utterance:
    """One `TTSSpeakFrame`'s timing as its frames reach the end of the pipeline."""

    def __init__(self, conv: int, n: int, expected_samples: int, interrupt_at: int | None):
        self.conv, self.n, self.expected, self.interrupt_at = conv, n, expected_samples, interrupt_at
        self.sent = time.monotonic()
        self.context_id: str | None = None
        self.first: float | None = None
        self.last: float | None = None
        self.samples = self.frames = self.late = 0
        self.worst_late = 0.0
        self.interrupted: float | None = None  # InterruptionFrame queued
        self.reached: float | None = None  # ... and seen at the end of the pipeline
        self.last_after_interrupt: float | None = None
        self.stopped: float | None = None  # TTSStoppedFrame seen
        self.outcome, self.error = "open", None
        self.ended = asyncio.Event()  # stopped, all its audio, or an error
        self.due = asyncio.Event()  # audio reached interrupt_at

    def audio(self, t: float, samples: int) -> None:
        if self.interrupted is not None:  # the player has stopped: only the stop time counts
            self.last_after_interrupt = t
            return
        if self.first is None:
            self.first = t
        elif (lateness := t - (self.first + self.samples / SAMPLE_RATE)) > 0:
            self.late += 1
            self.worst_late = max(self.worst_late, lateness)
        self.samples += samples
        self.frames += 1
        self.last = t
        if self.interrupt_at is not None and self.samples >= self.interrupt_at:
            self.due.set()
        if self.samples >= self.expected:
            self.ended.set()

    def played_at(self) -> float:
        """When the audio received has finished playing."""
        return self.sent if self.first is None else self.first + self.samples / SAMPLE_RATE

    def to_dict(self) -> dict:
        since = lambda t, t0: None if t is None or t0 is None else t - t0  # noqa: E731
        return {
            "conv": self.conv, "n": self.n, "outcome": self.outcome, "error": self.error,
            "ttfa_s": since(self.first, self.sent), "ttla_s": since(self.last, self.sent),
            "stopped_s": since(self.stopped, self.sent), "audio_s": self.samples / SAMPLE_RATE,
            "full_length": self.samples == self.expected, "frames": self.frames, "late_chunks": self.late,
            "worst_late_s": self.worst_late, "interrupt_reach_s": since(self.reached, self.interrupted),
            "interrupt_stop_s": None if self.interrupted is None
            else max(0.0, since(self.last_after_interrupt, self.interrupted) or 0.0),
        }  # fmt: skip


class Recorder(FrameProcessor):
    """The pipeline's last processor: each audio frame's arrival, by the utterance its context belongs to."""

    def __init__(self):
        super().__init__()
        self.current: Utterance | None = None
        self.by_context: dict[str, Utterance] = {}

    def begin(self, u: Utterance) -> None:
        self.current = u

    def error(self, message: str) -> None:
        if self.current is not None and not self.current.ended.is_set():
            self.current.outcome, self.current.error = "error", message
            self.current.ended.set()

    def _of(self, context_id: str | None) -> Utterance | None:
        u = self.by_context.get(context_id)
        if u is None and self.current is not None and self.current.context_id is None:
            u, u.context_id = self.current, context_id
            self.by_context[context_id] = u
        return u

    async def process_frame(self, frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        t = time.monotonic()
        if isinstance(frame, TTSAudioRawFrame) and (u := self._of(frame.context_id)) is not None:
            u.audio(t, frame.num_frames)  # samples per channel
        elif isinstance(frame, TTSStartedFrame):
            self._of(frame.context_id)
        elif isinstance(frame, TTSStoppedFrame) and (u := self._of(frame.context_id)) is not None:
            u.stopped = t
            u.ended.set()
        elif isinstance(frame, InterruptionFrame) and (u := self.current) is not None and u.interrupted is not None:
            u.reached = u.reached or t
        await self.push_frame(frame, direction)


async def first_of(*events: asyncio.Event, timeout_s: float) -> bool:
    """Wait until one of `events` is set; False on timeout."""
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    done, pending = await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    for w in pending:
        w.cancel()
    return bool(done)


async def sleep_until(t: float) -> None:
    await asyncio.sleep(max(0.0, t - time.monotonic()))


async def speak(worker: PipelineWorker, rec: Recorder, u: Utterance, text: str) -> None:
    """One utterance, to its end or interrupted part-way and then quiet for `QUIET_S`."""
    rec.begin(u)
    u.sent = time.monotonic()
    await worker.queue_frame(TTSSpeakFrame(text))
    events = (u.ended,) if u.interrupt_at is None else (u.ended, u.due)
    if not await first_of(*events, timeout_s=UTTERANCE_TIMEOUT_S):
        u.outcome = "timeout"
        return
    if u.outcome == "error":
        return
    if not u.due.is_set() or u.ended.is_set():  # spoke to the end (a short one may end before it is due)
        u.outcome = "done"
        return
    u.interrupted = time.monotonic()
    await worker.queue_frame(InterruptionFrame())
    while (quiet := time.monotonic() - max(u.interrupted, u.reached or 0, u.last_after_interrupt or 0)) < QUIET_S:
        await asyncio.sleep(QUIET_S - quiet)
    u.outcome = "interrupted" if u.reached is not None else "interrupt_unseen"


async def converse(
    args, worker, rec, conv: int, level: int, texts, t0: float, expected: int, emit, *, duration_s, fraction
) -> None:
    """Conversation `conv` of `level`: speak, wait until played, pause, again, until T0 + `duration_s`."""
    rng = random.Random(1000 * level + conv)
    end, (lo, hi) = t0 + duration_s, args.pause_s
    await sleep_until(t0 + args.spread_s * conv / level)
    n = 0
    while time.monotonic() < end:
        interrupt_at = rng.randint(1, max(1, expected // 2)) if rng.random() < fraction else None
        u = Utterance(conv, n, expected, interrupt_at)
        await speak(worker, rec, u, texts[(conv + 5 * n) % len(texts)])
        emit(u)
        if u.outcome in ("error", "timeout"):
            return
        if u.outcome == "done":
            await sleep_until(u.played_at())
        pause = rng.uniform(lo, hi)
        if time.monotonic() + pause >= end:
            return
        await asyncio.sleep(pause)
        n += 1
