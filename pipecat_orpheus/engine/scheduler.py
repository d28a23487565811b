"""Slots, the bounded wait queue, and what each engine step runs. Pure Python: no torch here.

A request joins a free slot at once or waits in a FIFO queue of at most `max_queue`; past that,
`admit` raises `EngineBusy`. Each step decodes every request in DECODE and prefills at most
`prefill_chunk_tokens` prompt tokens of those in PREFILL (one chunk per request, oldest first),
and at most `prefill_tokens_while_decoding` of them when the step also decodes: those share
the live rows' forward (one read of the weights), so joining requests barely slow live ones.
The engine may give a step that decodes a larger budget (`admission`: what the live streams'
playback slack allows).
A finished or cancelled request leaves its slot at once and the oldest waiting request takes it.

Scheduling runs one step ahead of the results: `schedule()` may be called again before the
last step's `postprocess()`, as the engine does to keep the GPU busy while the host handles
tokens. A request goes to DECODE when its last prompt chunk is scheduled, and each decode row
reads the token its previous step sampled on the GPU. A row scheduled past the end of its piece
(it sampled END_OF_SPEECH in the step before) is stale: `postprocess` drops its token.

The integrity guard (`guard`) ends a piece the same way: at its duration budget (a lower
`max_new_tokens`, so nothing is scheduled past it) or when `postprocess` finds its frames looping.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from pipecat_orpheus.errors import EngineBusy, InvalidRequest
from pipecat_orpheus.format import END_OF_SPEECH, FRAME_TOKENS

from .guard import DURATION, GUARD_REASONS, LOOP, MAX_TOKENS, SPEECH_ENDED, LoopDetector, worse
from .request import Request, RequestStatus


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    """Prompt positions [start, end) of `request`'s current piece, prefilled in one step."""

    request: Request
    start: int
    end: int

    @property
    def last(self) -> bool:
        """Whether this chunk completes the prompt (its last logits give the first audio token)."""
        return self.end == self.request.num_prompt_tokens


@dataclass(slots=True)
class ScheduledStep:
    """What one engine step runs: a decode batch (by slot) and prefill chunks.

    `generated[i]` is the number of audio tokens of decode row i's piece before the one this step
    samples (its input token is the last of them); `epochs[i]` the piece it was scheduled for.
    """

    decode: list[Request]
    prefill: list[PrefillChunk]
    generated: list[int] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """Nothing to run."""
        return not self.decode and not self.prefill

    @property
    def prefill_tokens(self) -> int:
        """Prompt tokens this step prefills."""
        return sum(c.end - c.start for c in self.prefill)


@dataclass(slots=True)
class StepOutput:
    """What a step produced: completed 7-token frames (in order), requests that finished, pieces the guard stopped."""

    frames: list[tuple[Request, list[int]]] = field(default_factory=list)
    finished: list[Request] = field(default_factory=list)
    stopped: list[tuple[Request, str]] = field(default_factory=list)  # (request, guard reason), one per piece


class Scheduler:
    """The slot pool and wait queue of one engine; single-threaded (the engine holds a lock).

    Args:
        max_slots: requests decoded together (one KV-cache slot each).
        max_queue: requests that may wait for a slot; beyond it `admit` raises `EngineBusy`.
        max_tokens_per_slot: KV-cache positions per slot (prompt + audio tokens).
        prefill_chunk_tokens: prompt tokens prefilled per step over all joining requests.
        prefill_tokens_while_decoding: the same, in a step that also decodes (None: no lower cap).
        loops: the guard's loop detector over the slots (None: no loop detection).
    """

    def __init__(
        self,
        *,
        max_slots: int,
        max_queue: int,
        max_tokens_per_slot: int,
        prefill_chunk_tokens: int,
        prefill_tokens_while_decoding: int | None = None,
        loops: LoopDetector | None = None,
    ):
        self.max_slots = max_slots
        self.max_queue = max_queue
        self.max_tokens_per_slot = max_tokens_per_slot
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.prefill_tokens_while_decoding = min(
            prefill_tokens_while_decoding or prefill_chunk_tokens, prefill_chunk_tokens
        )
        self._free = list(range(max_slots))  # a heap: the lowest free slot first keeps batches compact
        self._slots: list[Request | None] = [None] * max_slots
        self._waiting: deque[Request] = deque()
        self._prefilling: deque[Request] = deque()  # PREFILL requests, oldest first
        self._requests: dict[str, Request] = {}  # every waiting or live request by id
        self.loops = loops

    # -- admission ---------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        """Requests holding a slot."""
        return self.max_slots - len(self._free)

    @property
    def num_waiting(self) -> int:
        """Requests queued for a slot."""
        return len(self._waiting)

    @property
    def num_prefilling(self) -> int:
        """Requests holding a slot whose prompt is not fully scheduled yet."""
        return len(self._prefilling)

    def can_admit(self) -> bool:
        """Whether `admit` would accept a request now (a free slot or room in the queue)."""
        return bool(self._free) or len(self._waiting) < self.max_queue

    def admit(self, request: Request) -> None:
        """Give `request` a free slot, or queue it; `EngineBusy` when neither is possible."""
        for prompt in request.prompts:
            if self.max_tokens_per_slot - len(prompt) < FRAME_TOKENS:
                raise InvalidRequest(
                    "text",
                    f"a prompt of {len(prompt)} tokens leaves no room for audio in a slot of "
                    f"{self.max_tokens_per_slot} positions (engine.max_tokens_per_slot; raise it or lower "
                    "engine.max_chars_per_piece)",
                )
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if not self.can_admit():
            raise EngineBusy(
                f"all {self.max_slots} slots are busy and {self.max_queue} requests are waiting "
                "(engine.max_slots, engine.max_queue)"
            )
        self._requests[request.request_id] = request
        if self._free:
            self._join(request, heapq.heappop(self._free))
        else:
            request.status = RequestStatus.WAITING
            self._waiting.append(request)

    def cancel(self, request_id: str) -> Request | None:
        """Drop a waiting or live request and free its slot; None if it is unknown or done."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return None
        if request.status is RequestStatus.WAITING:
            self._waiting.remove(request)
        else:
            if request.status is RequestStatus.PREFILL:
                self._prefilling.remove(request)
            self._release(request)
        request.status = RequestStatus.CANCELLED
        return request

    # -- one step --------------------------------------------------------------------------

    def schedule(self, prefill_budget: int | None = None) -> ScheduledStep:
        """The decode batch (every DECODE request with tokens left, by slot) and this step's prefill chunks.

        `prefill_budget` replaces `prefill_tokens_while_decoding` in a step that decodes (at most
        `prefill_chunk_tokens`).
        """
        step = ScheduledStep([], [])
        for r in self._slots:
            if r is not None and r.status is RequestStatus.DECODE and r.num_scheduled < r.max_new_tokens:
                step.decode.append(r)
                step.generated.append(r.num_scheduled)
                step.epochs.append(r.epoch)
                r.num_scheduled += 1
        budget = self.prefill_chunk_tokens
        if step.decode:
            budget = min(prefill_budget or self.prefill_tokens_while_decoding, budget)
        for request in self._prefilling:
            if budget == 0:
                break
            n = min(request.num_prompt_tokens - request.num_prefilled, budget)
            step.prefill.append(PrefillChunk(request, request.num_prefilled, request.num_prefilled + n))
            request.num_prefilled += n
            budget -= n
        for chunk in step.prefill:
            if chunk.last:  # its first audio token is sampled by this step: it decodes from the next one
                self._prefilling.remove(chunk.request)
                chunk.request.status = RequestStatus.DECODE
                chunk.request.num_scheduled = 1
        return step

    def postprocess(
        self, step: ScheduledStep, decode_tokens: Sequence[int], prefill_tokens: Sequence[int]
    ) -> StepOutput:
        """Apply a step's sampled tokens: one per decode row, one per prefill chunk that was `last`.

        Tokens of requests cancelled since, and of stale rows (their piece ended), are dropped.
        """
        out = StepOutput()
        first_tokens = iter(prefill_tokens)
        for chunk in step.prefill:
            if chunk.last:
                token = next(first_tokens)
                if chunk.request.status is RequestStatus.DECODE:
                    self._append(chunk.request, token, out)
        for request, token, epoch in zip(step.decode, decode_tokens, step.epochs, strict=True):
            if request.status is RequestStatus.DECODE and request.epoch == epoch:
                self._append(request, token, out)
        if self.loops is not None and out.frames:
            self._check_loops(out)
        return out

    # -- internals -------------------------------------------------------------------------

    def _join(self, request: Request, slot: int) -> None:
        request.slot = slot
        self._slots[slot] = request
        self._start_piece(request)

    def _start_piece(self, request: Request) -> None:
        request.status = RequestStatus.PREFILL
        request.epoch += 1
        request.num_prefilled = 0
        request.num_generated = 0
        request.num_scheduled = 0
        request.output_ids.append([])
        room = min(request.sampling.max_tokens, self.max_tokens_per_slot - request.num_prompt_tokens)
        budget = room if request.budgets is None else max(request.budgets[request.piece], request.sampling.min_tokens)
        request.budget_capped = budget < room
        cap = min(budget, room)
        request.max_new_tokens = cap - cap % FRAME_TOKENS  # whole frames: SNAC never sees a partial one
        if self.loops is not None:
            self.loops.reset(request.slot)
        self._prefilling.append(request)

    def _append(self, request: Request, token: int, out: StepOutput) -> None:
        ids = request.output_ids[-1]
        ids.append(token)
        if token != END_OF_SPEECH:
            request.num_generated += 1
            request.num_generated_total += 1
            if request.num_generated % FRAME_TOKENS == 0:
                out.frames.append((request, ids[-FRAME_TOKENS:]))
        if token == END_OF_SPEECH:
            self._end_piece(request, SPEECH_ENDED, out)
        elif request.num_generated >= request.max_new_tokens:
            self._end_piece(request, DURATION if request.budget_capped else MAX_TOKENS, out)

    def _end_piece(self, request: Request, reason: str, out: StepOutput) -> None:
        """The current piece is over (`reason`): the next one starts, or the request finishes."""
        request.stop_reason = worse(request.stop_reason, reason)
        if reason in GUARD_REASONS:
            out.stopped.append((request, reason))
        if request.piece + 1 < len(request.prompts):
            request.piece += 1
            self._start_piece(request)
        else:
            self._requests.pop(request.request_id, None)
            self._release(request)
            request.status = RequestStatus.FINISHED
            out.finished.append(request)

    def _check_loops(self, out: StepOutput) -> None:
        """End the pieces whose newest frame (one per request per step) completes a loop."""
        live = [(r, ids) for r, ids in out.frames if r.status is RequestStatus.DECODE]  # its piece goes on
        if not live:
            return
        looping = self.loops.check([r.slot for r, _ in live], [ids for _, ids in live])
        for (request, _), fired in zip(live, looping.tolist(), strict=True):
            if fired:
                self._end_piece(request, LOOP, out)

    def _release(self, request: Request) -> None:
        slot = request.slot
        assert slot is not None and self._slots[slot] is request
        self._slots[slot] = None
        request.slot = None
        if self._waiting:
            self._join(self._waiting.popleft(), slot)
        else:
            heapq.heappush(self._free, slot)
