"""The integrity guard: duration budgets, loop detection, and the scheduler stopping pieces with forced tokens."""

import numpy as np
import pytest

from pipecat_orpheus import format as fmt
from pipecat_orpheus.config import GuardConfig
from pipecat_orpheus.engine.guard import (
    DURATION,
    LOOP,
    MAX_TOKENS,
    SPEECH_ENDED,
    LoopDetector,
    duration_budget,
    spoken_letters,
    worse,
)
from pipecat_orpheus.engine.request import Request, RequestStatus, SamplingParams
from pipecat_orpheus.engine.scheduler import Scheduler

GUARD = GuardConfig(loop_frames=4, loop_window_frames=8)


def frames(n: int, seed: int) -> np.ndarray:
    """`n` random frames of codes, (n, 7): sampled speech never repeats one exactly."""
    return np.random.default_rng(seed).integers(0, fmt.CODEBOOK_SIZE, (n, fmt.FRAME_TOKENS))


def looping(prefix: int, period: int, total: int, seed: int = 0) -> np.ndarray:
    """`prefix` distinct frames, then a run of `period` frames repeated until `total` frames."""
    head = frames(prefix + period, seed)
    return np.concatenate([head[:prefix], np.resize(head[prefix:], (total - prefix, fmt.FRAME_TOKENS))])


def first_fire(detector: LoopDetector, codes: np.ndarray, slot: int = 0) -> int | None:
    """Index of the frame at which `detector` first fires, frame by frame in `slot`."""
    for i, tokens in enumerate(fmt.codes_to_tokens(codes[j : j + 1]) for j in range(len(codes))):
        if detector.check([slot], [tokens])[0]:
            return i
    return None


@pytest.mark.parametrize("period", [1, 3, 8])
def test_loop_fires_once_the_last_k_frames_repeat_an_earlier_run(period: int):
    """A loop of period d (<= the window) fires at the frame that makes loop_frames frames equal the ones d before."""
    codes = looping(prefix=5, period=period, total=40)
    assert first_fire(LoopDetector(1, GUARD), codes) == 5 + period + GUARD.loop_frames - 1


def test_no_loop_in_varied_frames_or_past_the_window():
    """Distinct frames never fire, nor does a period longer than the window, nor a repeat shorter than loop_frames."""
    assert first_fire(LoopDetector(1, GUARD), frames(500, seed=1)) is None
    assert first_fire(LoopDetector(1, GUARD), looping(prefix=2, period=9, total=60)) is None
    short = frames(30, seed=2)
    short[10:13] = short[5:8]  # 3 frames repeated: under loop_frames
    assert first_fire(LoopDetector(1, GUARD), short) is None


def test_a_frame_equal_in_six_codes_is_not_a_repeat():
    """Frames are compared code for code: one differing code (any position) breaks the run."""
    codes = looping(prefix=3, period=2, total=30)
    codes[3::2, 6] = (codes[3::2, 6] + np.arange(len(codes[3::2]))) % fmt.CODEBOOK_SIZE  # a new last code each time
    assert first_fire(LoopDetector(1, GUARD), codes) is None


def test_slots_are_independent_and_reset():
    """Frames of one slot never match another's; a reset forgets the slot's history."""
    detector = LoopDetector(2, GUARD)
    loop, varied = looping(prefix=0, period=2, total=12), frames(12, seed=6)
    tokens = [[fmt.codes_to_tokens(c[i : i + 1]) for c in (loop, varied)] for i in range(12)]
    fired = [detector.check([0, 1], tokens[i]).tolist() for i in range(2 + GUARD.loop_frames)]
    assert fired[-1] == [True, False] and not any(any(f) for f in fired[:-1])
    detector.check([1], [tokens[6][0]])  # slot 1 picks up slot 0's loop: its own run starts from nothing
    assert detector.check([1], [tokens[7][0]]).tolist() == [False]
    detector.reset(0)
    assert detector.check([0], [tokens[6][0]]).tolist() == [False]


def test_duration_budget_counts_letters_wide_ones_heavier():
    """Budget = factor x letters at 12.5/s + margin, in whole frames; CJK letters count wide_letter_weight."""
    guard = GuardConfig(duration_factor=3.0, duration_margin_s=2.0, wide_letter_weight=3.0)
    assert spoken_letters("Hi, there!", 3.0) == 7
    assert spoken_letters("你好吗", 3.0) == 9
    budget = duration_budget("Hi, there!", guard)
    assert budget % fmt.FRAME_TOKENS == 0
    seconds = 3.0 * 7 * 0.08 + 2.0
    assert seconds <= budget / fmt.TOKENS_PER_SECOND < seconds + fmt.FRAME_TOKENS / fmt.TOKENS_PER_SECOND
    assert duration_budget("你好吗", guard) == duration_budget("abcdefghi", guard)


def test_the_first_guard_stop_is_the_reason():
    """Across pieces: a guard stop beats max_tokens, which beats end_of_speech; the first guard stop stays."""
    assert worse(SPEECH_ENDED, MAX_TOKENS) == MAX_TOKENS
    assert worse(MAX_TOKENS, SPEECH_ENDED) == MAX_TOKENS
    assert worse(DURATION, LOOP) == DURATION and worse(LOOP, DURATION) == LOOP
    assert worse(None, SPEECH_ENDED) == SPEECH_ENDED and worse(LOOP, None) == LOOP


# -- the scheduler stops pieces, driven by forced token sequences ----------------------------------


def run(scheduler: Scheduler, request: Request, script) -> list[list[int]]:
    """Step `request` to its end, the token at index i of each piece being `script(piece, i)`; its frames."""
    scheduler.admit(request)
    got: list[list[int]] = []
    while request.status is not RequestStatus.FINISHED:
        step = scheduler.schedule()
        decode = [script(r.piece, g) for r, g in zip(step.decode, step.generated, strict=True)]
        first = [script(c.request.piece, 0) for c in step.prefill if c.last]
        got += [ids for _, ids in scheduler.postprocess(step, decode, first).frames]
    return got


def tokens_of(codes: np.ndarray, end: bool = False):
    """A script speaking `codes` (n, 7), then END_OF_SPEECH if `end` (else the last frame's codes again)."""
    ids = fmt.codes_to_tokens(codes)
    return lambda i: fmt.END_OF_SPEECH if end and i >= len(ids) else ids[min(i, len(ids) - 1)]


def make(**kw) -> Scheduler:
    return Scheduler(max_slots=1, max_queue=0, max_tokens_per_slot=2048, prefill_chunk_tokens=64, **kw)


def test_a_looping_piece_stops_and_the_next_piece_starts():
    """Forced loop frames in piece 1 end it at detection (reason loop); piece 2 speaks and ends normally."""
    loop, normal = looping(prefix=4, period=3, total=40), frames(6, seed=3)
    scripts = [tokens_of(loop), tokens_of(normal, end=True)]
    request = Request("r", [[1] * 8, [2] * 8], SamplingParams(max_tokens=700), seed=0)
    got = run(make(loops=LoopDetector(1, GUARD)), request, lambda piece, i: scripts[piece](i))
    stopped_at = 4 + 3 + GUARD.loop_frames  # frames spoken of piece 1: up to and with the one that fired
    assert len(got) == stopped_at + len(normal)
    assert request.stop_reason == LOOP and request.num_generated == len(normal) * fmt.FRAME_TOKENS


def test_a_runaway_stops_at_its_duration_budget():
    """A piece that never ends stops at its budget (reason duration), which is never below min_tokens."""
    runaway = tokens_of(frames(400, seed=4))
    request = Request("r", [[1] * 8], SamplingParams(max_tokens=2000), seed=0, budgets=[140])
    assert len(run(make(), request, lambda piece, i: runaway(i))) == 20
    assert request.stop_reason == DURATION
    forced = Request("f", [[1] * 8], SamplingParams(max_tokens=2000, min_tokens=280), seed=0, budgets=[140])
    assert len(run(make(), forced, lambda piece, i: runaway(i))) == 40 and forced.stop_reason == DURATION
    capped = Request("c", [[1] * 8], SamplingParams(max_tokens=70), seed=0, budgets=[140])
    assert len(run(make(), capped, lambda piece, i: runaway(i))) == 10 and capped.stop_reason == MAX_TOKENS


def test_a_normal_utterance_is_not_stopped():
    """Varied frames ending with END_OF_SPEECH inside the budget: every frame out, reason end_of_speech."""
    normal = frames(30, seed=5)
    request = Request("r", [[1] * 8], SamplingParams(max_tokens=2000), seed=0, budgets=[700])
    got = run(make(loops=LoopDetector(1, GuardConfig())), request, lambda piece, i: tokens_of(normal, end=True)(i))
    assert got == [fmt.codes_to_tokens(normal[i : i + 1]) for i in range(len(normal))]
    assert request.stop_reason == SPEECH_ENDED
