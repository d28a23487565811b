"""Per-request options (and, with the engine, per-request state)."""

from __future__ import annotations

from dataclasses import dataclass

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

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 5.0:
            raise ConfigError("temperature", f"{self.temperature} is out of range [0, 5]")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError("top_p", f"{self.top_p} is out of range (0, 1]")
        if not 1.0 <= self.repetition_penalty <= 5.0:
            raise ConfigError("repetition_penalty", f"{self.repetition_penalty} is out of range [1, 5]")
        if self.max_tokens < 7:
            raise ConfigError("max_tokens", f"{self.max_tokens} is below one 7-token frame")

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
