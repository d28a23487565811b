"""One typed, frozen configuration, loaded once: YAML file -> `ORPHEUS_*` environment -> CLI flags.

Each section of `orpheus_config.yaml` is a frozen dataclass below; a component receives only
its own section. Every field states its allowed values in `metadata`, and a bad value fails at
start with a `ConfigError` that names the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipecat_orpheus.errors import ConfigError, InvalidRequest

# The shipped defaults: package data (a link to the top-level file users edit, copied into a wheel).
DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent / "orpheus_config.yaml"
ENV_PREFIX = "ORPHEUS_"


def _range(lo: float | None = None, hi: float | None = None, **extra: Any) -> dict:
    return {"range": (lo, hi), **extra}


def _choices(*values: Any) -> dict:
    return {"choices": values}


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Where the weights come from and how they sit on the device."""

    llm: str = "canopylabs/orpheus-3b-0.1-ft"
    codec: str = "hubertsiuzdak/snac_24khz"
    dtype: str = field(default="auto", metadata=_choices("auto", "bfloat16", "float16", "float32"))
    device: str = "auto"


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """The batched engine: slot pool, KV cache, queue, prefill and CUDA graphs."""

    backend: str = field(default="batched", metadata=_choices("batched", "reference"))
    max_slots: int = field(default=256, metadata=_range(1, 4096))
    max_tokens_per_slot: int = field(default=2048, metadata=_range(64, 131072))
    max_queue: int = field(default=512, metadata=_range(0, 1_000_000))
    prefill_chunk_tokens: int = field(default=256, metadata=_range(16, 65536))
    prefill_tokens_while_decoding: int = field(default=128, metadata=_range(16, 65536))
    admission: str = field(default="slack", metadata=_choices("slack", "fixed"))
    admission_margin_ms: float = field(default=15.0, metadata=_range(0.0, 1000.0))
    busy_below_speed: float = field(default=1.0, metadata=_range(0.0, 10.0))
    cuda_graphs: bool = True
    max_chars_per_piece: int = field(default=280, metadata=_range(20, 4000))
    gpu_memory_fraction: float = field(default=0.90, metadata=_range(0.1, 1.0))
    kv_cache_dtype: str = field(default="auto", metadata=_choices("auto", "fp8"))
    switch_interval_ms: float = field(default=0.5, metadata=_range(0.0, 100.0))
    core_process: bool = True
    core_restarts: int = field(default=3, metadata=_range(0, 100))
    core_restart_backoff_s: float = field(default=1.0, metadata=_range(0.0, 60.0))
    devices: tuple[str, ...] | None = None  # one engine core per device; None: the one of model.device


@dataclass(frozen=True, slots=True)
class SamplingConfig:
    """Default sampling for every request; requests may override each value."""

    temperature: float = field(default=0.6, metadata=_range(0.0, 5.0))
    top_p: float = field(default=0.8, metadata=_range(0.0, 1.0, exclusive_lo=True))
    repetition_penalty: float = field(default=1.1, metadata=_range(1.0, 5.0))
    max_tokens: int = field(default=2000, metadata=_range(7, 131072))
    min_tokens: int = field(default=0, metadata=_range(0, 131072))
    seed: int | None = field(default=None, metadata=_range(0, 2**63 - 1))


@dataclass(frozen=True, slots=True)
class GuardConfig:
    """The integrity guard: a piece's audio is stopped past its duration budget or when its frames loop."""

    duration_factor: float = field(default=3.0, metadata=_range(0.0, 100.0))
    duration_margin_s: float = field(default=2.0, metadata=_range(0.0, 600.0))
    wide_letter_weight: float = field(default=3.0, metadata=_range(1.0, 10.0))
    loop_frames: int = field(default=6, metadata=_range(0, 256))
    loop_window_frames: int = field(default=48, metadata=_range(1, 1024))


@dataclass(frozen=True, slots=True)
class CodecConfig:
    """Streaming SNAC decoding: context on each side of a frame, batching, precision."""

    # defaults measured by `python3 -m bench.codec.run` on an H100 (bench/results/codec_h100.json)
    left_context_frames: int = field(default=2, metadata=_range(0, 16))
    lookahead_frames: int = field(default=2, metadata=_range(0, 16))
    max_batch: int = field(default=256, metadata=_range(1, 4096))
    dtype: str = field(default="float16", metadata=_choices("float32", "bfloat16", "float16"))
    compile: bool = True
    cuda_graphs: bool = True
    step_margin: float = field(default=1.25, metadata=_range(1.0, 4.0))


@dataclass(frozen=True, slots=True)
class VoiceConfig:
    """The voice used when a request names none, and the voices a request may name."""

    default: str = "tara"
    available: tuple[str, ...] = ("tara", "leah", "jess", "leo", "dan", "mia", "zac", "zoe")

    def check(self, voice: str | None) -> str:
        """`voice`, or the default for None; `InvalidRequest` listing the voices for one not offered."""
        voice = voice or self.default
        if voice not in self.available:
            raise InvalidRequest("voice", f"{voice!r} is not one of {', '.join(self.available)}")
        return voice


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """`pipecat-orpheus serve`: where it listens, keep-alive and shutdown."""

    host: str = "127.0.0.1"
    port: int = field(default=8000, metadata=_range(0, 65535))
    api_key_env: str = "ORPHEUS_API_KEYS"
    ping_interval_s: float = field(default=10.0, metadata=_range(0.1, 3600))
    ping_timeout_s: float = field(default=30.0, metadata=_range(0.1, 3600))
    shutdown_grace_s: float = field(default=10.0, metadata=_range(0.0, 3600))
    close_timeout_s: float = field(default=10.0, metadata=_range(0.1, 3600))
    workers: int = field(default=1, metadata=_range(1, 64))


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """What one client may cost the server; past a limit it gets an `Error`, never a crash."""

    max_message_bytes: int = field(default=65536, metadata=_range(64, 16 * 2**20))
    max_frame_bytes: int = field(default=262144, metadata=_range(64, 256 * 2**20))
    max_utterance_chars: int = field(default=4000, metadata=_range(1, 1_000_000))
    max_buffered_chars: int = field(default=8000, metadata=_range(1, 1_000_000))
    max_queued_utterances: int = field(default=16, metadata=_range(1, 10_000))
    max_connections: int = field(default=512, metadata=_range(1, 100_000))
    max_unsent_audio_s: float = field(default=30.0, metadata=_range(0.1, 3600))
    max_unsent_messages: int = field(default=1024, metadata=_range(1, 1_000_000))
    max_id_chars: int = field(default=128, metadata=_range(1, 65536))
    max_incoming_messages: int = field(default=16, metadata=_range(1, 100_000))
    max_write_buffer_bytes: int = field(default=32768, metadata=_range(1024, 256 * 2**20))
    handshake_timeout_s: float = field(default=10.0, metadata=_range(0.1, 3600))


@dataclass(frozen=True, slots=True)
class ModalConfig:
    """The Modal deployment in modal_deploy/app.py."""

    app_name: str = "pipecat-orpheus"
    gpu: str = "H100"
    min_containers: int = field(default=0, metadata=_range(0, 1000))
    max_containers: int = field(default=4, metadata=_range(1, 1000))
    buffer_containers: int = field(default=0, metadata=_range(0, 1000))
    scaledown_window_s: int = field(default=300, metadata=_range(2, 3600))
    timeout_s: int = field(default=3600, metadata=_range(10, 86400))
    startup_timeout_s: int = field(default=1800, metadata=_range(10, 86400))
    weights_volume: str = "orpheus-weights"
    hf_secret: str = "huggingface-secret"
    api_key_secret: str = "orpheus-api-keys"


@dataclass(frozen=True, slots=True)
class EvalConfig:
    """`pipecat-orpheus eval`: the ASR that listens, the seed, and the bounds past which an utterance is flagged."""

    asr: str = field(default="faster-whisper", metadata=_choices("faster-whisper", "pocketsphinx"))
    asr_model: str = "large-v3"
    asr_device: str = "auto"
    seed: int = field(default=1, metadata=_range(0, 2**62))
    silence_dbfs: float = field(default=-50.0, metadata=_range(-120.0, 0.0))
    max_edge_silence_s: float = field(default=0.5, metadata=_range(0.0, 60.0))
    max_clipped_share: float = field(default=0.001, metadata=_range(0.0, 1.0))
    min_loudness_dbfs: float = field(default=-35.0, metadata=_range(-120.0, 0.0))
    max_loudness_dbfs: float = field(default=-10.0, metadata=_range(-120.0, 0.0))
    max_pace_ratio: float = field(default=1.6, metadata=_range(1.0, 100.0))
    loop_frames: int = field(default=6, metadata=_range(2, 1000))
    max_repeated_share: float = field(default=0.1, metadata=_range(0.0, 1.0))
    max_wer: float = field(default=0.2, metadata=_range(0.0, 10.0))
    min_stream_db: float = field(default=40.0, metadata=_range(-100.0, 200.0))
    wer_difference: float = field(default=0.1, metadata=_range(0.0, 10.0))


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration: one frozen section per block of `orpheus_config.yaml`."""

    model: ModelConfig = ModelConfig()
    engine: EngineConfig = EngineConfig()
    sampling: SamplingConfig = SamplingConfig()
    guard: GuardConfig = GuardConfig()
    codec: CodecConfig = CodecConfig()
    voices: VoiceConfig = VoiceConfig()
    server: ServerConfig = ServerConfig()
    limits: LimitsConfig = LimitsConfig()
    modal: ModalConfig = ModalConfig()
    eval: EvalConfig = EvalConfig()

    def __post_init__(self) -> None:
        if self.voices.default not in self.voices.available:
            raise ConfigError("voices.default", f"{self.voices.default!r} is not in voices.available")
        if self.server.ping_timeout_s < self.server.ping_interval_s:
            raise ConfigError("server.ping_timeout_s", "must be >= server.ping_interval_s")
        if self.limits.max_frame_bytes < self.limits.max_message_bytes:
            raise ConfigError("limits.max_frame_bytes", "must be >= limits.max_message_bytes")
        if self.engine.prefill_tokens_while_decoding > self.engine.prefill_chunk_tokens:
            raise ConfigError(
                "engine.prefill_tokens_while_decoding",
                f"must be <= engine.prefill_chunk_tokens ({self.engine.prefill_chunk_tokens})",
            )
        if self.server.workers > 1 and self.server.port == 0:
            raise ConfigError("server.workers", "several workers share one port: set server.port (not 0)")
        if self.server.workers > 1 and not self.engine.core_process:
            raise ConfigError("server.workers", "workers share one engine core: set engine.core_process to true")
        for device in self.engine.devices or ():
            if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
                raise ConfigError("engine.devices", f"{device!r} is not a device; use auto, cpu, cuda or cuda:N")
        if self.engine.devices is not None and len(self.engine.devices) > 1 and not self.engine.core_process:
            raise ConfigError("engine.devices", "one engine core per device: set engine.core_process to true")
        if self.eval.min_loudness_dbfs > self.eval.max_loudness_dbfs:
            raise ConfigError("eval.min_loudness_dbfs", "must be <= eval.max_loudness_dbfs")
        if self.sampling.max_tokens > self.engine.max_tokens_per_slot:
            raise ConfigError(
                "sampling.max_tokens", f"must be <= engine.max_tokens_per_slot ({self.engine.max_tokens_per_slot})"
            )


def load_config(
    path: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Load the configuration: the YAML file, then the environment, then `overrides`.

    `path` defaults to the orpheus_config.yaml shipped with the package; environment variables are named
    `ORPHEUS_<SECTION>_<KEY>`; `overrides` come from CLI flags, such as `{"server.port": 9000}`
    (None values are skipped).
    """
    file = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    try:
        loaded = yaml.safe_load(file.read_text()) or {}
    except OSError as e:
        raise ConfigError("--config", f"cannot read {file}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError("--config", f"{file} is not valid YAML: {e}") from e
    if not isinstance(loaded, dict):
        raise ConfigError("--config", f"{file} must hold a mapping of sections")
    values: dict[str, dict[str, Any]] = {k: dict(v or {}) if isinstance(v, dict) else v for k, v in loaded.items()}
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    for name, raw in (environ if environ is not None else os.environ).items():
        if not name.startswith(ENV_PREFIX):
            continue
        for section in sections:
            prefix = f"{ENV_PREFIX}{section.upper()}_"
            if name.startswith(prefix):
                values.setdefault(section, {})[name[len(prefix) :].lower()] = yaml.safe_load(raw)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            section, _, key = dotted.partition(".")
            values.setdefault(section, {})[key] = value
    unknown = set(values) - set(sections)
    if unknown:
        raise ConfigError(sorted(unknown)[0], f"unknown section; known: {', '.join(sections)}")
    hints = typing.get_type_hints(Config)
    return Config(**{s: _build_section(s, hints[s], values.get(s, {})) for s in sections})


def _build_section(section: str, cls: type, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(section, "must be a mapping of keys to values")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"{section}.{key}", f"unknown key; known: {', '.join(fields)}")
        kwargs[key] = _check(f"{section}.{key}", value, hints[key], fields[key].metadata)
    return cls(**kwargs)


def check_field(cls: type, name: str, value: Any) -> Any:
    """`value` coerced to field `name` of section `cls` and checked against its range or choices."""
    meta = next(f.metadata for f in dataclasses.fields(cls) if f.name == name)
    return _check(name, value, _hints(cls)[name], meta)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check(key: str, value: Any, hint: Any, meta: Mapping[str, Any]) -> Any:
    """Coerce `value` to the field's type and check its range or choices."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) and type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
            raise ConfigError(key, f"must be a non-empty list of strings, got {value!r}")
        return tuple(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}")
    elif hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (hint is int and value != int(value)):
            raise ConfigError(key, f"must be {'an integer' if hint is int else 'a number'}, got {value!r}")
        value = hint(value)
    elif hint is str and not isinstance(value, str):
        raise ConfigError(key, f"must be a string, got {value!r}")
    if "range" in meta:
        lo, hi = meta["range"]
        too_low = lo is not None and (value <= lo if meta.get("exclusive_lo") else value < lo)
        if too_low or (hi is not None and value > hi):
            opening = "(" if meta.get("exclusive_lo") else "["
            raise ConfigError(key, f"{value!r} is out of range {opening}{lo}, {hi}]")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(key, f"{value!r} is not one of {', '.join(map(str, meta['choices']))}")
    return value
