"""Streaming SNAC decoding.

The decoder math (`snac`), its GPU runtime (`runtime`), per-request windows (`stream`) and what
the engine step hands it (`feed`).
"""

from pipecat_orpheus.codec.feed import AudioSink, CodecFeed
from pipecat_orpheus.codec.runtime import DecodedAudio, SnacCodec
from pipecat_orpheus.codec.snac import SnacDecoder, hashed_normal
from pipecat_orpheus.codec.stream import CodecStream, Window

__all__ = [
    "AudioSink",
    "CodecFeed",
    "CodecStream",
    "DecodedAudio",
    "SnacCodec",
    "SnacDecoder",
    "Window",
    "hashed_normal",
]
