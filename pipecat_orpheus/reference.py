"""The simple, obviously correct synthesis path that the batched engine is tested against.

One request at a time on a worker thread: the prompts `speech.Speech` built -> token-by-token
decoding with the transformers model and a `DynamicCache` -> 7-token frames ->
`codec.CodecStream` windows -> PCM. Sampling uses transformers' own logits processors, in this
order for every step:

1. repetition penalty over the tokens this piece has generated so far (not the prompt);
2. the audio constraint: at frame position k only the 4096 tokens of position k are allowed,
   plus END_OF_SPEECH at frame boundaries (k == 0) (`allowed_tokens`);
3. greedy argmax when temperature == 0, else temperature, then top-p, then one multinomial draw
   from a `torch.Generator` seeded with `SamplingParams.seed`, over the allowed tokens only
   (the same distribution as over the masked vocabulary: masked tokens have probability 0).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from loguru import logger
from transformers import (
    DynamicCache,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from pipecat_orpheus import format as fmt
from pipecat_orpheus.codec import AudioSink, SnacCodec
from pipecat_orpheus.codec.stream import Window
from pipecat_orpheus.config import Config, EngineConfig, GuardConfig
from pipecat_orpheus.engine.guard import DURATION, LOOP, MAX_TOKENS, SPEECH_ENDED, LoopDetector, worse
from pipecat_orpheus.engine.request import SamplingParams
from pipecat_orpheus.engine.stream import AudioStream
from pipecat_orpheus.errors import EngineBusy, EngineClosed, RequestCancelled


def allowed_tokens(position: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Ascending ids (C,) allowed at frame position `position`: its 4096 audio tokens, END_OF_SPEECH if 0."""
    start, end = fmt.allowed_token_range(position)
    ids = torch.arange(start, end, device=device)  # (4096,)
    if position == 0:  # speech may only end between frames; END_OF_SPEECH < every audio id
        ids = torch.cat([torch.tensor([fmt.END_OF_SPEECH], device=device), ids])  # (4097,)
    return ids


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator on `device` seeded with `seed` (None: a fresh random seed)."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def generate_tokens(
    model: Any,
    prompt_ids: list[int],
    sampling: SamplingParams,
    *,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Yield the audio tokens the model generates for `prompt_ids`, one per decoding step.

    Stops after END_OF_SPEECH (not yielded) or `sampling.max_tokens` steps. Every yielded token
    is an audio token of the right frame position. The caller may stop iterating at any time
    (cancellation); the KV cache is then dropped.
    """
    device = next(model.parameters()).device
    generator = generator if generator is not None else make_generator(sampling.seed, device)
    penalty = LogitsProcessorList()
    if sampling.repetition_penalty != 1.0:
        penalty.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty))
    warpers = LogitsProcessorList()
    if not sampling.greedy:
        warpers += [TemperatureLogitsWarper(sampling.temperature), TopPLogitsWarper(sampling.top_p)]
    candidates = [allowed_tokens(k, device) for k in range(fmt.FRAME_TOKENS)]  # 7 x (C,), ascending ids
    cache = DynamicCache(config=model.config)
    generated = torch.zeros((1, 0), dtype=torch.long, device=device)  # (1, G): this piece's tokens
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, P)
    for step in range(sampling.max_tokens):
        with torch.inference_mode():
            logits = model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1).logits  # (1, 1, V)
            scores = penalty(generated, logits[:, -1, :].float())  # (1, V)
            # The audio constraint: only this position's tokens stay candidates. Warping and sampling
            # over them alone is the same distribution as over the -inf-masked vocabulary.
            allowed = candidates[step % fmt.FRAME_TOKENS]  # (C,)
            scores = scores[:, allowed]  # (1, C)
            if sampling.greedy:
                index = scores.argmax(dim=-1, keepdim=True)  # (1, 1); ties -> lowest id, as over the full vocab
            else:
                probs = torch.softmax(warpers(generated, scores), dim=-1)  # (1, C)
                index = torch.multinomial(probs, 1, generator=generator)  # (1, 1)
            token = allowed[index]  # (1, 1)
        token_id = int(token)
        if token_id == fmt.END_OF_SPEECH:
            return
        yield token_id
        generated = torch.cat([generated, token], dim=1)  # (1, G + 1)
        input_ids = token  # (1, 1)


@dataclass(eq=False)
class _Request:
    id: str
    prompts: list[list[int]]
    sampling: SamplingParams
    stream: AudioSink
    budgets: list[int] | None = None


class ReferenceSynthesizer:
    """A `speech.Backend` that runs one request at a time through `generate_tokens` and the codec.

    Requests wait in a bounded queue (`engine.max_queue`); past it `submit` raises `EngineBusy`.
    Cancelling a stream stops its generation at the next token. The integrity guard stops a piece
    as the engine's does (`engine.guard`), so both give the same audio and the same stop reason.

    Args:
        llm: a loaded Orpheus `LlamaForCausalLM` (eval mode).
        tokenizer: its tokenizer.
        codec: a `SnacCodec` on the same device.
        config: the `engine` section (`max_queue` is used).
        guard: the `guard` section (loop detection; duration budgets come with each request); None: its defaults.
    """

    def __init__(
        self, llm: Any, tokenizer: Any, codec: SnacCodec, *, config: EngineConfig, guard: GuardConfig | None = None
    ):
        self.llm = llm
        self.tokenizer = tokenizer
        self.codec = codec
        self.config = config
        guard = guard if guard is not None else GuardConfig()
        self._loops = LoopDetector(1, guard) if guard.loop_frames else None  # one request at a time: one slot
        self._ids = itertools.count()
        self._queue: deque[_Request] = deque()
        self._active: _Request | None = None
        self._cond = threading.Condition()
        self._closed = False
        self.on_step: Callable[[], None] | None = None  # called on the worker after each delivery of audio
        self._worker = threading.Thread(target=self._run, name="orpheus-reference", daemon=True)
        self._worker.start()

    @classmethod
    def from_models(cls, llm, tokenizer, snac, device, config: Config) -> ReferenceSynthesizer:
        """A reference path over loaded models (`loader.load_models`), its worker started."""
        return cls(llm, tokenizer, SnacCodec(snac, config.codec, device), config=config.engine, guard=config.guard)

    # -- Backend -----------------------------------------------------------------------------

    def submit_prompts(
        self, prompts: list[list[int]], sampling: SamplingParams, budgets: list[int] | None = None
    ) -> AudioStream:
        """Queue `prompts` for speech; call from the event loop that will read the returned stream."""
        stream = AudioStream(f"ref-{next(self._ids)}", asyncio.get_running_loop(), self.cancel)
        self.enqueue(prompts, sampling, stream, budgets)
        return stream

    def enqueue(
        self, prompts: list[list[int]], sampling: SamplingParams, sink: AudioSink, budgets: list[int] | None = None
    ) -> None:
        """Queue `prompts` for speech into `sink` (any thread); `EngineBusy` when the queue is full."""
        request = _Request(sink.request_id, prompts, sampling, sink, budgets)
        with self._cond:
            if self._closed:
                raise EngineClosed("the Orpheus reference path is closed")
            waiting = len(self._queue) - (self._active is None)  # the head of the queue is about to run
            if waiting >= self.config.max_queue:
                raise EngineBusy(f"one request is generating and {waiting} are queued (engine.max_queue)")
            self._queue.append(request)
            self._cond.notify()

    @property
    def active_requests(self) -> int:
        """1 while a request is generating, else 0."""
        return int(self._active is not None)

    @property
    def queued_requests(self) -> int:
        """Requests waiting for the worker."""
        return len(self._queue)

    @property
    def closed(self) -> bool:
        """Whether `close()` has been called."""
        return self._closed

    @property
    def healthy(self) -> bool:
        """Whether the worker thread runs."""
        return self._worker.is_alive()

    @property
    def engine_stats(self) -> list:
        """None (an empty list): the reference path keeps no engine counters."""
        return []

    def close(self) -> None:
        """Cancel everything queued or running and stop the worker thread."""
        with self._cond:
            self._closed = True
            queued = list(self._queue)
            self._queue.clear()
            self._cond.notify()
        for request in queued:
            request.stream.finish(RequestCancelled(request.id))
        self._worker.join()

    # -- worker ----------------------------------------------------------------------------

    def cancel(self, request_id: str) -> None:
        """Drop a queued request (a running one stops at its next token: its sink says it is cancelled)."""
        with self._cond:
            for request in [r for r in self._queue if r.id == request_id]:
                self._queue.remove(request)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                self._active = self._queue.popleft()
            request = self._active
            try:
                reason = self._synthesize(request)
                request.stream.finish(RequestCancelled(request.id) if self._closed else None, reason)
            except Exception as e:  # the caller gets the error through its stream; the worker goes on
                logger.exception(f"{self}: request {request.id} failed")
                request.stream.finish(e)
            finally:
                with self._cond:
                    self._active = None
                self._stepped()

    def _synthesize(self, request: _Request) -> str | None:
        """Speak every piece of the request into one codec stream: one continuous utterance; why it ended."""

        def stopped() -> bool:
            return request.stream.cancelled or self._closed

        device = next(self.llm.parameters()).device
        generator = make_generator(request.sampling.seed, device)
        codec_stream = self.codec.open_stream(request.sampling.seed)
        reason = SPEECH_ENDED
        for i, prompt in enumerate(request.prompts):
            sampling, capped = request.sampling, False
            budget = None if request.budgets is None else max(request.budgets[i], sampling.min_tokens)
            if budget is not None and budget < sampling.max_tokens:
                sampling, capped = dataclasses.replace(sampling, max_tokens=budget), True
            if self._loops is not None:
                self._loops.reset(0)
            cap = sampling.max_tokens - sampling.max_tokens % fmt.FRAME_TOKENS  # the audio it may have: whole frames
            frame: list[int] = []
            piece_reason, count = None, 0
            for token in generate_tokens(self.llm, prompt, sampling, generator=generator):
                if stopped():
                    return None
                frame.append(token)
                count += 1
                if len(frame) == fmt.FRAME_TOKENS:
                    self._emit(request, codec_stream.push(fmt.frame_codes(frame)[0]))
                    if self._loops is not None and count < cap and self._loops.check([0], [frame])[0]:
                        piece_reason = LOOP
                        break
                    frame = []
            if stopped():
                return None
            if piece_reason is None:
                piece_reason = SPEECH_ENDED if count < cap else DURATION if capped else MAX_TOKENS
            reason = worse(reason, piece_reason)
        self._emit(request, codec_stream.finish())
        return reason

    def _emit(self, request: _Request, windows: list[Window]) -> None:
        if windows:
            for pcm in self.codec.decode(windows):
                request.stream.put(pcm)
            self._stepped()

    def _stepped(self) -> None:
        if self.on_step is not None:
            self.on_step()

    def __repr__(self) -> str:
        return f"ReferenceSynthesizer(active={self.active_requests}, queued={self.queued_requests})"
