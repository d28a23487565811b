"""OrpheusEngine: one per process (per GPU), shared by every caller, with continuous batching.

`submit()` (from any event loop) turns text into one prompt per piece, admits the request to a
slot or the bounded queue (else `EngineBusy`), and returns an `AudioStream`. One background
thread owns the GPU and runs the loop

    schedule step k+1 -> launch SNAC for the ready windows, then step k+1 (one CUDA graph of the
    decode rows and any joining prompt chunks, GPU sampling), behind step k on one CUDA stream ->
    wait for step k's tokens ->
    postprocess -> each request's completed 7-token frames to its `CodecStream` -> hand out the
    PCM of the SNAC launch

Step k+1 is launched before the host has seen step k's tokens (each decode row reads its input
token on the GPU; the scheduler drops rows that turn out to have ended), so the GPU never idles
while the host works.

SNAC runs inside the step, on the engine's stream (CUDA graphs, batched over every request), so
the codec never waits for SMs or the GIL behind the LLM, and its cost is part of the measured
step time. The thread never waits on a consumer, so a slow reader never stalls the batch.

First audio and quality: a frame is decoded best once `codec.lookahead_frames` (L) later frames
exist, which would cost 7 engine steps per frame of lookahead before the first audio. Instead
each frame is timed against its playback deadline (`CodecStream`): the first frame goes out as
soon as the frames generated play for longer than the next one takes to come (at once unless
steps are slow), and the next ones wait for more lookahead only while they can still be decoded
before the audio before them has finished playing, until the stream has caught up; from then on
every frame gets the full lookahead. While live rows decode, a step prefills at most
`engine.prefill_tokens_while_decoding` prompt tokens (in the same forward), so a burst of joins
slows the streams already playing by little.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import sys
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from loguru import logger

from pipecat_orpheus import format as fmt
from pipecat_orpheus.codec import DecodedAudio, SnacCodec
from pipecat_orpheus.codec_stream import CodecStream, Window
from pipecat_orpheus.config import Config
from pipecat_orpheus.errors import ConfigError, RequestCancelled
from pipecat_orpheus.synthesizer import AudioStream
from pipecat_orpheus.text import split_text

from .model import OrpheusLM
from .request import Request, SamplingParams
from .runner import ModelRunner
from .scheduler import ScheduledStep, Scheduler, StepOutput

_FRAME_OFFSETS = fmt.AUDIO_TOKEN_OFFSET + fmt.CODEBOOK_SIZE * np.arange(fmt.FRAME_TOKENS)  # (7,) token -> code
_STEP_EWMA = 0.1  # weight of the newest step in the step-time average (~ the last 10 steps)


def decode_wait_s(step_s: float, margin: float) -> float:
    """How long until a window held back now could be decoded: one more frame (7 steps) and its decode (1)."""
    return (fmt.FRAME_TOKENS + 1) * step_s * margin


@dataclass(slots=True)
class EngineStats:
    """Counters since start: steps run, tokens generated and prefilled, SNAC windows decoded, seconds in steps."""

    steps: int = 0
    decode_tokens: int = 0
    prefill_tokens: int = 0
    codec_windows: int = 0
    busy_s: float = 0.0


class AudioSink(Protocol):
    """Where a request's PCM goes (`synthesizer.AudioStream` is one); called on the engine thread."""

    request_id: str

    def put(self, pcm: np.ndarray) -> None:
        """Take one chunk of float32 PCM."""

    def finish(self, error: BaseException | None = None) -> None:
        """End the request's audio, normally or with `error`."""


@dataclass(slots=True)
class _Audio:
    """Windows of one request to decode before the next step; `final` ends its stream after them."""

    codec_stream: CodecStream
    windows: list[Window]
    sink: AudioSink
    final: bool


class OrpheusEngine:
    """The batched Orpheus engine; implements `synthesizer.Synthesizer`.

    Args:
        llm: a loaded Orpheus `LlamaForCausalLM` on its device (weights are shared, not copied).
        tokenizer: its tokenizer.
        codec: a `SnacCodec` on the same device.
        config: the whole configuration (engine, sampling, voices are used).
        enforce_eager: never capture CUDA graphs (tests; always eager on CPU).
    """

    def __init__(self, llm, tokenizer, codec: SnacCodec, *, config: Config, enforce_eager: bool = False):
        # -- model
        self.config = config
        self.tokenizer = tokenizer
        self.lm = OrpheusLM(llm, max_positions=config.engine.max_tokens_per_slot)
        self.runner = ModelRunner(self.lm, config.engine, enforce_eager=enforce_eager)
        # -- scheduling
        self.scheduler = Scheduler(
            max_slots=config.engine.max_slots,
            max_queue=config.engine.max_queue,
            max_tokens_per_slot=config.engine.max_tokens_per_slot,
            prefill_chunk_tokens=config.engine.prefill_chunk_tokens,
            prefill_tokens_while_decoding=config.engine.prefill_tokens_while_decoding,
        )
        self._cond = threading.Condition()
        self._cancels: list[tuple[str, bool]] = []  # (request id, tell the stream) applied at the next step
        self._requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._closed = False
        self.stats = EngineStats()
        self.step_s: float | None = None  # EWMA of measured step seconds (times each frame against its deadline)
        if config.engine.switch_interval_ms > 0:  # the step thread gets the GIL back soon after each GPU sync
            sys.setswitchinterval(config.engine.switch_interval_ms / 1e3)
        # graphs and warm-up before the step thread starts: no other thread may use the GPU meanwhile
        self.runner.capture_graphs()
        self.runner.warm_up_prefill()
        codec.capture_graphs()
        # -- audio
        self.codec = codec
        self._margin = codec.config.step_margin
        self._codec_streams: dict[str, CodecStream] = {}
        self._audio: list[_Audio] = []  # windows the last step completed, decoded at the start of the next
        self._thread = threading.Thread(target=self._loop, name="orpheus-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: Config, *, enforce_eager: bool = False) -> OrpheusEngine:
        """Load the model and codec named in `config.model`, capture graphs and warm up (blocking)."""
        from pipecat_orpheus.loader import load_models

        llm, tokenizer, snac, device = load_models(config.model)
        engine = cls(llm, tokenizer, SnacCodec(snac, config.codec, device), config=config, enforce_eager=enforce_eager)
        engine.warm_up()
        return engine

    # -- Synthesizer -------------------------------------------------------------------------

    def submit(self, text: str, *, voice: str | None = None, sampling: SamplingParams | None = None) -> AudioStream:
        """Start speaking `text` (call from the event loop that reads the stream); `EngineBusy` when full."""
        voice = voice or self.config.voices.default
        if voice not in self.config.voices.available:
            raise ConfigError("voice", f"{voice!r} is not one of {', '.join(self.config.voices.available)}")
        sampling = sampling or SamplingParams.from_config(self.config.sampling)
        pieces = split_text(text, self.config.engine.max_chars_per_piece) or [""]
        prompts = [fmt.build_prompt(self.tokenizer, piece, voice) for piece in pieces]
        stream = AudioStream(f"orpheus-{next(self._ids)}", asyncio.get_running_loop(), self.cancel)
        return self._submit_prompts(prompts, sampling, stream)

    def _submit_prompts(self, prompts: list[list[int]], sampling: SamplingParams, stream) -> AudioStream:
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
        request = Request(stream.request_id, prompts, sampling, seed, stream=stream, arrival_s=time.perf_counter())
        with self._cond:
            if self._closed:
                raise RuntimeError("OrpheusEngine is closed")
            self.scheduler.admit(request)  # raises EngineBusy (or ConfigError for a prompt too long)
            self._requests[request.request_id] = request
            self._codec_streams[request.request_id] = self.codec.open_stream(seed)
            self._cond.notify()
        return stream

    def cancel(self, request_id: str) -> None:
        """Stop a request; its slot is freed at the next step and its stream ends (RequestCancelled)."""
        with self._cond:
            self._cancels.append((request_id, True))
            self._cond.notify()

    @property
    def active_requests(self) -> int:
        """Requests holding a slot."""
        return self.scheduler.num_running

    @property
    def queued_requests(self) -> int:
        """Requests waiting for a slot."""
        return self.scheduler.num_waiting

    @property
    def closed(self) -> bool:
        """Whether `close()` has been called."""
        return self._closed

    def close(self) -> None:
        """Stop the step thread; every request in flight (or with audio not yet decoded) ends with RequestCancelled."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify()
        self._thread.join()
        with self._cond:
            for request_id in list(self._requests):
                self._drop(request_id, notify=True)
            for audio in self._audio:  # finished generating, its last windows not yet decoded
                if not audio.codec_stream.cancelled:
                    audio.sink.finish(RequestCancelled(audio.sink.request_id))
            self._audio = []

    def warm_up(self) -> None:
        """Run two short requests end to end so the first caller pays no compile or allocation cost.

        The first runs with the full lookahead (no step measured yet), the second timed against deadlines.
        """

        class _Sink:
            cancelled = False

            def __init__(self, request_id: str):
                self.request_id = request_id
                self.done = threading.Event()

            def put(self, pcm: np.ndarray) -> None:
                pass

            def finish(self, error: BaseException | None = None) -> None:
                self.done.set()

        prompt = fmt.build_prompt(self.tokenizer, "Warm up.", self.config.voices.default)
        frames = 4 * fmt.FRAME_TOKENS  # enough for the codec's first windows; END_OF_SPEECH masked until then
        sampling = SamplingParams(max_tokens=frames, min_tokens=frames)
        for i in range(2):
            sink = _Sink(f"warm-up-{i}")
            self._submit_prompts([prompt], sampling, sink)
            sink.done.wait()

    # -- the step thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        if self.codec.device.type == "cuda":
            self.codec.warmup()  # in this thread: a thread's first eager decode builds its cuDNN state (~1 s)
        in_flight: ScheduledStep | None = None
        while True:
            with self._cond:
                self._apply_cancels()
                while not (self._closed or self._requests or self._cancels or self._audio or in_flight):
                    self._cond.wait()
                if self._closed:
                    return
                self._apply_cancels()
                step = self.scheduler.schedule()
            t0 = time.perf_counter()
            in_flight = self._step(step, in_flight)
            dt = time.perf_counter() - t0
            self.stats.steps += 1
            self.stats.busy_s += dt
            self.step_s = dt if self.step_s is None else self.step_s + _STEP_EWMA * (dt - self.step_s)

    def _step(self, step: ScheduledStep, in_flight: ScheduledStep | None) -> ScheduledStep | None:
        """Launch SNAC for the ready windows and `step` behind the step in flight, then finish that one.

        The GPU runs [step in flight] [SNAC] [step] back to back on one stream: while it works
        through them the host applies the tokens of the step in flight and hands out the PCM, so
        the GPU never waits for the host. Returns the step now in flight.
        """
        audio, self._audio = self._audio, []
        decoded = self._launch_audio(audio)
        launched = None
        if not step.empty:
            try:
                self.runner.launch(step)
                launched = step
            except Exception as e:  # noqa: BLE001 - a failed step fails its requests, the engine goes on
                self._fail_step(step, e)
        if in_flight is not None:
            self._finish(in_flight)
        if decoded is not None:
            self._deliver(audio, decoded)
        return launched

    def _finish(self, step: ScheduledStep) -> None:
        """Wait for `step`'s tokens and apply them: frames to the codec streams, finished requests out."""
        try:
            tokens, first = self.runner.collect()
        except Exception as e:  # noqa: BLE001
            self._fail_step(step, e)
            return
        now = time.perf_counter()
        for chunk in step.prefill:
            if chunk.last and chunk.request.first_token_s is None:
                chunk.request.first_token_s = now
        with self._cond:
            out = self.scheduler.postprocess(step, tokens.tolist(), first.tolist())
            self._emit(out, now)
        self.stats.decode_tokens += len(step.decode) + len(first)
        self.stats.prefill_tokens += sum(c.end - c.start for c in step.prefill)

    def _fail_step(self, step: ScheduledStep, error: Exception) -> None:
        logger.opt(exception=error).error(f"{self}: step failed")
        with self._cond:
            for r in [*step.decode, *(c.request for c in step.prefill)]:
                self._drop(r.request_id, notify=False)
                r.stream.finish(error)

    def _launch_audio(self, audio: list[_Audio]) -> DecodedAudio | None:
        """Queue the SNAC decode of `audio` on the engine's stream; a failure ends those requests with it."""
        windows = [w for a in audio for w in a.windows]
        if not windows:
            return None
        try:
            with torch.cuda.stream(self.runner.stream):
                return self.codec.launch(windows)
        except Exception as e:  # noqa: BLE001 - only these requests fail; their slots are freed
            logger.exception(f"{self}: SNAC decode of {len(windows)} windows failed")
            self._fail_audio(audio, e)
            return None

    def _deliver(self, audio: list[_Audio], decoded: DecodedAudio) -> None:
        """Put each request's PCM on its stream (in order) and end the streams that are done."""
        try:
            pcm = iter(decoded.wait())
        except Exception as e:  # noqa: BLE001
            logger.exception(f"{self}: SNAC decode failed")
            self._fail_audio(audio, e)
            return
        for a in audio:
            chunks = [next(pcm) for _ in a.windows]
            if a.codec_stream.cancelled:
                continue
            for chunk in chunks:
                a.sink.put(chunk)
            if a.final:
                a.sink.finish(None)
        self.stats.codec_windows += sum(len(a.windows) for a in audio)

    def _fail_audio(self, audio: list[_Audio], error: Exception) -> None:
        with self._cond:
            for a in audio:
                if not a.codec_stream.cancelled:
                    a.codec_stream.cancel()
                    a.sink.finish(error)
                    self._cancels.append((a.sink.request_id, False))  # frees the slot at the next step

    def _apply_cancels(self) -> None:
        cancels, self._cancels = self._cancels, []
        for request_id, notify in cancels:
            self._drop(request_id, notify=notify)

    def _drop(self, request_id: str, *, notify: bool) -> None:
        """Remove a request everywhere (caller holds the lock); its stream ends unless `notify` is False."""
        self.scheduler.cancel(request_id)
        request = self._requests.pop(request_id, None)
        codec_stream = self._codec_streams.pop(request_id, None)
        if codec_stream is not None:
            codec_stream.cancel()
        if request is not None and notify:
            request.stream.finish(RequestCancelled(request_id))

    def _emit(self, out: StepOutput, now: float) -> None:
        """Completed frames to each request's codec stream; its ready windows decode before the next step.

        A window held back now could be decoded one frame (7 steps) and one step (its decode) later.
        """
        live = {} if self.step_s is None else {"now": now, "wait_s": decode_wait_s(self.step_s, self._margin)}
        for request, ids in out.frames:
            if request.first_frame_s is None:
                request.first_frame_s = now
            codec_stream = self._codec_streams.get(request.request_id)
            if codec_stream is None or codec_stream.cancelled:
                continue
            windows = codec_stream.push(np.asarray(ids, dtype=np.int64) - _FRAME_OFFSETS, **live)
            if windows:
                self._audio.append(_Audio(codec_stream, windows, request.stream, final=False))
        for request in out.finished:
            self._requests.pop(request.request_id, None)
            codec_stream = self._codec_streams.pop(request.request_id, None)
            if codec_stream is not None:
                self._audio.append(_Audio(codec_stream, codec_stream.finish(), request.stream, final=True))

    def __repr__(self) -> str:
        return f"OrpheusEngine(active={self.active_requests}, queued={self.queued_requests})"
