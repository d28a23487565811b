"""The integrity guard: why a piece's audio ended, its duration budget, and the loop detector.

Orpheus sometimes runs on past its text (a hallucinated tail) or repeats itself. Two checks stop
a piece, each as if the model had sampled END_OF_SPEECH, and the reason goes with the request's
end to the caller (`Done.reason` on the wire):

- **duration**: a piece's audio may last at most `duration_factor` times its expected length
  (its letters at `text.SECONDS_PER_LETTER`, a wide-script letter counting `wide_letter_weight`)
  plus `duration_margin_s`. It is a cap on the piece's audio tokens, which the scheduler already
  has (`max_new_tokens`): it costs nothing per token.
- **loop**: the last `loop_frames` frames equal, all 7 codes each, the `loop_frames` frames that
  end d frames earlier, for some period d in 1..`loop_window_frames`. Checked on the host, where
  the step's tokens already are, once per step for every frame it completed (numpy over the
  batch, frames compared by hash). Sampled speech at temperature > 0 all but never repeats 7 codes exactly twice running
  (and Orpheus's training data drops consecutive repeated frames); a degenerate loop does.
"""

from __future__ import annotations

import itertools
import math
import unicodedata
from collections.abc import Sequence

import numpy as np

from pipecat_orpheus.config import GuardConfig
from pipecat_orpheus.format import FRAME_TOKENS, TOKENS_PER_SECOND
from pipecat_orpheus.text import SECONDS_PER_LETTER

SPEECH_ENDED = "end_of_speech"  # the model ended the piece itself
MAX_TOKENS = "max_tokens"  # the piece reached sampling.max_tokens (or its slot's room)
DURATION = "duration"  # the guard: past the piece's duration budget
LOOP = "loop"  # the guard: its frames repeat
GUARD_REASONS = (DURATION, LOOP)
STOP_REASONS = (SPEECH_ENDED, MAX_TOKENS, *GUARD_REASONS)
_RANK = {SPEECH_ENDED: 0, MAX_TOKENS: 1, DURATION: 2, LOOP: 2}
_HASH = np.random.default_rng(0x6F72).integers(1, 2**62, FRAME_TOKENS, dtype=np.int64) | 1  # (7,) odd multipliers
_NO_FRAME = -1  # history before a piece's first frames (a frame hashing to it adds one match, not loop_frames)


def worse(current: str | None, new: str | None) -> str | None:
    """Why an utterance's audio ended, one more piece having ended for `new` (None: not known).

    The first guard stop wins, then max_tokens, then end_of_speech.
    """
    if current is None or (new is not None and _RANK[new] > _RANK[current]):
        return new
    return current


def spoken_letters(text: str, wide_letter_weight: float) -> float:
    """Letters and digits of `text`, a wide (CJK) one counting `wide_letter_weight`: its length in speaking time."""
    return sum((wide_letter_weight if unicodedata.east_asian_width(ch) in "WF" else 1.0) for ch in text if ch.isalnum())


def duration_budget(text: str, config: GuardConfig) -> int:
    """Most audio tokens (whole frames) a piece speaking `text` may take (`duration_factor` > 0)."""
    expected_s = spoken_letters(text, config.wide_letter_weight) * SECONDS_PER_LETTER
    seconds = config.duration_factor * expected_s + config.duration_margin_s
    return max(1, math.ceil(seconds * TOKENS_PER_SECOND / FRAME_TOKENS)) * FRAME_TOKENS


class LoopDetector:
    """Per-slot frame history and, for each period d, how many of the latest frames equal the frame d before.

    `run[s, d - 1] >= loop_frames` says that slot s's last `loop_frames` frames repeat the ones d
    frames earlier. A frame is kept as one 64-bit hash of its 7 token ids (two different frames
    share one with odds of about 2**-52, and a false loop needs `loop_frames` such matches in a
    row), so a step compares (F, W) integers. State is reset when a piece starts in the slot; a
    step updates every slot that completed a frame in one vectorized pass.

    Args:
        slots: the engine's slot count.
        config: the guard's `loop_frames` (> 0) and `loop_window_frames`.
    """

    def __init__(self, slots: int, config: GuardConfig):
        self.frames = config.loop_frames
        window = config.loop_window_frames
        self._history = np.full((slots, window), _NO_FRAME, dtype=np.int64)  # (S, W) frame hashes, newest first
        self._run = np.zeros((slots, window), dtype=np.int32)  # (S, W): column d - 1 for period d

    def reset(self, slot: int) -> None:
        """A piece starts in `slot`: no history."""
        self._history[slot] = _NO_FRAME
        self._run[slot] = 0

    def check(self, slots: Sequence[int], frames: Sequence[Sequence[int]]) -> np.ndarray:
        """Add one frame (7 token ids) per slot (distinct slots); (F,) bool: the slots whose frames now loop."""
        s = np.asarray(slots, dtype=np.intp)  # (F,)
        ids = np.fromiter(itertools.chain.from_iterable(frames), dtype=np.int64, count=FRAME_TOKENS * len(s))
        keys = ids.reshape(-1, FRAME_TOKENS) @ _HASH  # (F,) wrapping int64 arithmetic
        history = self._history[s]  # (F, W)
        run = (self._run[s] + 1) * (history == keys[:, None])  # (F, W): +1 where equal to the frame d before, else 0
        self._run[s] = run
        self._history[s, 1:] = history[:, :-1]
        self._history[s, 0] = keys
        return run.max(axis=1) >= self.frames
