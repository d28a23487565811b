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
from dataclasses import dataclass

from pipecat_orpheus.config import EngineConfig
from pipecat_orpheus.errors import EngineBusy
from pipecat_orpheus.format import FRAME_TOKENS, TOKENS_PER_SECOND

from .request import Request, RequestStatus

PREFILL_PAD = 16  # prefill tokens are padded to a multiple of this: few distinct shapes, each with its graph
LEARNING_RATE = 0.05  # share of a step's prediction error the model takes in (~ the last 20 steps dominate)
REALTIME_STEP_S = 1.0 / TOKENS_PER_SECOND  # every live stream gets one token per step: 12.2 ms is real time


@dataclass(slots=True)
class StepModel:
    """Seconds of one engine step: `fixed_s` per forward + `row_s` per decode row + `token_s` per prompt token.

    A step's prompt tokens share the decode rows' forward up to `mixed_tokens`; beyond that the
    runner replays the decode graph and a prefill graph, one more read of the weights. The engine
    measures the model at warm-up (`ModelRunner.measure_step_model`) and corrects it after every
    step it runs (`learn`): the per-row cost grows with the streams' KV context and includes the
    codec's windows and the host's work, which only the steps themselves can tell.
    """

    fixed_s: float
    row_s: float
    token_s: float
    mixed_tokens: int
    rate: float = LEARNING_RATE  # 0: a fixed model (tests)

    def _features(self, rows: int, tokens: int) -> tuple[float, float, float]:
        padded = -(-tokens // PREFILL_PAD) * PREFILL_PAD
        forwards = 1 + (rows > 0 and padded > self.mixed_tokens) if rows or padded else 0
        return forwards, rows, padded

    def step_s(self, rows: int, tokens: int = 0) -> float:
        """Predicted seconds of a step of `rows` decode rows and `tokens` prompt tokens (padded as the runner pads)."""
        f, r, t = self._features(rows, tokens)
        return f * self.fixed_s + r * self.row_s + t * self.token_s

    def learn(self, rows: int, tokens: int, seconds: float) -> None:
        """Move the prediction for this step `rate` of the way to `seconds` (normalized LMS).

        The correction goes mostly to the feature that dominates the step (the rows of a decode
        step, the tokens of a prefill), and is bounded by the prediction, so one stall (a garbage
        collection) moves the model by at most `rate` times it.
        """
        x = self._features(rows, tokens)
        predicted = self.step_s(rows, tokens)
        error = max(-predicted, min(predicted, seconds - predicted)) if predicted > 0 else seconds
        k = self.rate * error / (x[0] ** 2 + x[1] ** 2 + x[2] ** 2 or 1.0)
        self.fixed_s = max(0.0, self.fixed_s + k * x[0])
        self.row_s = max(0.0, self.row_s + k * x[1])
        self.token_s = max(0.0, self.token_s + k * x[2])

    def capacity(self, speed: float) -> int:
        """Decode rows whose step still gives every stream `speed` times real time (0 if not even one)."""
        step = REALTIME_STEP_S / speed - self.fixed_s
        if step < self.row_s:
            return 0
        return math.floor(step / self.row_s) if self.row_s > 0 else 1 << 30


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
        return min(self.model.capacity(self.speed or 1.0), self.max_slots)

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
        capacity = self.model.capacity(self.speed)
        if capacity < self.max_slots and admitted >= max(capacity, 1):
            raise EngineBusy(
                f"the engine is at its real-time capacity: {admitted} streams, and one more would run every "
                f"stream below {self.speed:g}x real time (engine.busy_below_speed); try again shortly or add an engine"
            )
