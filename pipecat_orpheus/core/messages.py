"""What an engine client and its engine core say to each other, as msgpack over ZeroMQ.

To the core: `submit` (request id, token prompts, sampling), `cancel` (request id), `stop`.
From the core: `ready` once its backend is loaded and warm (or `failed`, naming why), then one
`step` per engine step: every request's new PCM (float32 bytes, in order), every request that
ended (with the kind of error when it did not finish), and the engine's load.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

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

Ended = tuple[str, str | None, str, str]  # (request id, error kind or None when finished, field, message)
_KINDS = {"cancelled": RequestCancelled, "busy": EngineBusy, "closed": EngineClosed, "internal": EngineFailed}


@dataclass(slots=True)
class Step:
    """One engine step's output: new PCM per request, the requests that ended, the load after it."""

    audio: list[tuple[str, bytes]]
    ended: list[Ended]
    active: int
    queued: int
    stats: list | None  # the engine's `EngineStats` fields in order (the reference path has none)


def submit(request_id: str, prompts: list[list[int]], sampling: SamplingParams) -> bytes:
    """The message that asks the core to speak `prompts` as request `request_id`."""
    return msgpack.packb(["submit", request_id, prompts, dataclasses.asdict(sampling)])


def cancel(request_id: str) -> bytes:
    """The message that stops request `request_id`."""
    return msgpack.packb(["cancel", request_id])


STOP = msgpack.packb(["stop"])


def ready(info: dict) -> bytes:
    """The core's first message once it serves: what it runs (for logs)."""
    return msgpack.packb(["ready", info])


def failed(error: BaseException) -> bytes:
    """The core's only message when it cannot start: the error's kind and its message."""
    if isinstance(error, ConfigError):
        return msgpack.packb(["failed", "ConfigError", error.key, error.reason])
    return msgpack.packb(["failed", type(error).__name__, "", str(error)])


def step(audio: list[tuple[str, np.ndarray]], ended: list[Ended], active: int, queued: int, stats) -> bytes:
    """One step's output (see `Step`); `stats` an `EngineStats` or None."""
    counters = dataclasses.astuple(stats) if stats is not None else None
    return msgpack.packb(["step", [(i, pcm.tobytes()) for i, pcm in audio], ended, active, queued, counters])


def decode(data: bytes) -> list:
    """A message as [kind, *fields]; `step` fields as a `Step`, `submit` sampling as `SamplingParams`."""
    message = msgpack.unpackb(data, use_list=True)
    if message[0] == "step":
        return ["step", Step([tuple(a) for a in message[1]], [tuple(e) for e in message[2]], *message[3:])]
    if message[0] == "submit":
        return ["submit", message[1], message[2], SamplingParams(**message[3])]
    return message


def ended(request_id: str, error: BaseException | None) -> Ended:
    """How a request's end crosses the process boundary."""
    if error is None:
        return request_id, None, "", ""
    if isinstance(error, InvalidRequest):
        return request_id, "bad_request", error.field, error.reason
    kind = next((kind for kind, cls in _KINDS.items() if isinstance(error, cls)), "internal")
    return request_id, kind, "", str(error)


def error_of(kind: str | None, field: str, message: str) -> BaseException | None:
    """The exception an ended request's stream raises on the client's side (None: it finished)."""
    if kind is None:
        return None
    if kind == "bad_request":
        return InvalidRequest(field, message)
    return _KINDS.get(kind, EngineFailed)(message)


def start_error(kind: str, key: str, message: str) -> BaseException:
    """The error a client raises when its core could not start."""
    return ConfigError(key, message) if kind == "ConfigError" else ModelLoadError(message)


def config_to_json(config: Config) -> str:
    """`config` as the JSON the core reads back with `config_from_json`."""
    return json.dumps(dataclasses.asdict(config))


def config_from_json(text: str) -> Config:
    """The `Config` written by `config_to_json`, checked like any other."""
    sections = json.loads(text)
    return load_config(overrides={f"{s}.{k}": v for s, keys in sections.items() for k, v in keys.items()})
