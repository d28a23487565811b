"""protocol.py: message types, msgpack encoding as Kyutai's server writes it, and validation."""

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipecat_orpheus.errors import ProtocolError
from pipecat_orpheus.wire import protocol as p


def test_kyutai_client_messages_decode():
    """Kyutai's Text, Voice and Eos (msgpack maps, float64 as msgpack-python packs them) decode."""
    assert p.decode_client(msgpack.packb({"type": "Text", "text": "Hello"})) == p.Text("Hello")
    assert p.decode_client(msgpack.packb({"type": "Eos"})) == p.Eos()
    voice = p.decode_client(msgpack.packb({"type": "Voice", "embeddings": [0.5, 1.5], "shape": [1, 2]}))
    assert isinstance(voice, p.Voice)


def test_text_frame_and_nul_frame_are_shortcuts():
    """A WebSocket text frame is Text, and the binary frame b'\\0' is Eos, as in moshi-server."""
    assert p.decode_client("hi there") == p.Text("hi there")
    assert p.decode_client(b"\0") == p.Eos()


def test_extension_messages_decode_and_ignore_unknown_keys():
    """Speak, Flush, Marker and Cancel decode; unknown keys are ignored like serde does."""
    speak = p.decode_client(msgpack.packb({"type": "Speak", "text": "Hi.", "voice": "leo", "id": 7, "extra": 1}))
    assert speak == p.Speak("Hi.", voice="leo", id=7)
    assert p.decode_client(msgpack.packb({"type": "Flush"})) == p.Flush()
    assert p.decode_client(msgpack.packb({"type": "Marker", "id": "m"})) == p.Marker("m")
    assert p.decode_client(msgpack.packb({"type": "Cancel"})) == p.Cancel(None)


@pytest.mark.parametrize(
    "frame, fragment",
    [
        (b"\xc1", "not a msgpack"),  # 0xc1 is never used in msgpack
        (msgpack.packb([1, 2]), "must be a msgpack map"),
        (msgpack.packb({"text": "x"}), "string 'type'"),
        (msgpack.packb({"type": "Nope"}), "unknown message type"),
        (msgpack.packb({"type": "Text"}), "Text.text is required"),
        (msgpack.packb({"type": "Text", "text": 3}), "Text.text must be a string"),
        (msgpack.packb({"type": "Marker", "id": True}), "Marker.id must be a string or an integer"),
        (msgpack.packb({"type": "Speak", "text": "x", "voice": 1}), "Speak.voice must be a string"),
        (msgpack.packb({"type": "Speak", "text": "x", "sampling": [1]}), "Speak.sampling must be a map"),
        (msgpack.packb({"type": "Speak", "text": "x", "sampling": {"seed": 1}}), "Speak.sampling.seed is not a"),
        (msgpack.packb({"type": "Speak", "text": "x", "sampling": {"top_p": True}}), "Speak.sampling.top_p must"),
        (msgpack.packb({"type": "Speak", "text": "x", "sampling": {"max_tokens": 7.5}}), "max_tokens must be an int"),
        (msgpack.packb({"type": "Text", "text": "x"}) + b"\x00", "not a msgpack"),
    ],
)
def test_malformed_frames_raise_protocol_error(frame, fragment):
    """Every kind of malformed frame is a ProtocolError with code bad_request and a clear message."""
    with pytest.raises(ProtocolError, match=fragment) as info:
        p.decode_client(frame)
    assert info.value.code == "bad_request"


def test_speak_sampling_is_typed():
    """Speak.sampling takes the four sampling settings, as floats and an integer max_tokens."""
    body = {"type": "Speak", "text": "Hi.", "sampling": {"temperature": 1, "max_tokens": 70.0}}
    speak = p.decode_client(msgpack.packb(body))
    assert speak.sampling == {"temperature": 1.0, "max_tokens": 70} and isinstance(speak.sampling["max_tokens"], int)


def test_audio_is_a_msgpack_float32_array():
    """Audio.pcm is encoded as msgpack float32 items (Rust Vec<f32>), readable by plain msgpack."""
    pcm = np.linspace(-1, 1, 1920, dtype=np.float32)
    frame = p.encode(p.Audio(pcm))
    body = msgpack.unpackb(frame)
    assert body["type"] == "Audio" and "id" not in body
    assert np.array_equal(np.asarray(body["pcm"], dtype=np.float32), pcm)
    assert frame.count(b"\xca") >= 1920  # every sample is a float32 item, not a float64 (0xcb)


def test_pcm16_audio_is_int16_little_endian_bytes():
    """With Pcm16MessagePack, Audio.pcm is int16 LE bytes that decode back within one step."""
    pcm = np.linspace(-1, 1, 100, dtype=np.float32)
    body = msgpack.unpackb(p.encode(p.Audio(pcm, id="a"), pcm16=True))
    assert body["id"] == "a" and isinstance(body["pcm"], bytes) and len(body["pcm"]) == 200
    assert np.frombuffer(body["pcm"], "<i2")[-1] == 32767


@given(
    pcm=st.lists(st.floats(-1, 1, width=32), max_size=300).map(lambda x: np.array(x, dtype=np.float32)),
    id=st.none() | st.text(max_size=10) | st.integers(-(2**63), 2**63 - 1),
)
def test_audio_round_trips(pcm, id):
    """Any float32 PCM and id survive encode_audio -> decode_server exactly."""
    message = p.decode_server(p.encode(p.Audio(pcm, id=id)))
    assert isinstance(message, p.Audio) and message.id == id
    assert np.array_equal(message.pcm, pcm)


@pytest.mark.parametrize(
    "message",
    [
        p.Ready(),
        p.Ready(voices=["tara", "leo"], default_voice="tara", sampling={"top_p": 0.8, "max_tokens": 2000}),
        p.Word("hello", 0.0, 0.25, id=3),
        p.Word("hello", 0.5, 0.75),
        p.Marker(5),
        p.Cancelled(None),
        p.Cancelled("x"),
        p.Done("x"),
        p.Error("at capacity", code="busy"),
    ],
)
def test_server_messages_round_trip(message):
    """Every server message decodes back to itself; None fields are left out of the map."""
    frame = p.encode(message)
    assert None not in msgpack.unpackb(frame).values()
    assert p.decode_server(frame) == message


def test_word_timing_uses_kyutai_field_names():
    """Word timings go out as Kyutai's Text{text, start_s, stop_s}."""
    body = msgpack.unpackb(p.encode(p.Word("hi", 1.0, 1.5)))
    assert body == {"type": "Text", "text": "hi", "start_s": 1.0, "stop_s": 1.5}
