"""PCM helpers shared by the server, the Pipecat service, the CLI and the eval: sample formats, framing, WAV files.

The engine hands out float32 chunks of any length (a frame of 2048 samples, or a whole tail at
end of speech); the wire wants 80 ms messages (PROTOCOL.md `Audio`) and int16 little-endian
bytes for `Pcm16MessagePack` and Pipecat's `TTSAudioRawFrame`.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

from pipecat_orpheus.format import SAMPLE_RATE

MESSAGE_SAMPLES = SAMPLE_RATE * 80 // 1000  # 1920 samples: one 80 ms `Audio` message
_INT16_SCALE = 32768.0  # int16 full scale; x * 32768 rounds back to the same int16 exactly


def float_to_int16(pcm: np.ndarray) -> np.ndarray:
    """Float PCM in [-1, 1] (clipped beyond) -> int16, rounded to nearest."""
    scaled = np.rint(np.asarray(pcm, dtype=np.float32) * _INT16_SCALE)
    return np.clip(scaled, -32768, 32767).astype(np.int16)


def int16_to_float(pcm: np.ndarray) -> np.ndarray:
    """Int16 PCM -> float32 in [-1, 1)."""
    return np.asarray(pcm, dtype=np.int16).astype(np.float32) / _INT16_SCALE


def float_to_pcm16_bytes(pcm: np.ndarray) -> bytes:
    """Float PCM -> int16 little-endian bytes (2 bytes per sample, whatever the host order)."""
    return float_to_int16(pcm).astype("<i2", copy=False).tobytes()


def pcm16_bytes_to_float(data: bytes) -> np.ndarray:
    """Int16 little-endian bytes -> float32 PCM; an odd byte count is an error."""
    if len(data) % 2:
        raise ValueError(f"int16 PCM needs an even number of bytes, got {len(data)}")
    return int16_to_float(np.frombuffer(data, dtype="<i2"))


def write_wav(path: Path | str, pcm: np.ndarray) -> None:
    """Write float32 PCM as a 24 kHz mono 16-bit WAV file."""
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)  # 16-bit
        wav.setframerate(SAMPLE_RATE)
        wav.writeframes(float_to_pcm16_bytes(pcm))


def snr_db(test: np.ndarray, ref: np.ndarray) -> float:
    """How close `test` is to `ref` (same length): signal-to-difference ratio in dB (streamed vs offline audio)."""
    return float(10 * np.log10(np.sum(ref**2) / max(np.sum((test - ref) ** 2), 1e-30)))


class PcmFramer:
    """Re-cuts a stream of PCM chunks of any length into messages of exactly `frame_samples`.

    `push` returns every full message the new samples complete; `flush` returns what is left
    (shorter, possibly empty) at the end of an utterance. Samples come out in order, each once.
    """

    def __init__(self, frame_samples: int = MESSAGE_SAMPLES, dtype: np.dtype | type = np.float32):
        if frame_samples <= 0:
            raise ValueError(f"frame_samples must be positive, got {frame_samples}")
        self.frame_samples = frame_samples
        self._dtype = np.dtype(dtype)
        self._buffer = np.zeros(frame_samples, dtype=self._dtype)  # (frame_samples,) partial message
        self._filled = 0

    @property
    def pending(self) -> int:
        """Samples held back until the next message fills."""
        return self._filled

    def push(self, chunk: np.ndarray) -> list[np.ndarray]:
        """Add `chunk` (1-D); return the full messages now complete, oldest first."""
        chunk = np.asarray(chunk, dtype=self._dtype).reshape(-1)  # (n,)
        out: list[np.ndarray] = []
        i = 0
        if self._filled:
            take = min(self.frame_samples - self._filled, len(chunk))
            self._buffer[self._filled : self._filled + take] = chunk[:take]
            self._filled += take
            i = take
            if self._filled < self.frame_samples:
                return out
            out.append(self._buffer.copy())
            self._filled = 0
        whole = (len(chunk) - i) // self.frame_samples * self.frame_samples
        out.extend(chunk[i + k : i + k + self.frame_samples].copy() for k in range(0, whole, self.frame_samples))
        rest = chunk[i + whole :]
        self._buffer[: len(rest)] = rest
        self._filled = len(rest)
        return out

    def flush(self) -> np.ndarray:
        """The held-back samples as a last, short message (empty if none); the framer is reset."""
        last = self._buffer[: self._filled].copy()
        self._filled = 0
        return last
