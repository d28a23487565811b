"""`EngineCores`: one engine core per device (`engine.devices`) as one `Backend`.

Each new utterance goes to the healthy core with the most room: the fewest requests held, as
its beats count them or, if more, as this process has them in flight (exact for one server or
bot; every core has the same slots).
A request lives on the core it was sent to, so a core that dies fails only its own requests,
restarts on its own (each `EngineClient` owns its core), and the others keep serving.
`healthy` holds only while every core beats: /healthz answers 503 while one is down.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pipecat_orpheus.config import Config
from pipecat_orpheus.core import messages
from pipecat_orpheus.core.client import EngineClient
from pipecat_orpheus.engine.engine import EngineStats
from pipecat_orpheus.engine.request import SamplingParams
from pipecat_orpheus.engine.stream import AudioStream


def core_configs(config: Config) -> list[Config]:
    """One configuration per engine core: `config` with `model.device` set to each of `engine.devices`."""
    devices = config.engine.devices or (config.model.device,)
    return [dataclasses.replace(config, model=dataclasses.replace(config.model, device=d)) for d in devices]


class EngineCores:
    """Several engine cores as one `Backend`; see the module docstring."""

    def __init__(self, cores: list[EngineClient]):
        self.cores = cores
        self.tokenizer = cores[0].tokenizer  # one model on every device

    @classmethod
    def start(cls, config: Config) -> EngineCores:
        """Start a core per device, loading side by side, and wait until all serve (blocking)."""
        return cls(EngineClient.start_all(core_configs(config)))

    @classmethod
    def attach(cls, config: Config, directories: list[Path]) -> EngineCores:
        """Join the cores another process started (the workers of `serve --workers`), in device order."""
        configs = core_configs(config)
        if len(directories) != len(configs):
            raise ValueError(f"{len(directories)} core directories for {len(configs)} devices")
        return cls([EngineClient.attach(c, messages.Addresses(d)) for c, d in zip(configs, directories, strict=True)])

    @property
    def directories(self) -> list[Path]:
        """Each core's directory (its sockets and configuration), in device order."""
        return [core.addresses.directory for core in self.cores]

    def submit_prompts(self, prompts: list[list[int]], sampling: SamplingParams) -> AudioStream:
        """Speak `prompts` on the healthy core with the most room (with none, the first says why it cannot)."""
        up = [core for core in self.cores if core.healthy]
        return min(up, key=lambda core: core.load, default=self.cores[0]).submit_prompts(prompts, sampling)

    @property
    def active_requests(self) -> int:
        """Requests holding a slot on any core."""
        return sum(core.active_requests for core in self.cores)

    @property
    def queued_requests(self) -> int:
        """Requests waiting for a slot on any core."""
        return sum(core.queued_requests for core in self.cores)

    @property
    def closed(self) -> bool:
        """Whether `close()` has been called."""
        return self.cores[0].closed

    @property
    def healthy(self) -> bool:
        """Whether every core beats and serves."""
        return all(core.healthy for core in self.cores)

    @property
    def engine_stats(self) -> list[EngineStats]:
        """Each core's engine counters, in device order."""
        return [stats for core in self.cores for stats in core.engine_stats]

    def close(self) -> None:
        """Stop every core; requests in flight end cancelled."""
        for core in self.cores:
            core.close()

    def __repr__(self) -> str:
        return f"EngineCores({', '.join(map(repr, self.cores))})"
