r"""The WebSocket protocol as data: one small class per message, msgpack in and out, no I/O.

Kyutai's moshi-server TTS protocol is the core (`Text`, `Eos`, `Voice` in; `Ready`, `Audio`,
`Text` word timings, `Error` out), so a client written for it works unchanged; `Speak`,
`Flush`, `Marker`, `Cancel`, `Cancelled` and `Done` are our extensions (PROTOCOL.md at the repository's root).
Every frame is a msgpack map with a string `type`; a WebSocket text frame is taken as
`Text{text}` and the binary frame `b"\0"` as `Eos`, as moshi-server does. Anything malformed
raises `ProtocolError`, which the server turns into `Error{code: bad_request}`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import msgpack
import numpy as np

from pipecat_orpheus.errors import ProtocolError
from pipecat_orpheus.pcm import float_to_pcm16_bytes, pcm16_bytes_to_float

MessageId = str | int
FORMATS = ("PcmMessagePack", "Pcm16MessagePack")  # PROTOCOL.md: float32 list (Kyutai) | int16 LE bytes
SAMPLING_FIELDS = {"temperature": float, "top_p": float, "repetition_penalty": float, "max_tokens": int}
EOS_FRAME = b"\0"  # moshi-server's end-of-stream shortcut

_MISSING = object()


# -- field checks: each returns the value or raises ProtocolError naming `where` ----------------


def _str(where: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"{where} must be a string, got {type(value).__name__}")
    return value


def _opt_str(where: str, value: Any) -> str | None:
    return None if value is None else _str(where, value)


def _id(where: str, value: Any) -> MessageId:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ProtocolError(f"{where} must be a string or an integer, got {type(value).__name__}")
    return value


def _opt_id(where: str, value: Any) -> MessageId | None:
    return None if value is None else _id(where, value)


def _opt_strs(where: str, value: Any) -> list[str] | None:
    if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
        raise ProtocolError(f"{where} must be a list of strings")
    return value


def _opt_sampling(where: str, value: Any) -> dict[str, float | int] | None:
    """A map of `SAMPLING_FIELDS` to numbers (ranges are the server's to check), or None."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ProtocolError(f"{where} must be a map, got {type(value).__name__}")
    out = {}
    for name, number in value.items():
        kind = SAMPLING_FIELDS.get(name)
        if kind is None:
            raise ProtocolError(f"{where}.{name} is not a sampling setting; known: {', '.join(SAMPLING_FIELDS)}")
        if isinstance(number, bool) or not isinstance(number, (int, float)) or (kind is int and number != int(number)):
            raise ProtocolError(f"{where}.{name} must be {'an integer' if kind is int else 'a number'}, got {number!r}")
        out[name] = kind(number)
    return out


def _any(where: str, value: Any) -> Any:
    return value


def _check(fn: Callable[[str, Any], Any], default: Any = _MISSING) -> Any:
    """A dataclass field whose wire value is validated by `fn` (required unless `default`)."""
    if default is _MISSING:
        return field(metadata={"check": fn})
    return field(default=default, metadata={"check": fn})


# -- client -> server ---------------------------------------------------------------------------


@dataclass(slots=True)
class Text:
    """Words to speak, as an LLM streams them; buffered into sentences by the server."""

    type: ClassVar[Literal["Text"]] = "Text"
    text: str = _check(_str)


@dataclass(slots=True)
class Eos:
    """No more input: speak what is buffered, send all audio, then close normally."""

    type: ClassVar[Literal["Eos"]] = "Eos"


@dataclass(slots=True)
class Voice:
    """Kyutai's cloned-voice embedding; accepted and ignored (Orpheus has fixed voices)."""

    type: ClassVar[Literal["Voice"]] = "Voice"
    embeddings: Any = _check(_any, None)
    shape: Any = _check(_any, None)


@dataclass(slots=True)
class Speak:
    """Extension: one complete utterance, spoken after anything already queued; `sampling` overrides the server's."""

    type: ClassVar[Literal["Speak"]] = "Speak"
    text: str = _check(_str)
    voice: str | None = _check(_opt_str, None)
    id: MessageId | None = _check(_opt_id, None)
    sampling: dict[str, float | int] | None = _check(_opt_sampling, None)


@dataclass(slots=True)
class Flush:
    """Extension: speak buffered `Text` now without ending the input."""

    type: ClassVar[Literal["Flush"]] = "Flush"


@dataclass(slots=True)
class Marker:
    """Extension, both ways: echoed once all audio for the input before it has been sent."""

    type: ClassVar[Literal["Marker"]] = "Marker"
    id: MessageId = _check(_id)


@dataclass(slots=True)
class Cancel:
    """Extension: barge-in; drop one utterance id's work, or (no id) everything."""

    type: ClassVar[Literal["Cancel"]] = "Cancel"
    id: MessageId | None = _check(_opt_id, None)


# -- server -> client ---------------------------------------------------------------------------


@dataclass(slots=True)
class Ready:
    """First message: the server has accepted the stream; extension fields say what `Speak` may ask for."""

    type: ClassVar[Literal["Ready"]] = "Ready"
    voices: list[str] | None = _check(_opt_strs, None)  # the voices a Speak may name
    default_voice: str | None = _check(_opt_str, None)  # the voice of a Speak that names none
    sampling: dict[str, float | int] | None = _check(_opt_sampling, None)  # defaults; max_tokens is also the most


@dataclass(slots=True)
class Audio:
    """24 kHz mono float32 PCM, 1920 samples (80 ms) per message except an utterance's last."""

    type: ClassVar[Literal["Audio"]] = "Audio"
    pcm: np.ndarray = _check(_any)  # (n,) float32 in [-1, 1]
    id: MessageId | None = _check(_opt_id, None)


@dataclass(slots=True)
class Word:
    """One word and its estimated span on the connection's audio timeline (wire type `Text`)."""

    type: ClassVar[Literal["Text"]] = "Text"
    text: str = _check(_str)
    start_s: float = _check(_any)
    stop_s: float = _check(_any)
    id: MessageId | None = _check(_opt_id, None)


@dataclass(slots=True)
class Cancelled:
    """Extension: the cancelled work sends no more audio after this."""

    type: ClassVar[Literal["Cancelled"]] = "Cancelled"
    id: MessageId | None = _check(_opt_id, None)


@dataclass(slots=True)
class Done:
    """Extension: every message of utterance `id` has been sent; `reason` says why its audio ended.

    end_of_speech (the model ended it), max_tokens, or the integrity guard's duration | loop (the
    first piece the guard stopped). Older servers leave it out.
    """

    type: ClassVar[Literal["Done"]] = "Done"
    id: MessageId = _check(_id)
    reason: str | None = _check(_opt_str, None)


@dataclass(slots=True)
class Error:
    """Something went wrong; `code` is busy | bad_request | auth | internal."""

    type: ClassVar[Literal["Error"]] = "Error"
    message: str = _check(_str)
    code: str | None = _check(_opt_str, None)
    id: MessageId | None = _check(_opt_id, None)


ClientMessage = Text | Eos | Voice | Speak | Flush | Marker | Cancel
ServerMessage = Ready | Audio | Word | Marker | Cancelled | Done | Error
CLIENT_MESSAGES: dict[str, type] = {c.type: c for c in (Text, Eos, Voice, Speak, Flush, Marker, Cancel)}
SERVER_MESSAGES: dict[str, type] = {c.type: c for c in (Ready, Audio, Word, Marker, Cancelled, Done, Error)}


# -- encoding -----------------------------------------------------------------------------------


def encode(message: Any, *, pcm16: bool = False) -> bytes:
    """The msgpack frame of `message`; `Audio` as a float32 array, or int16 LE bytes if `pcm16`."""
    if isinstance(message, Audio):
        return encode_audio(message.pcm, message.id, pcm16=pcm16)
    body = {"type": message.type}
    for f in dataclasses.fields(message):
        value = getattr(message, f.name)
        if value is not None:
            body[f.name] = value
    return msgpack.packb(body, use_bin_type=True)


_FLOAT32_MARKER = 0xCA  # msgpack "float 32" type byte: each sample is 0xCA + 4 big-endian bytes


def encode_audio(pcm: np.ndarray, id: MessageId | None = None, *, pcm16: bool = False) -> bytes:
    """`Audio{pcm, id?}` without a Python float per sample: msgpack float32 items built in numpy.

    The float32 array is what Kyutai's Rust server sends (`Vec<f32>`), and what its Python
    client unpacks into a list of floats.
    """
    head = {"type": "Audio"} if id is None else {"type": "Audio", "id": id}
    packer = msgpack.Packer(use_bin_type=True)
    out = bytearray(packer.pack_map_header(len(head) + 1))
    for key, value in head.items():
        out += packer.pack(key) + packer.pack(value)
    out += packer.pack("pcm")
    if pcm16:
        out += packer.pack(float_to_pcm16_bytes(pcm))
        return bytes(out)
    items = np.empty((len(pcm), 5), dtype=np.uint8)  # (n, 5): marker byte + big-endian float32
    items[:, 0] = _FLOAT32_MARKER
    items[:, 1:] = np.ascontiguousarray(pcm, dtype=">f4").view(np.uint8).reshape(-1, 4)
    out += packer.pack_array_header(len(pcm))
    out += items.tobytes()
    return bytes(out)


# -- decoding -----------------------------------------------------------------------------------


def _unpack(data: bytes) -> dict:
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise ProtocolError(f"not a msgpack message: {e}") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"a message must be a msgpack map, got {type(body).__name__}")
    return body


def _build(kinds: dict[str, type], body: dict) -> Any:
    kind = body.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("a message needs a string 'type'")
    cls = kinds.get(kind)
    if cls is None:
        raise ProtocolError(f"unknown message type {kind!r}; known: {', '.join(kinds)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        value = body.get(f.name, _MISSING)
        if value is _MISSING:
            if f.default is dataclasses.MISSING:
                raise ProtocolError(f"{kind}.{f.name} is required")
            continue
        kwargs[f.name] = f.metadata["check"](f"{kind}.{f.name}", value)
    return cls(**kwargs)  # unknown keys are ignored, as serde does on the Kyutai side


def decode_client(data: bytes | str) -> ClientMessage:
    r"""One client frame -> its message; a text frame is `Text`, `b"\0"` is `Eos`."""
    if isinstance(data, str):
        return Text(data)
    if data == EOS_FRAME:
        return Eos()
    return _build(CLIENT_MESSAGES, _unpack(data))


def decode_server(data: bytes) -> ServerMessage:
    """One server frame -> its message (for clients); `Audio.pcm` becomes float32 numpy."""
    body = _unpack(data)
    if body.get("type") == "Audio":
        body = dict(body, pcm=_decode_pcm(body.get("pcm")))
    message = _build(SERVER_MESSAGES, body)
    if isinstance(message, Word):
        message.start_s, message.stop_s = float(message.start_s), float(message.stop_s)
    return message


def _decode_pcm(pcm: Any) -> np.ndarray:
    if isinstance(pcm, bytes):
        try:
            return pcm16_bytes_to_float(pcm)
        except ValueError as e:
            raise ProtocolError(f"Audio.pcm: {e}") from None
    if not isinstance(pcm, list):
        raise ProtocolError("Audio.pcm must be a list of floats or int16 bytes")
    try:
        return np.asarray(pcm, dtype=np.float32)  # (n,)
    except (TypeError, ValueError):
        raise ProtocolError("Audio.pcm must hold numbers") from None
