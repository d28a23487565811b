"""Per-request options (and, with the engine, per-request state)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from pipecat_orpheus.config import SamplingConfig
from pipecat_orpheus.errors import ConfigError


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request samples audio tokens; defaults come from `SamplingConfig`."""

    temperature: float = 0.6
    top_p: float = 0.8
    repetition_penalty: float = 1.1
    max_tokens: int = 2000
    seed: int | None = None
    min_tokens: int = 0  # END_OF_SPEECH is masked until this many audio tokens (benchmarks force full length)

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 5.0:
            raise ConfigError("temperature", f"{self.temperature} is out of range [0, 5]")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError("top_p", f"{self.top_p} is out of range (0, 1]")
        if not 1.0 <= self.repetition_penalty <= 5.0:
            raise ConfigError("repetition_penalty", f"{self.repetition_penalty} is out of range [1, 5]")
        if self.max_tokens < 7:
            raise ConfigError("max_tokens", f"{self.max_tokens} is below one 7-token frame")
        if self.min_tokens < 0:
            raise ConfigError("min_tokens", f"{self.min_tokens} is negative")

    @classmethod
    def from_config(cls, config: SamplingConfig, **overrides: object) -> SamplingParams:
        """The config's defaults, with the non-None `overrides` applied."""
        values = {
            "temperature": config.temperature,
            "top_p": config.top_p,
            "repetition_penalty": config.repetition_penalty,
            "max_tokens": config.max_tokens,
            "seed": config.seed,
        }
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

    @property
    def last_token(self) -> int:
        """The token fed to the next decode step (the last one sampled)."""
        return self.output_ids[self.piece][-1]
