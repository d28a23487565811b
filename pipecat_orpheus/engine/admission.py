"""How much prompt an engine step may prefill, and how many more streams the engine can take.

Live streams run ahead of real time and so hold playback slack: the audio handed out minus the
audio played since playback started (at the stream's first frame). A stream's next frame is
handed out when the step that completes it has run (one audio token per step), and reaches the
listener one step later (its SNAC decode queues behind the next step). So the step sized now may
take as long as every playing stream's deadline allows once the step in flight, the floor steps
that still complete its next frame and a safety margin are taken off. `StepModel` predicts a
step's seconds; from it `Admission.prefill_budget` sizes each step's prefill (never below
`engine.prefill_tokens_while_decoding`, in the padded sizes the runner has graphs for) and
`Admission.capacity` counts the streams the engine can decode together and stay real time, which
`check` turns into an early `EngineBusy`. Pure Python: no torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from pipecat_orpheus.config import EngineConfig
from pipecat_orpheus.errors import EngineBusy
from pipecat_orpheus.format import FRAME_TOKENS, TOKENS_PER_SECOND

from .request import Request, RequestStatus

PREFILL_PAD = 16  # prefill tokens are padded to a multiple of this: few distinct shapes, each with its graph
LEARNING_RATE = 0.05  # share of a step's prediction error the model takes in (~ the last 20 steps dominate)
ROWS_PER_BUCKET = 16  # decode rows that share one learned residual (the runner's batch buckets are as coarse)
REALTIME_STEP_S = 1.0 / TOKENS_PER_SECOND  # every live stream gets one token per step: 12.2 ms is real time


@dataclass(slots=True)
class StepModel:
    """Seconds of one engine step: what the GPU costs, plus what the steps themselves show beyond it.

    The GPU part is measured at warm-up (`ModelRunner.measure_step_model`): `fixed_s` per
    forward, `row_s` per decode row, `token_s` per prompt token; a step's prompt tokens share
    the decode rows' forward up to `mixed_tokens`, beyond that the runner replays the decode
    graph and a prefill graph, one more read of the weights. What the start cannot see (the
    codec's windows, the host's work, the KV read growing with the streams' context) is learned
    from every one-forward step the engine runs (`learn`), as a residual per `ROWS_PER_BUCKET`
    decode rows. Per batch size, not as a slope: one batch size cannot tell a fixed overhead
    from a per-row one, and reading a few streams' overhead as per-row cost would refuse streams
    at a fraction of the real capacity. A batch size not yet seen takes the residual of the
    nearest one seen, so the estimate past the largest batch run so far is the optimistic one,
    corrected as the steps get there.
    """

    fixed_s: float
    row_s: float
    token_s: float
    mixed_tokens: int
    rate: float = LEARNING_RATE  # 0: a fixed model (tests)
    # per bucket of rows; None: not seen yet. Not an argument: `dataclasses.replace` must not share it
    residual_s: list[float | None] = field(default_factory=list, init=False, repr=False)

    def _features(self, rows: int, tokens: int) -> tuple[int, int, int]:
        padded = -(-tokens // PREFILL_PAD) * PREFILL_PAD
        forwards = 1 + (rows > 0 and padded > self.mixed_tokens) if rows or padded else 0
        return forwards, rows, padded

    def gpu_s(self, rows: int, tokens: int = 0) -> float:
        """The GPU's seconds for `rows` decode rows and `tokens` prompt tokens (padded as the runner pads)."""
        f, r, t = self._features(rows, tokens)
        return f * self.fixed_s + r * self.row_s + t * self.token_s

    def residual(self, rows: int) -> float:
        """The learned seconds beyond the GPU's at `rows` decode rows: the nearest batch size seen's (0: none)."""
        seen, b = self.residual_s, rows // ROWS_PER_BUCKET
        for d in range(len(seen) + b + 1):
            for i in (b - d, b + d):
                if 0 <= i < len(seen) and seen[i] is not None:
                    return seen[i]
        return 0.0

    def step_s(self, rows: int, tokens: int = 0) -> float:
        """Predicted seconds of a step of `rows` decode rows and `tokens` prompt tokens."""
        if not rows and not tokens:
            return 0.0
        return max(0.0, self.gpu_s(rows, tokens) + self.residual(rows))

    def learn(self, rows: int, tokens: int, seconds: float) -> None:
        """Move the residual at this batch size `rate` of the way to what `seconds` shows.

        Only one-forward steps teach: a step with a second forward is a prefill, priced by the
        start's measurement of the GPU alone. The correction is bounded by the prediction, so
        one stall (a garbage collection) moves the model by at most `rate` times it.
        """
        if self._features(rows, tokens)[0] != 1:
            return
        predicted = self.step_s(rows, tokens)
        error = max(-predicted, min(predicted, seconds - predicted))
        b = rows // ROWS_PER_BUCKET
        if b >= len(self.residual_s):
            self.residual_s.extend([None] * (b + 1 - len(self.residual_s)))
        self.residual_s[b] = self.residual(rows) + self.rate * error

    def capacity(self, speed: float, limit: int) -> int:
        """Decode rows, at most `limit`, whose step still gives every stream `speed` times real time (0: not one)."""
        target = REALTIME_STEP_S / speed
        for lo in range(0, limit + 1, ROWS_PER_BUCKET):  # one bucket at a time: its residual is one number
            hi = min(lo + ROWS_PER_BUCKET - 1, limit)
            spare = target - self.fixed_s - self.residual(lo)
            if spare < self.row_s * max(lo, 1) or spare < 0:  # not even the bucket's smallest batch fits
                return max(lo - 1, 0)
            fits = math.floor(spare / self.row_s) if self.row_s > 0 else hi
            if fits < hi:
                return fits
        return limit


def steps_to_frame(request: Request) -> int:
    """Steps after the one in flight until `request` completes its next frame (a full frame if it is not decoding)."""
    return (-request.num_scheduled) % FRAME_TOKENS if request.status is RequestStatus.DECODE else FRAME_TOKENS


class Admission:
    """The `engine.admission` policy: each step's prefill budget, and the real-time capacity behind `busy`.

    Args:
        config: the `engine` section (policy, margin, prefill sizes, slots, `busy_below_speed`).
        model: the step-time model (measured at start, then learned from every step).
    """

    def __init__(self, config: EngineConfig, model: StepModel):
        self.policy = config.admission
        self.margin_s = config.admission_margin_ms / 1e3
        self.floor = config.prefill_tokens_while_decoding
        self.cap = config.prefill_chunk_tokens
        self.max_slots = config.max_slots
        self.speed = config.busy_below_speed
        self.model = model

    def prefill_budget(self, now: float, streams: Iterable[tuple[float, int]], rows: int, in_flight_s: float) -> int:
        """The `slack` policy: prompt tokens the next step may prefill beside `rows` decode rows.

        `streams` holds (playback deadline of its next frame not yet handed out, `steps_to_frame`)
        per playing stream; `in_flight_s` is the predicted time of the step in flight. With no
        playing stream the budget is the whole chunk.
        """
        floor_step = self.model.step_s(rows, self.floor)
        slack = min((deadline - now - steps * floor_step for deadline, steps in streams), default=None)
        if slack is None:
            return self.cap
        allowed = slack - in_flight_s - self.margin_s
        for tokens in range(self.cap // PREFILL_PAD * PREFILL_PAD, self.floor, -PREFILL_PAD):
            if self.model.step_s(rows, tokens) <= allowed:
                return tokens
        return self.floor

    def capacity(self) -> int:
        """Streams decoded together at `busy_below_speed` (1x when off), within the slots."""
        return self.model.capacity(self.speed or 1.0, self.max_slots)

    def headroom(self, admitted: int) -> int:
        """Streams the engine can admit now beyond the `admitted` ones (live or waiting) and stay real time."""
        return max(0, self.capacity() - admitted)

    def check(self, admitted: int) -> None:
        """`EngineBusy` when one more stream would take every live one below `busy_below_speed` times real time.

        One stream is always admitted (it runs as fast as the engine can), and a request that would
        only wait for a slot does not slow anyone: that is `engine.max_queue`'s to bound.
        """
        if not self.speed or admitted == 0:
            return
        capacity = self.model.capacity(self.speed, self.max_slots)
        if capacity < self.max_slots and admitted >= max(capacity, 1):
            raise EngineBusy(
                f"the engine is at its real-time capacity: {admitted} streams, and one more would run every "
                f"stream below {self.speed:g}x real time (engine.busy_below_speed); try again shortly or add an engine"
            )
