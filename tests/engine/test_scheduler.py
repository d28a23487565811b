import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipecat_orpheus import format as fmt
from pipecat_orpheus.engine.request import Request, RequestStatus, SamplingParams
from pipecat_orpheus.engine.scheduler import Scheduler
from pipecat_orpheus.errors import EngineBusy, InvalidRequest

AUDIO = fmt.audio_token(0, 5)  # any audio id: the scheduler only looks for END_OF_SPEECH


def make_request(i: int, prompt_len: int = 10, max_tokens: int = 14, pieces: int = 1) -> Request:
    return Request(f"r{i}", [[1] * prompt_len] * pieces, SamplingParams(max_tokens=max_tokens), seed=i)


def make_scheduler(**kw) -> Scheduler:
    values = dict(max_slots=2, max_queue=2, max_tokens_per_slot=64, prefill_chunk_tokens=8)
    values.update(kw)
    return Scheduler(**values)


def run_step(s: Scheduler, token: int = AUDIO):
    step = s.schedule()
    first = [token for c in step.prefill if c.last]
    return step, s.postprocess(step, [token] * len(step.decode), first)


def test_admit_fills_slots_then_queue_then_busy():
    """Requests take free slots, then wait in the queue, and past max_queue admission fails fast."""
    s = make_scheduler()
    reqs = [make_request(i) for i in range(4)]
    for r in reqs:
        assert s.can_admit()
        s.admit(r)
    assert [r.status for r in reqs] == [RequestStatus.PREFILL] * 2 + [RequestStatus.WAITING] * 2
    assert (s.num_running, s.num_waiting) == (2, 2)
    assert not s.can_admit()
    with pytest.raises(EngineBusy):
        s.admit(make_request(9))


def test_prompt_too_long_for_slot_names_config_key():
    """A prompt that leaves no room for one frame is refused (a bad request: its text) with the config key to raise."""
    s = make_scheduler(max_tokens_per_slot=64)
    with pytest.raises(InvalidRequest, match="engine.max_tokens_per_slot") as e:
        s.admit(make_request(0, prompt_len=60))
    assert e.value.field == "text" and e.value.code == "bad_request"


def test_chunked_prefill_respects_budget_and_order():
    """Prefill is split into chunks within the per-step token budget, oldest request first."""
    s = make_scheduler(prefill_chunk_tokens=8)
    a, b = make_request(0, prompt_len=10), make_request(1, prompt_len=5)
    s.admit(a)
    s.admit(b)
    step, _ = run_step(s)
    assert [(c.request, c.start, c.end) for c in step.prefill] == [(a, 0, 8)]
    step, out = run_step(s)
    assert [(c.request, c.start, c.end, c.last) for c in step.prefill] == [(a, 8, 10, True), (b, 0, 5, True)]
    assert a.status is RequestStatus.DECODE and b.status is RequestStatus.DECODE
    assert a.output_ids == [[AUDIO]] and a.num_generated == 1


def test_prefill_budget_is_smaller_while_live_rows_decode():
    """A step that decodes prefills at most prefill_tokens_while_decoding, one without decode rows the whole chunk."""
    s = make_scheduler(max_slots=3, prefill_chunk_tokens=16, prefill_tokens_while_decoding=4)
    a, b, c = make_request(0, prompt_len=16), make_request(1, prompt_len=10), make_request(2, prompt_len=3)
    s.admit(a)
    step, _ = run_step(s)
    assert [(c.start, c.end) for c in step.prefill] == [(0, 16)] and not step.decode
    s.admit(b)
    s.admit(c)
    chunks = []
    while b.status is not RequestStatus.DECODE or c.status is not RequestStatus.DECODE:
        step, _ = run_step(s)
        assert step.decode and sum(x.end - x.start for x in step.prefill) <= 4
        chunks += [(x.request, x.start, x.end) for x in step.prefill]
    assert chunks == [(b, 0, 4), (b, 4, 8), (b, 8, 10), (c, 0, 2), (c, 2, 3)]


def test_decode_until_max_tokens_emits_frames_and_frees_slot():
    """A request emits one frame per 7 tokens, finishes at max_tokens, and a waiting one takes its slot."""
    s = make_scheduler(max_slots=1, prefill_chunk_tokens=64)
    a, b = make_request(0, max_tokens=14), make_request(1)
    s.admit(a)
    s.admit(b)
    frames, finished = [], []
    while a.status is not RequestStatus.FINISHED:
        _, out = run_step(s)
        frames += out.frames
        finished += out.finished
    assert [len(ids) for _, ids in frames] == [7, 7] and finished == [a]
    assert a.num_generated == 14 and a.slot is None
    assert b.status is RequestStatus.PREFILL and b.slot == 0


def test_end_of_speech_ends_piece_and_next_piece_reuses_slot():
    """END_OF_SPEECH ends the current piece; the next piece of the same request is prefilled in its slot."""
    s = make_scheduler(max_slots=1, prefill_chunk_tokens=64)
    r = make_request(0, pieces=2)
    s.admit(r)
    run_step(s)  # prefill piece 0 + first token
    assert r.status is RequestStatus.DECODE
    _, out = run_step(s, token=fmt.END_OF_SPEECH)
    assert r.piece == 1 and r.status is RequestStatus.PREFILL and r.slot == 0 and not out.finished
    run_step(s)
    _, out = run_step(s, token=fmt.END_OF_SPEECH)
    assert out.finished == [r] and r.output_ids == [[AUDIO, fmt.END_OF_SPEECH]] * 2


def test_rows_scheduled_past_end_of_speech_are_dropped():
    """Scheduled one step ahead, a row whose previous step sampled END_OF_SPEECH is stale: its token is dropped."""
    s = make_scheduler(max_slots=1, prefill_chunk_tokens=64)
    r = make_request(0, pieces=2)
    s.admit(r)
    run_step(s)  # piece 0 prefilled, first token
    k = s.schedule()
    k_next = s.schedule()  # scheduled before k's tokens are applied: r is assumed to go on
    assert k_next.decode == [r] and k_next.generated == [2]
    s.postprocess(k, [fmt.END_OF_SPEECH], [])
    assert r.piece == 1 and r.status is RequestStatus.PREFILL
    piece_1 = s.schedule()  # piece 1's prompt, scheduled before the stale step is applied
    assert [(c.request, c.last) for c in piece_1.prefill] == [(r, True)] and r.status is RequestStatus.DECODE
    out = s.postprocess(k_next, [AUDIO], [])
    assert not out.frames and r.output_ids == [[AUDIO, fmt.END_OF_SPEECH], []]
    s.postprocess(piece_1, [], [AUDIO])
    assert r.output_ids[1] == [AUDIO] and r.num_generated == 1


def test_rows_stop_being_scheduled_at_max_tokens():
    """A row is not scheduled past its piece's cap even before the tokens of the steps in flight are applied."""
    s = make_scheduler(max_slots=1, prefill_chunk_tokens=64)
    r = make_request(0, max_tokens=7)
    s.admit(r)
    steps = [s.schedule() for _ in range(9)]
    assert [len(step.decode) for step in steps] == [0] + [1] * 6 + [0, 0]
    for step in steps:
        s.postprocess(step, [AUDIO] * len(step.decode), [AUDIO] * sum(c.last for c in step.prefill))
    assert r.status is RequestStatus.FINISHED and r.output_ids == [[AUDIO] * 7]


def test_max_new_tokens_is_whole_frames_within_slot():
    """The per-piece cap is rounded down to whole frames and never overflows the slot."""
    s = make_scheduler(max_tokens_per_slot=64)
    r = make_request(0, prompt_len=20, max_tokens=2000)
    s.admit(r)
    assert r.max_new_tokens == 42  # 44 positions left -> 6 frames


def test_cancel_waiting_and_live_requests():
    """Cancelling a live request frees its slot for the oldest waiting one; cancelling a waiting one dequeues it."""
    s = make_scheduler(max_slots=1, max_queue=3)
    a, b, c = (make_request(i) for i in range(3))
    for r in (a, b, c):
        s.admit(r)
    assert s.cancel("r1") is b and b.status is RequestStatus.CANCELLED and s.num_waiting == 1
    assert s.cancel("r0") is a and a.status is RequestStatus.CANCELLED
    assert c.slot == 0 and c.status is RequestStatus.PREFILL
    assert s.cancel("r0") is None and s.cancel("nope") is None


def test_cancelled_request_tokens_are_ignored():
    """Tokens sampled in a step for a request cancelled before postprocess do not reach it."""
    s = make_scheduler()
    r = make_request(0, prompt_len=5)
    s.admit(r)
    run_step(s)
    step = s.schedule()
    s.cancel("r0")
    out = s.postprocess(step, [AUDIO] * len(step.decode), [])
    assert r.output_ids == [[AUDIO]] and not out.frames


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["submit", "cancel", "step", "eos"]), st.integers(0, 9)), max_size=80))
def test_interleavings_keep_invariants(ops):
    """Under any interleaving of joins, cancels and steps, slots are never shared or leaked and the queue is bounded."""
    s = make_scheduler(max_slots=3, max_queue=2, prefill_chunk_tokens=12)
    known: dict[str, Request] = {}
    n = 0
    for op, arg in ops:
        if op == "submit":
            r = make_request(n, prompt_len=5 + arg, max_tokens=7 + arg)
            n += 1
            busy = not s.can_admit()
            try:
                s.admit(r)
                known[r.request_id] = r
                assert not busy
            except EngineBusy:
                assert busy
        elif op == "cancel" and known:
            s.cancel(sorted(known)[arg % len(known)])
        else:
            run_step(s, token=fmt.END_OF_SPEECH if op == "eos" else AUDIO)
        live = [r for r in known.values() if r.is_live]
        waiting = [r for r in known.values() if r.status is RequestStatus.WAITING]
        assert len({r.slot for r in live}) == len(live) == s.num_running <= s.max_slots
        assert all(r.slot is None for r in known.values() if not r.is_live)
        assert len(waiting) == s.num_waiting <= s.max_queue
        assert not waiting or s.num_running == s.max_slots  # nobody waits while a slot is free
        for r in known.values():
            assert all(len(ids) <= r.max_new_tokens + 1 for ids in r.output_ids)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["submit", "cancel", "launch", "apply", "eos"]), st.integers(0, 9)), max_size=90)
)
def test_pipelined_interleavings_keep_invariants(ops):
    """Scheduling up to two steps ahead of their tokens, under any joins and cancels, keeps every invariant.

    Each request's pieces end with END_OF_SPEECH or at their cap, never hold a token of a stale row,
    and never run ahead of what was scheduled; draining leaves no slot taken.
    """
    s = make_scheduler(max_slots=3, max_queue=2, prefill_chunk_tokens=12)
    known: dict[str, Request] = {}
    in_flight = []

    def apply(token: int) -> None:
        step = in_flight.pop(0)
        s.postprocess(step, [token] * len(step.decode), [AUDIO] * sum(c.last for c in step.prefill))

    for op, arg in ops:
        if op == "submit" and s.can_admit():
            r = make_request(len(known), prompt_len=5 + arg, max_tokens=7 + arg, pieces=1 + arg % 2)
            s.admit(r)
            known[r.request_id] = r
        elif op == "cancel" and known:
            s.cancel(sorted(known)[arg % len(known)])
        elif op == "launch" and len(in_flight) < 2:
            in_flight.append(s.schedule())
        elif in_flight:
            apply(fmt.END_OF_SPEECH if op == "eos" else AUDIO)
        live = [r for r in known.values() if r.is_live]
        assert len({r.slot for r in live}) == len(live) == s.num_running <= s.max_slots
        for r in known.values():
            for ids in r.output_ids:
                assert len(ids) <= r.max_new_tokens + 1 and fmt.END_OF_SPEECH not in ids[:-1]
            assert r.num_generated <= r.num_scheduled or r.status is not RequestStatus.DECODE
    for _ in range(200):  # drain: every request finishes or was cancelled, every slot comes back
        in_flight.append(s.schedule())
        apply(AUDIO)
    while in_flight:
        apply(AUDIO)
    assert s.num_running == 0 and s.num_waiting == 0
    assert all(r.is_done for r in known.values())


def test_a_step_that_decodes_takes_the_budget_admission_gives_it_within_the_chunk():
    """An admission budget replaces prefill_tokens_while_decoding in a decoding step, within prefill_chunk_tokens."""
    s = make_scheduler(max_slots=3, prefill_chunk_tokens=16, prefill_tokens_while_decoding=4)
    a, b, c = make_request(0, prompt_len=16), make_request(1, prompt_len=10), make_request(2, prompt_len=20)
    s.admit(a)
    run_step(s)
    s.admit(b)
    s.admit(c)
    step = s.schedule(prefill_budget=12)
    assert step.decode and [(x.request, x.start, x.end) for x in step.prefill] == [(b, 0, 10), (c, 0, 2)]
    step = s.schedule(prefill_budget=64)
    assert [(x.request, x.start, x.end) for x in step.prefill] == [(c, 2, 18)] and step.prefill_tokens == 16
