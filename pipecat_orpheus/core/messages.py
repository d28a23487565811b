"""What engine clients and their engine core say to each other, as msgpack over ZeroMQ.

To the core (one PULL socket, every client PUSHes to it): `submit` and `cancel`, each naming the
core it was meant for (its pid: a request queued while a core restarted must not reach the new
one), and `stop`. From the core (one PUB socket, each client subscribes to its own topic and to
`BROADCAST`): one `step` per engine step and client, with every request's new PCM (float32
bytes, in order) and every request that ended (with the kind of error when it did not finish, and
why its audio ended when it did: `engine.guard`'s reasons),
and on `BROADCAST` a `beat` with the core's pid, its load and the engine's counters, at every
change and at least every `BEAT_S` (a client that hears none knows its core is gone). A core
that cannot start writes why to `FAILED` in its directory and exits.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np

from pipecat_orpheus.config import Config, load_config
from pipecat_orpheus.engine.request import SamplingParams
from pipecat_orpheus.errors import (
    ConfigError,
    EngineBusy,
    EngineClosed,
    EngineFailed,
    InvalidRequest,
    ModelLoadError,
    RequestCancelled,
)

BEAT_S = 0.25  # the longest a core stays silent
BROADCAST = b"*\0"
FAILED = "failed.json"  # in the core's directory: why it could not start

# (request id, error kind or None when finished, field, message, why it finished or None)
Ended = tuple[str, str | None, str, str, str | None]
_KINDS = {"cancelled": RequestCancelled, "busy": EngineBusy, "closed": EngineClosed, "internal": EngineFailed}


@dataclass(frozen=True, slots=True)
class Addresses:
    """Where a core listens: a directory of its own, its two sockets in it."""

    directory: Path

    @property
    def requests(self) -> str:
        """Clients PUSH requests here; the core PULLs."""
        return f"ipc://{self.directory}/requests"

    @property
    def outputs(self) -> str:
        """The core PUBlishes here; each client SUBscribes to its topic and `BROADCAST`."""
        return f"ipc://{self.directory}/outputs"


@dataclass(slots=True)
class Beat:
    """The core is alive: its pid, its load and the engine's `EngineStats` fields (None: the reference path)."""

    pid: int
    active: int
    queued: int
    stats: list | None


def topic(client: str) -> bytes:
    """A client's topic (terminated, so no client's topic is a prefix of another's)."""
    return client.encode() + b"\0"


def submit(
    core: int, request_id: str, prompts: list[list[int]], sampling: SamplingParams, budgets: list[int] | None
) -> bytes:
    """Ask core `core` to speak `prompts` as request `request_id` ("client/n"), each piece within its budget."""
    return msgpack.packb(["submit", core, request_id, prompts, dataclasses.asdict(sampling), budgets])


def cancel(core: int, request_id: str) -> bytes:
    """Stop request `request_id` on core `core`."""
    return msgpack.packb(["cancel", core, request_id])


STOP = msgpack.packb(["stop"])


def step(audio: list[tuple[str, np.ndarray]], ended: list[Ended]) -> bytes:
    """One step's output for one client."""
    return msgpack.packb(["step", [(i, pcm.tobytes()) for i, pcm in audio], ended])


def beat(pid: int, active: int, queued: int, stats) -> bytes:
    """The core's heartbeat; `stats` an `EngineStats` or None."""
    return msgpack.packb(["beat", pid, active, queued, dataclasses.astuple(stats) if stats is not None else None])


def decode(data: bytes) -> list:
    """A message as [kind, *fields]: a `beat` as a `Beat`, a `submit`'s sampling as `SamplingParams`."""
    message = msgpack.unpackb(data, use_list=True)
    if message[0] == "beat":
        return ["beat", Beat(*message[1:])]
    if message[0] == "submit":
        return [*message[:4], SamplingParams(**message[4]), *message[5:]]
    return message


def ended(request_id: str, error: BaseException | None, reason: str | None = None) -> Ended:
    """How a request's end crosses the process boundary."""
    if error is None:
        return request_id, None, "", "", reason
    if isinstance(error, InvalidRequest):
        return request_id, "bad_request", error.field, error.reason, None
    kind = next((kind for kind, cls in _KINDS.items() if isinstance(error, cls)), "internal")
    return request_id, kind, "", str(error), None


def error_of(kind: str | None, field: str, message: str) -> BaseException | None:
    """The exception an ended request's stream raises on the client's side (None: it finished)."""
    if kind is None:
        return None
    if kind == "bad_request":
        return InvalidRequest(field, message)
    return _KINDS.get(kind, EngineFailed)(message)


def write_failure(directory: Path, error: BaseException) -> None:
    """What a core that cannot start leaves for the process that started it."""
    key, reason = (error.key, error.reason) if isinstance(error, ConfigError) else ("", str(error))
    (directory / FAILED).write_text(json.dumps({"kind": type(error).__name__, "key": key, "message": reason}))


def read_failure(directory: Path) -> BaseException | None:
    """The error a core left behind when it could not start, as the client raises it."""
    try:
        failure = json.loads((directory / FAILED).read_text())
    except FileNotFoundError:
        return None
    if failure["kind"] == "ConfigError":
        return ConfigError(failure["key"], failure["message"])
    return ModelLoadError(failure["message"])


def config_to_json(config: Config) -> str:
    """`config` as the JSON the core reads back with `config_from_json`."""
    return json.dumps(dataclasses.asdict(config))


def config_from_json(text: str) -> Config:
    """The `Config` written by `config_to_json`, checked like any other."""
    sections = json.loads(text)
    return load_config(overrides={f"{s}.{k}": v for s, keys in sections.items() for k, v in keys.items()})
