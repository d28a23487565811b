"""Signal checks on made signals whose silence, level, clipping, pace and loops are known."""

from __future__ import annotations

import numpy as np
import pytest

from pipecat_orpheus.config import EvalConfig
from pipecat_orpheus.eval.flags import utterance_flags
from pipecat_orpheus.eval.signal_checks import check_signal, letters, pace_ratios, repeated_share
from pipecat_orpheus.format import SAMPLE_RATE, SAMPLES_PER_FRAME

RATE = SAMPLE_RATE


def tone(seconds: float, amplitude: float, hz: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def test_edge_silence_level_and_clipping_of_a_tone_between_silences():
    """0.3 s silence, 1 s of a 0.1 sine, 0.7 s silence: those silences, -23 dBFS, nothing clipped."""
    pcm = np.concatenate([np.zeros(int(0.3 * RATE)), tone(1.0, 0.1), np.zeros(int(0.7 * RATE))]).astype(np.float32)
    checks = check_signal(pcm, "Hello there.", None, silence_dbfs=-50, loop_frames=6)
    assert checks.audio_s == pytest.approx(2.0)
    assert checks.lead_silence_s == pytest.approx(0.3, abs=0.011)
    assert checks.trail_silence_s == pytest.approx(0.7, abs=0.011)
    assert checks.loudness_dbfs == pytest.approx(20 * np.log10(0.1 / np.sqrt(2)), abs=0.1)
    assert checks.clipped_share == 0 and checks.repeated_share is None
    assert checks.seconds_per_letter == pytest.approx(1.0 / letters("Hello there."), rel=0.02)
    clipped = check_signal(np.clip(tone(1.0, 2.0), -1, 1), "Hi.", None, silence_dbfs=-50, loop_frames=6)
    assert 0.5 < clipped.clipped_share < 0.9


def test_silence_only_has_no_level_and_is_all_edge():
    """Digital silence: no speech level, leading and trailing silence both the whole length, flagged."""
    checks = check_signal(np.zeros(RATE, dtype=np.float32), "Hi.", None, silence_dbfs=-50, loop_frames=6)
    assert checks.loudness_dbfs is None and checks.lead_silence_s == checks.trail_silence_s == pytest.approx(1.0)
    row = {**{k: getattr(checks, k) for k in checks.__slots__}, "guard": "not reported"}
    assert set(utterance_flags(row, EvalConfig())) == {"lead_silence_s", "trail_silence_s"}


def test_letters_count_words_not_tags_or_marks():
    """Tags, spaces and punctuation take no letters."""
    assert letters("Oh <gasp> you scared me!") == len("Ohyouscaredme")


def test_a_loop_of_codes_is_repeated_and_fresh_codes_or_pauses_are_not():
    """A 5-frame phrase said four times repeats 75 % of frames; random codes none; a repeated pause is ignored."""
    rng = np.random.default_rng(0)
    phrase = rng.integers(0, 4096, 5)
    loop = np.concatenate([rng.integers(0, 4096, 20), np.tile(phrase, 4)])
    assert repeated_share(loop, np.zeros(len(loop), bool), run=5) == pytest.approx(15 / 40)
    assert repeated_share(rng.integers(0, 4096, 40), np.zeros(40, bool), run=5) == 0
    pauses = np.concatenate([np.zeros(8, int), rng.integers(0, 4096, 10), np.zeros(8, int)])
    silent = pauses == 0
    assert repeated_share(pauses, silent, run=5) == 0
    assert repeated_share(pauses, np.zeros(len(pauses), bool), run=5) > 0


def test_repeats_are_read_from_the_frames_of_the_audio():
    """check_signal reads each frame's level-0 code (position 0) and skips frames of silent audio."""
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 4096, (24, 7))
    frames[12:, 0] = frames[:12, 0]  # the second half's coarse codes repeat the first half's
    pcm = tone(24 * SAMPLES_PER_FRAME / RATE, 0.1)
    assert check_signal(pcm, "a b", frames, silence_dbfs=-50, loop_frames=6).repeated_share == pytest.approx(0.5)
    assert check_signal(pcm, "a b", frames[:3], silence_dbfs=-50, loop_frames=6).repeated_share is None


def test_pace_against_the_voices_median_flags_runaways_and_skips():
    """Three utterances at one pace, one three times slower and one three times faster: ratios 1, 3 and 1/3."""
    ratios = pace_ratios([0.06, 0.06, 0.18, 0.06, 0.02, None])
    assert ratios[:5] == pytest.approx([1, 1, 3, 1, 1 / 3]) and ratios[5] is None
    bounds = EvalConfig()
    assert "pace_ratio" in utterance_flags({"pace_ratio": 3.0, "guard": "not reported"}, bounds)
    assert "pace_ratio" in utterance_flags({"pace_ratio": 1 / 3, "guard": "not reported"}, bounds)
    assert utterance_flags({"pace_ratio": 1.1, "guard": "end_of_speech"}, bounds) == []
    assert utterance_flags({"pace_ratio": 1.1, "guard": "loop"}, bounds) == ["guard"]
