"""Signal checks of one utterance: what a listener notices without understanding a word.

Silence at either end (a slow start, a tail of nothing), clipping, speech level, how long the
audio is for its text (a runaway tail runs long, skipped words short: compared with the voice's
median by `pace_ratios`) and frames that repeat (a loop: the same run of coarse SNAC codes again).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipecat_orpheus.format import SAMPLE_RATE, SAMPLES_PER_FRAME
from pipecat_orpheus.text import words

LEVEL_WINDOW = SAMPLE_RATE // 100  # 10 ms windows for the level: the usual resolution of silence trimming
FULL_SCALE = 32767 / 32768  # the largest int16 sample as float: what a client receives is clipped there
_FLOOR = 1e-12  # power of digital silence, so its level is finite (-120 dB)


@dataclass(frozen=True, slots=True)
class SignalChecks:
    """The signal measures of one utterance (levels in dB relative to full scale, RMS)."""

    audio_s: float
    lead_silence_s: float
    trail_silence_s: float
    clipped_share: float  # samples at or beyond full scale
    loudness_dbfs: float | None  # RMS over the non-silent windows; None when all of it is silent
    seconds_per_letter: float | None  # audio between the edge silences per letter of text; None without letters
    repeated_share: float | None  # frames inside a repeated run of coarse codes; None without the codes


def levels_dbfs(pcm: np.ndarray, window: int = LEVEL_WINDOW) -> np.ndarray:
    """RMS level of each whole `window` of `pcm` in dBFS (a last partial window is dropped)."""
    n = len(pcm) // window
    power = np.mean(np.square(pcm[: n * window].reshape(n, window), dtype=np.float64), axis=1)  # (n,)
    return 10 * np.log10(np.maximum(power, _FLOOR))


def edge_silence_s(levels: np.ndarray, silence_dbfs: float, window_s: float) -> tuple[float, float]:
    """Seconds of silence before the first and after the last window at `silence_dbfs` or louder."""
    loud = np.flatnonzero(levels >= silence_dbfs)
    if len(loud) == 0:
        return len(levels) * window_s, len(levels) * window_s
    return loud[0] * window_s, (len(levels) - 1 - loud[-1]) * window_s


def letters(text: str) -> int:
    """Letters and digits of the spoken words of `text` (no tags, spaces or punctuation)."""
    return sum(ch.isalnum() for word in words(text) for ch in word)


def repeated_share(coarse: np.ndarray, silent: np.ndarray, run: int) -> float:
    """Share of frames inside a run of `run` non-silent frames whose coarse codes occurred earlier in the utterance.

    `coarse` holds each frame's level-0 SNAC code (n,), `silent` (n,) marks silent frames: pauses
    repeat the same codes in any speech and are not loops.
    """
    n = len(coarse)
    repeated = np.zeros(n, dtype=bool)
    seen: set[bytes] = set()
    for i in range(n - run + 1):
        if silent[i : i + run].any():
            continue
        key = coarse[i : i + run].tobytes()
        if key in seen:
            repeated[i : i + run] = True
        seen.add(key)
    return float(repeated.mean()) if n else 0.0


def check_signal(
    pcm: np.ndarray, text: str, frames: np.ndarray | None, *, silence_dbfs: float, loop_frames: int
) -> SignalChecks:
    """Measure one utterance; `frames` (n, 7) are its SNAC codes in frame order, when known."""
    window_s = LEVEL_WINDOW / SAMPLE_RATE
    levels = levels_dbfs(pcm)
    lead, trail = edge_silence_s(levels, silence_dbfs, window_s)
    loud = levels >= silence_dbfs
    loudness = float(10 * np.log10(np.mean(10 ** (levels[loud] / 10)))) if loud.any() else None
    audio_s = len(pcm) / SAMPLE_RATE
    n_letters = letters(text)
    repeats = None
    if frames is not None and len(frames) == len(pcm) // SAMPLES_PER_FRAME:
        silent = levels_dbfs(pcm, SAMPLES_PER_FRAME) < silence_dbfs  # (n,) per SNAC frame
        repeats = repeated_share(np.ascontiguousarray(frames[:, 0]), silent, loop_frames)
    return SignalChecks(
        audio_s=audio_s,
        lead_silence_s=lead,
        trail_silence_s=trail,
        clipped_share=float(np.mean(np.abs(pcm) >= FULL_SCALE)) if len(pcm) else 0.0,
        loudness_dbfs=loudness,
        seconds_per_letter=max(audio_s - lead - trail, 0.0) / n_letters if n_letters else None,
        repeated_share=repeats,
    )


def pace_ratios(seconds_per_letter: Sequence[float | None]) -> list[float | None]:
    """Each utterance's seconds per letter over the median of them all (one voice's utterances)."""
    known = [v for v in seconds_per_letter if v is not None and v > 0]
    if not known:
        return [None] * len(seconds_per_letter)
    median = statistics.median(known)
    return [v / median if v is not None else None for v in seconds_per_letter]
