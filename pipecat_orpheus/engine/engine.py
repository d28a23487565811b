"""OrpheusEngine: one per process (per GPU), shared by every caller, with continuous batching.

`submit_prompts()` (from any event loop) admits a request of one prompt per piece to a slot or
the bounded queue (else `EngineBusy`) and returns an `AudioStream`. One background thread owns
the GPU and runs the step: SNAC for the windows the last step completed, then the next LLM step
(one CUDA graph of the decode rows and any joining prompt chunks, GPU sampling), both queued
behind the step in flight on one CUDA stream; then it waits for that step's tokens, hands its
frames to the `CodecFeed` and the PCM to each request's stream. Step k+1 is launched before the
host has seen step k's tokens, so the GPU never idles while the host works, and the thread never
waits on a consumer. How frames are timed against playback: `codec.stream.CodecStream`.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from loguru import logger

from pipecat_orpheus import format as fmt
from pipecat_orpheus.codec import AudioSink, CodecFeed, SnacCodec
from pipecat_orpheus.config import EngineConfig, GuardConfig
from pipecat_orpheus.errors import EngineClosed, RequestCancelled

from .admission import Admission, StepModel, steps_to_frame
from .guard import DURATION, GUARD_REASONS, LoopDetector
from .model import OrpheusLM
from .request import Request, RequestStatus, SamplingParams
from .runner import ModelRunner
from .scheduler import ScheduledStep, Scheduler
from .stream import AudioStream

_WARM_UP_TEXT = "Warm up."


@dataclass(slots=True)
class EngineStats:
    """Counters since start: steps, tokens, SNAC windows, seconds in steps, pieces the guard stopped (by reason).

    And one figure of now, `headroom`: streams the engine can admit and stay real time (`Admission.headroom`).
    """

    steps: int = 0
    decode_tokens: int = 0
    prefill_tokens: int = 0
    codec_windows: int = 0
    busy_s: float = 0.0
    guard_duration: int = 0
    guard_loop: int = 0
    headroom: int = 0


class _SwitchInterval:
    """The interpreter's GIL switch interval while any engine runs, restored when the last one closes.

    A short interval gives the step thread the GIL back soon after each GPU sync; it is
    process-wide, so it is set by the first engine and put back by the last.
    """

    _lock = threading.Lock()
    _users = 0
    _saved = 0.0

    @classmethod
    def acquire(cls, ms: float) -> None:
        with cls._lock:
            if cls._users == 0:
                cls._saved = sys.getswitchinterval()
                sys.setswitchinterval(ms / 1e3)
            cls._users += 1

    @classmethod
    def release(cls) -> None:
        with cls._lock:
            cls._users -= 1
            if cls._users == 0:
                sys.setswitchinterval(cls._saved)


class _WarmUpSink:
    """Where warm-up audio goes: nowhere; `done` is set when the request ends."""

    cancelled = False

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.done = threading.Event()

    def put(self, pcm) -> None:
        pass

    def finish(self, error: BaseException | None = None, reason: str | None = None) -> None:
        self.done.set()


class OrpheusEngine:
    """The batched Orpheus engine, behind `speech.Speech`.

    Args:
        llm: a loaded Orpheus `LlamaForCausalLM` on its device (weights are shared, not copied).
        tokenizer: its tokenizer.
        codec: a `SnacCodec` on the same device.
        config: the `engine` section.
        guard: the `guard` section (loop detection; duration budgets come with each request); None: its defaults.
        enforce_eager: never capture CUDA graphs (tests; always eager on CPU).
        step_model: the step-time model to start from (tests); None: measured at start.
    """

    def __init__(
        self,
        llm,
        tokenizer,
        codec: SnacCodec,
        *,
        config: EngineConfig,
        guard: GuardConfig | None = None,
        enforce_eager: bool = False,
        step_model: StepModel | None = None,
    ):
        self.config = config
        self.tokenizer = tokenizer
        guard = guard if guard is not None else GuardConfig()
        self.lm = OrpheusLM(llm, max_positions=config.max_tokens_per_slot)
        self.runner = ModelRunner(self.lm, config, enforce_eager=enforce_eager)
        self.scheduler = Scheduler(
            max_slots=config.max_slots,
            max_queue=config.max_queue,
            max_tokens_per_slot=config.max_tokens_per_slot,
            prefill_chunk_tokens=config.prefill_chunk_tokens,
            prefill_tokens_while_decoding=config.prefill_tokens_while_decoding,
            loops=LoopDetector(config.max_slots, guard) if guard.loop_frames else None,
        )
        self.feed = CodecFeed(codec)
        self._cond = threading.Condition()
        self._cancels: list[tuple[str, bool]] = []  # (request id, tell the stream) applied at the next step
        self._requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._closed = False
        self._stats = EngineStats()
        self.on_step: Callable[[], None] | None = None  # called on the step thread after each step's audio is out
        # tests only: rewrites a step's sampled tokens (decode rows, first tokens) in place before the host applies them
        self.rewrite_tokens: Callable[[ScheduledStep, list[int], list[int]], None] | None = None
        self._switch_interval = config.switch_interval_ms > 0
        if self._switch_interval:
            _SwitchInterval.acquire(config.switch_interval_ms)
        # graphs and warm-up before the step thread starts: no other thread may use the GPU meanwhile
        self.start_timings: dict[str, float] = {}  # seconds per start stage, logged: where a cold start goes
        for stage, run in (
            ("engine graphs", self.runner.capture_graphs),
            ("prefill warm-up", self.runner.warm_up),
            ("codec graphs", codec.capture_graphs),
            ("step model", lambda: self._start_admission(step_model)),
        ):
            t0 = time.perf_counter()
            run()
            self.start_timings[stage] = time.perf_counter() - t0
        logger.info(f"{self}: started ({', '.join(f'{k} {v:.1f} s' for k, v in self.start_timings.items())})")
        self._thread = threading.Thread(target=self._loop, name="orpheus-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_models(cls, llm, tokenizer, snac, device, config, *, enforce_eager: bool = False) -> OrpheusEngine:
        """An engine over loaded models (`loader.load_models`), captured and warmed up (blocking)."""
        codec = SnacCodec(snac, config.codec, device)
        engine = cls(llm, tokenizer, codec, config=config.engine, guard=config.guard, enforce_eager=enforce_eager)
        engine.warm_up()
        return engine

    def _start_admission(self, step_model: StepModel | None) -> None:
        self.admission = Admission(self.config, step_model or self.runner.measure_step_model())

    @property
    def codec(self) -> SnacCodec:
        """The codec the engine decodes with."""
        return self.feed.codec

    # -- requests ------------------------------------------------------------------------------

    def submit_prompts(
        self, prompts: list[list[int]], sampling: SamplingParams, budgets: list[int] | None = None
    ) -> AudioStream:
        """Speak `prompts` in order as one stream (call from the event loop that reads it); `EngineBusy` when full.

        `budgets`: each piece's most audio tokens by the guard's duration budget (None: none).
        """
        stream = AudioStream(f"orpheus-{next(self._ids)}", asyncio.get_running_loop(), self.cancel)
        self.enqueue(prompts, sampling, stream, budgets)
        return stream

    def enqueue(
        self, prompts: list[list[int]], sampling: SamplingParams, sink: AudioSink, budgets: list[int] | None = None
    ) -> None:
        """Speak `prompts` in order into `sink` (any thread; its id must be unique); `EngineBusy` when full."""
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
        request = Request(
            sink.request_id, prompts, sampling, seed, stream=sink, budgets=budgets, arrival_s=time.perf_counter()
        )
        with self._cond:
            if self._closed:
                raise EngineClosed("the Orpheus engine is closed")
            self.admission.check(self.scheduler.num_running + self.scheduler.num_waiting)  # EngineBusy past real time
            self.scheduler.admit(request)  # raises EngineBusy (or InvalidRequest for a prompt too long)
            self._requests[request.request_id] = request
            self.feed.open(request.request_id, seed, sink)
            self._cond.notify()

    def cancel(self, request_id: str) -> None:
        """Stop a request; its stream ends (RequestCancelled) and its slot is freed at the next step.

        A request still waiting for a slot is in no step: it leaves the queue now, so its place
        is free for the next caller at once.
        """
        with self._cond:
            request = self._requests.get(request_id)
            if request is not None and request.status is RequestStatus.WAITING:
                self._drop(request_id, notify=True)
                return
            self._cancels.append((request_id, True))
            self._cond.notify()

    @property
    def stats(self) -> EngineStats:
        """The counters since start, with the headroom of now."""
        self._stats.headroom = self.admission.headroom(self.scheduler.num_running + self.scheduler.num_waiting)
        return self._stats

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

    @property
    def healthy(self) -> bool:
        """Whether the step thread runs."""
        return self._thread.is_alive()

    @property
    def engine_stats(self) -> list[EngineStats]:
        """The counters, as a list: a `Backend` may hold several engines."""
        return [self.stats]

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
            self.feed.close()
        if self._switch_interval:
            _SwitchInterval.release()

    def warm_up(self) -> None:
        """Run two short requests end to end so the first caller pays no compile or allocation cost.

        The first runs with the full lookahead (no step measured yet), the second timed against deadlines.
        """
        prompt = fmt.build_prompt(self.tokenizer, _WARM_UP_TEXT, None)
        frames = 4 * fmt.FRAME_TOKENS  # enough for the codec's first windows; END_OF_SPEECH masked until then
        sampling = SamplingParams(max_tokens=frames, min_tokens=frames)
        for i in range(2):
            sink = _WarmUpSink(f"warm-up-{i}")
            self.enqueue([prompt], sampling, sink)
            sink.done.wait()

    # -- the step thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        if self.codec.device.type == "cuda":
            self.codec.warm_up()  # in this thread: a thread's first eager decode builds its cuDNN state (~1 s)
        in_flight: ScheduledStep | None = None
        while True:
            with self._cond:
                self._apply_cancels()
                while not (self._closed or self._requests or self._cancels or self.feed.busy or in_flight):
                    self._cond.wait()
                if self._closed:
                    return
                self._apply_cancels()
                step = self.scheduler.schedule(self._prefill_budget(in_flight))
            measured = step if self.runner.stream is None else in_flight  # the step whose work this call waits for
            t0 = time.perf_counter()
            try:
                in_flight = self._step(step, in_flight)
            except Exception as e:  # a failed step fails the requests it touched; the engine goes on
                self._fail([step, in_flight], e)
                in_flight = measured = None
            dt = time.perf_counter() - t0
            self._stats.steps += 1
            self._stats.busy_s += dt
            self.feed.record_step(dt)
            if measured is not None:
                self.admission.model.learn(len(measured.decode), measured.prefill_tokens, dt)
            if self.on_step is not None:
                self.on_step()

    def _prefill_budget(self, in_flight: ScheduledStep | None) -> int | None:
        """The next step's prefill under `engine.admission: slack`, from the playing streams' deadlines.

        None (the scheduler's fixed value) under `fixed`, or with no prompt to prefill. The caller holds the lock.
        """
        if self.admission.policy != "slack" or not self.scheduler.num_prefilling:
            return None
        streams = [
            (deadline, steps_to_frame(self._requests[request_id]))
            for request_id, deadline in self.feed.deadlines()
            if request_id in self._requests
        ]
        model, rows = self.admission.model, self.scheduler.num_running - self.scheduler.num_prefilling
        in_flight_s = model.step_s(len(in_flight.decode), in_flight.prefill_tokens) if in_flight else 0.0
        return self.admission.prefill_budget(time.perf_counter(), streams, rows, in_flight_s)

    def _step(self, step: ScheduledStep, in_flight: ScheduledStep | None) -> ScheduledStep | None:
        """One step: the GPU runs [step in flight] [SNAC] [step] back to back; returns the step now in flight."""
        self.feed.launch(self.runner.stream)  # SNAC for the windows the step in flight's predecessor completed
        if not step.empty:
            self.runner.launch(step)  # queued behind the step in flight
        if in_flight is not None:
            tokens, first = self.runner.collect()  # wait for the step in flight's tokens
            tokens, first = tokens.tolist(), first.tolist()
            if self.rewrite_tokens is not None:
                self.rewrite_tokens(in_flight, tokens, first)
            self._postprocess(in_flight, tokens, first)
        self._stats.codec_windows += self.feed.deliver()  # PCM to each request's stream, in order
        return None if step.empty else step

    def _postprocess(self, step: ScheduledStep, tokens: list[int], first: list[int]) -> None:
        """Apply a step's tokens: completed frames to the feed, finished requests out."""
        now = time.perf_counter()
        for chunk in step.prefill:
            if chunk.last and chunk.request.first_token_s is None:
                chunk.request.first_token_s = now
        with self._cond:
            out = self.scheduler.postprocess(step, tokens, first)
            for request, _ in out.frames:
                if request.first_frame_s is None:
                    request.first_frame_s = now
            for request in out.finished:
                self._requests.pop(request.request_id, None)
            frames = [(request.request_id, ids) for request, ids in out.frames]
            self.feed.push(frames, [(r.request_id, r.stop_reason) for r in out.finished], now)
        for _, reason in out.stopped:
            if reason == DURATION:
                self._stats.guard_duration += 1
            else:
                self._stats.guard_loop += 1
        for request in out.finished:
            if request.stop_reason in GUARD_REASONS:  # once per request, however many of its pieces it stopped
                seconds = request.num_generated_total / fmt.TOKENS_PER_SECOND
                logger.warning(f"{self}: guard stopped {request.request_id} ({request.stop_reason}) at {seconds:.1f} s")
        self._stats.decode_tokens += len(step.decode) + len(first)
        self._stats.prefill_tokens += step.prefill_tokens

    def _fail(self, steps: list[ScheduledStep | None], error: Exception) -> None:
        """End every request of `steps` and every request whose audio was in decode with `error`."""
        logger.opt(exception=error).error(f"{self}: step failed")
        self.runner.abandon()
        with self._cond:
            failed = set(self.feed.fail(error))
            for step in filter(None, steps):
                for request in [*step.decode, *(c.request for c in step.prefill)]:
                    if request.request_id not in failed:
                        failed.add(request.request_id)
                        request.stream.finish(error)
            for request_id in failed:
                self._drop(request_id, notify=False)

    def _apply_cancels(self) -> None:
        cancels, self._cancels = self._cancels, []
        for request_id, notify in cancels:
            self._drop(request_id, notify=notify)

    def _drop(self, request_id: str, *, notify: bool) -> None:
        """Remove a request everywhere (caller holds the lock); its stream ends unless `notify` is False."""
        self.scheduler.cancel(request_id)
        self.feed.cancel(request_id)
        request = self._requests.pop(request_id, None)
        if request is not None and notify:
            request.stream.finish(RequestCancelled(request_id))

    def __repr__(self) -> str:
        return f"OrpheusEngine(active={self.active_requests}, queued={self.queued_requests})"
