"""PCM helpers: int16 conversion and 80 ms framing with nothing lost or duplicated."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipecat_orpheus.pcm import (
    MESSAGE_SAMPLES,
    PcmFramer,
    float_to_int16,
    float_to_pcm16_bytes,
    int16_to_float,
    pcm16_bytes_to_float,
)


def test_message_is_80_ms_at_24_khz():
    """One Audio message is 1920 samples, 80 ms of 24 kHz audio."""
    assert MESSAGE_SAMPLES == 1920


def test_int16_conversion_clips_and_rounds():
    """Floats map to int16 by rounding, values beyond [-1, 1] clip, and int16 round-trips exactly."""
    pcm = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -3.0, 1 / 65536], dtype=np.float32)
    assert float_to_int16(pcm).tolist() == [0, 16384, -16384, 32767, -32768, 32767, -32768, 0]
    every = np.arange(-32768, 32768, dtype=np.int16)
    assert np.array_equal(float_to_int16(int16_to_float(every)), every)
    assert int16_to_float(every).dtype == np.float32


def test_bytes_are_int16_little_endian():
    """PCM bytes are 2 bytes per sample, least significant first, and decode back to the same samples."""
    data = float_to_pcm16_bytes(np.array([1 / 32768, -1 / 32768, 0.5], dtype=np.float32))
    assert data == b"\x01\x00\xff\xff\x00\x40"
    np.testing.assert_array_equal(pcm16_bytes_to_float(data), np.array([1, -1, 16384], dtype=np.float32) / 32768)
    with pytest.raises(ValueError):
        pcm16_bytes_to_float(b"\x00\x01\x02")


@given(st.lists(st.integers(0, 5000), max_size=20), st.integers(1, 2500))
def test_framer_loses_and_duplicates_nothing(sizes, frame):
    """Any chunking of a signal comes out as full frames plus one short flush, in order, every sample once."""
    signal = np.arange(sum(sizes), dtype=np.float32)
    framer = PcmFramer(frame)
    out, offset = [], 0
    for n in sizes:
        out += framer.push(signal[offset : offset + n])
        offset += n
        assert framer.pending == offset % frame
    assert all(len(f) == frame for f in out)
    last = framer.flush()
    assert len(last) < frame and framer.pending == 0
    joined = np.concatenate([*out, last]) if out or len(last) else np.zeros(0, dtype=np.float32)
    np.testing.assert_array_equal(joined, signal)


def test_framer_frames_are_independent_copies():
    """A returned frame does not change when more audio is pushed afterwards."""
    framer = PcmFramer(4)
    first = framer.push(np.ones(6, dtype=np.float32))
    second = framer.push(np.full(10, 7, dtype=np.float32))
    assert first[0].tolist() == [1, 1, 1, 1]
    assert [f.tolist() for f in second] == [[1, 1, 7, 7], [7, 7, 7, 7], [7, 7, 7, 7]]
    assert framer.flush().tolist() == []
    with pytest.raises(ValueError):
        PcmFramer(0)


def test_framer_handles_2048_sample_codec_chunks():
    """Codec frames of 2048 samples re-cut to 1920-sample messages keep every sample in order."""
    framer = PcmFramer()
    chunks = [np.full(2048, i, dtype=np.float32) for i in range(15)]
    out = [f for c in chunks for f in framer.push(c)]
    assert len(out) == 15 * 2048 // 1920 and framer.pending == 15 * 2048 % 1920
    np.testing.assert_array_equal(np.concatenate([*out, framer.flush()]), np.concatenate(chunks))
