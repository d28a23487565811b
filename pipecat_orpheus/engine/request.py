"""Per-request options (and, with the engine, per-request state)."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

from pipecat_orpheus.config import SamplingConfig, check_field
from pipecat_orpheus.errors import ConfigError, InvalidRequest

_DEFAULTS = SamplingConfig()
_CHECKED = tuple(f.name for f in dataclasses.fields(SamplingConfig))  # ranges: SamplingConfig's metadata


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request samples audio tokens: `SamplingConfig`'s fields, defaults and ranges, per request."""

    temperature: float = _DEFAULTS.temperature
    top_p: float = _DEFAULTS.top_p
    repetition_penalty: float = _DEFAULTS.repetition_penalty
    max_tokens: int = _DEFAULTS.max_tokens
    min_tokens: int = _DEFAULTS.min_tokens
    seed: int | None = _DEFAULTS.seed

    def __post_init__(self) -> None:
        for name in _CHECKED:
            try:
                check_field(SamplingConfig, name, getattr(self, name))
            except ConfigError as e:
                raise InvalidRequest(name, e.reason) from None

    @classmethod
    def from_config(cls, config: SamplingConfig, **overrides: object) -> SamplingParams:
        """The config's defaults, with the non-None `overrides` applied."""
        values = {name: getattr(config, name) for name in _CHECKED}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def greedy(self) -> bool:
        """Temperature 0 means argmax decoding."""
        return self.temperature == 0.0


class RequestStatus(enum.Enum):
    """Where a request is in its life: queued, prefilling, decoding, or done."""

    WAITING = "waiting"  # queued for a slot
    PREFILL = "prefill"  # holds a slot; the current piece's prompt is going into its KV cache
    DECODE = "decode"  # generating audio tokens, one per engine step
    FINISHED = "finished"  # every piece spoken
    CANCELLED = "cancelled"  # stopped by the caller; its slot is free


@dataclass(eq=False, slots=True)
class Request:
    """One `submit()`: its prompts (one per text piece, spoken as one utterance) and its progress.

    Mirrors nano-vllm's `Sequence`: the scheduler moves it between statuses, the runner reads
    its slot and counters, and the engine hands its frames to the codec and its `stream`.
    """

    request_id: str
    prompts: list[list[int]]  # token ids of each piece's prompt, in speaking order
    sampling: SamplingParams
    seed: int  # resolved seed: per-row sampling noise and SNAC noise derive from it
    stream: Any = None  # the caller's AudioStream (the engine's output queue)
    status: RequestStatus = RequestStatus.WAITING
    slot: int | None = None
    piece: int = 0  # index of the piece being generated
    num_prefilled: int = 0  # tokens of the current prompt scheduled into the KV cache
    num_generated: int = 0  # audio tokens generated (received) for the current piece
    num_scheduled: int = 0  # audio tokens of the current piece whose sampling has been launched (>= num_generated)
    epoch: int = 0  # pieces started: a decode row scheduled for an earlier piece is stale
    num_generated_total: int = 0  # audio tokens generated over every piece (the noise counter)
    max_new_tokens: int = 0  # this piece's cap, whole frames, set by the scheduler on joining a slot
    output_ids: list[list[int]] = field(default_factory=list)  # generated ids per piece (incl. END_OF_SPEECH)
    arrival_s: float = 0.0  # time.perf_counter() at submit; the two below stay None until they happen
    first_token_s: float | None = None  # first audio token sampled
    first_frame_s: float | None = None  # first 7-token frame handed to the codec

    @property
    def prompt(self) -> list[int]:
        """The current piece's prompt."""
        return self.prompts[self.piece]

    @property
    def num_prompt_tokens(self) -> int:
        """Length of the current piece's prompt."""
        return len(self.prompts[self.piece])

    @property
    def is_live(self) -> bool:
        """Holding a slot (prefilling or decoding)."""
        return self.status in (RequestStatus.PREFILL, RequestStatus.DECODE)

    @property
    def is_done(self) -> bool:
        """Finished or cancelled: nothing more will be generated."""
        return self.status in (RequestStatus.FINISHED, RequestStatus.CANCELLED)
