"""Admission from the streams' playback slack: the step-time model, slack, prefill budget, headroom and busy."""

import asyncio
import dataclasses

import numpy as np
import pytest

from pipecat_orpheus import format as fmt
from pipecat_orpheus.codec import SnacCodec
from pipecat_orpheus.codec.feed import decode_wait_s
from pipecat_orpheus.codec.stream import FRAME_S, CodecStream
from pipecat_orpheus.config import EngineConfig
from pipecat_orpheus.engine import OrpheusEngine
from pipecat_orpheus.engine.admission import REALTIME_STEP_S, Admission, StepModel, steps_to_frame
from pipecat_orpheus.engine.request import Request, RequestStatus, SamplingParams
from pipecat_orpheus.engine.scheduler import Scheduler
from pipecat_orpheus.errors import EngineBusy
from pipecat_orpheus.speech import speech_for
from tests.engine.test_engine import make_config
from tests.helpers import until

AUDIO = fmt.audio_token(0, 5)  # any audio id: the scheduler only looks for END_OF_SPEECH
CODES = np.zeros(fmt.FRAME_TOKENS, dtype=np.int64)  # one frame's codes: the codec streams only count frames
# a GPU-like step: 6 ms per forward (the weights), 20 us per decode row, 30 us per prompt token
MODEL = StepModel(fixed_s=6e-3, row_s=20e-6, token_s=30e-6, mixed_tokens=32, rate=0.0)
TIGHT = dataclasses.replace(MODEL, row_s=100e-6)  # 40 streams at 1.2x real time, 60 at 1.0x: little slack to spend
STEP_EWMA = 0.1  # codec.feed's weight of the newest step in the step time the codec streams are timed with


def engine_config(**kw) -> EngineConfig:
    values = dict(
        max_slots=128, max_tokens_per_slot=512, max_queue=128, prefill_chunk_tokens=512,
        prefill_tokens_while_decoding=32, admission_margin_ms=10.0,
    )  # fmt: skip
    return EngineConfig(**(values | kw))


def test_step_model_prices_rows_tokens_and_a_second_forward():
    """A step costs one forward plus its rows and padded tokens; past the mixed graphs' size, a second forward."""
    m = MODEL
    assert m.step_s(0) == 0.0
    assert m.step_s(10) == pytest.approx(6e-3 + 10 * 20e-6)
    assert m.step_s(10, 20) == pytest.approx(6e-3 + 10 * 20e-6 + 32 * 30e-6)  # 20 tokens run padded to 32
    assert m.step_s(10, 40) == pytest.approx(2 * 6e-3 + 10 * 20e-6 + 48 * 30e-6)  # decode graph, then prefill
    assert m.step_s(0, 40) == pytest.approx(6e-3 + 48 * 30e-6)  # no decode rows: one forward


def test_step_model_learns_what_the_steps_show_beyond_the_gpu():
    """Steps of 100 rows that take 1 ms longer than the GPU's measurement teach the model that, bounded per step."""
    m = dataclasses.replace(MODEL, rate=0.05)
    truth = MODEL.step_s(100) + 1e-3
    for _ in range(200):
        m.learn(100, 0, truth)
    assert m.step_s(100) == pytest.approx(truth, rel=1e-3)
    assert m.step_s(20) == pytest.approx(MODEL.step_s(20) + 1e-3, rel=1e-3)  # a batch not seen: the nearest one's
    before = m.step_s(100)
    m.learn(100, 0, 1.0)  # a one-off stall of a second moves the model by at most `rate` of its prediction
    assert m.step_s(100) <= before * 1.05 + 1e-12
    m.learn(100, 64, 1.0)  # a step with a second forward (a prefill) teaches nothing
    assert m.step_s(100) <= before * 1.05 + 1e-12


def test_a_few_streams_overhead_is_not_read_as_a_per_row_cost():
    """An overhead per step seen at 1-40 streams leaves the real-time capacity where that overhead puts it.

    Read as a per-row cost (a slope fitted where only a few rows ran) it would cut the capacity
    several times over: the engine would refuse streams with most of the GPU idle.
    """
    m = dataclasses.replace(MODEL, rate=0.05)
    overhead = 1.5e-3  # the codec's windows and the host's work, per step
    for i in range(4000):
        rows = 1 + i % 40
        m.learn(rows, 0, MODEL.step_s(rows) + overhead)
    expected = int((REALTIME_STEP_S - MODEL.fixed_s - overhead) / MODEL.row_s)
    assert abs(m.capacity(1.0, 10_000) - expected) <= 2
    for _ in range(400):  # at 160 rows each row turns out to cost twice the start's figure: the estimate follows
        m.learn(160, 0, MODEL.step_s(160) + 160 * MODEL.row_s + overhead)
    assert m.capacity(1.0, 10_000) < expected - 100


def test_a_streams_slack_is_its_audio_handed_out_minus_what_has_played():
    """The deadline of a live stream is frame 0's hand-out plus the audio handed out since; none before or after."""
    s = CodecStream(0, left_context=2, lookahead=2)
    assert s.deadline_s is None
    s.push(CODES, now=10.0, wait_s=0.0)  # frame 0 goes out at once: playback starts at 10.0
    assert s.deadline_s == pytest.approx(10.0 + FRAME_S)
    for t in (10.01, 10.02, 10.03):  # frames 1-3 come faster than they play: frame 1 goes out with its lookahead
        s.push(CODES, now=t, wait_s=0.0)
    assert s.deadline_s == pytest.approx(10.0 + 2 * FRAME_S)
    s.finish()
    assert s.deadline_s is None


def test_steps_to_frame_counts_the_tokens_left_in_the_current_frame():
    """A decoding request needs the rest of its frame (the step in flight counted); one that prefills a whole frame."""
    r = Request("r", [[1] * 8], SamplingParams(), seed=0)
    r.status, r.num_scheduled = RequestStatus.DECODE, 7
    assert steps_to_frame(r) == 0
    r.num_scheduled = 9
    assert steps_to_frame(r) == 5
    r.status = RequestStatus.PREFILL
    assert steps_to_frame(r) == fmt.FRAME_TOKENS


def test_prefill_budget_is_what_the_tightest_stream_allows():
    """The budget is the largest padded size whose step fits the smallest slack, never below the floor."""
    a = Admission(engine_config(), MODEL)
    rows, in_flight = 50, MODEL.step_s(50, 32)
    floor_step = MODEL.step_s(rows, 32)
    # a stream due in 60 ms with 3 steps to its next frame: 60 - 3 floor steps - the step in flight - 10 ms margin
    allowed = 0.060 - 3 * floor_step - in_flight - 0.010
    budget = a.prefill_budget(0.0, [(0.060, 3), (0.500, 6)], rows, in_flight)
    assert budget % 16 == 0 and MODEL.step_s(rows, budget) <= allowed < MODEL.step_s(rows, budget + 16)
    assert 32 < budget < 512
    assert a.prefill_budget(0.0, [(0.030, 0)], rows, in_flight) == 32  # no slack: the floor
    assert a.prefill_budget(0.0, [], rows, in_flight) == 512  # nobody playing yet: the whole chunk
    assert a.prefill_budget(0.0, [(100.0, 6)], rows, in_flight) == 512


# -- a burst in simulated time --------------------------------------------------------------------


def simulate(
    policy: str | None, *, model=TIGHT, live: int = 40, burst: int = 20, prompt: int = 192, frames: int = 48
) -> dict:
    """`live` streams arriving over 2 s, then `burst` more at 3 s, through the real scheduler, admission, codec streams.

    The clock advances by `MODEL`'s step time, with the engine's pipeline: a step is sized while
    the one before it runs, its frames are handed out when it is collected, and their audio
    arrives when the next step ends (its SNAC decode queues behind it). `policy` None gives every
    step the whole chunk, whatever the streams hold. Returns first-token times, late chunks, steps.
    """
    config = engine_config(admission=policy or "slack")
    admission = Admission(config, model)
    scheduler = Scheduler(
        max_slots=config.max_slots, max_queue=config.max_queue, max_tokens_per_slot=config.max_tokens_per_slot,
        prefill_chunk_tokens=config.prefill_chunk_tokens,
        prefill_tokens_while_decoding=config.prefill_tokens_while_decoding,
    )  # fmt: skip
    sampling = SamplingParams(max_tokens=frames * fmt.FRAME_TOKENS)
    arrivals = [(2.0 * i / live, Request(f"live{i}", [[1] * prompt], sampling, seed=i)) for i in range(live)]
    arrivals += [(3.0, Request(f"burst{i}", [[1] * prompt], sampling, seed=i)) for i in range(burst)]
    codecs: dict[Request, CodecStream] = {}
    chunks: dict[Request, list[tuple[float, int]]] = {}  # (arrival, frames) of each chunk
    arrived: dict[Request, float] = {}
    first_token: dict[Request, float] = {}
    now, gpu_end, step_s, in_flight, steps, burst_steps = 0.0, 0.0, None, None, 0, 0
    while arrivals or in_flight or scheduler.num_running:
        while arrivals and arrivals[0][0] <= now:
            t, request = arrivals.pop(0)
            scheduler.admit(request)
            codecs[request], chunks[request], arrived[request] = CodecStream(0, 2, 2), [], t
        budget = None
        if policy is None:
            budget = config.prefill_chunk_tokens
        elif policy == "slack" and scheduler.num_prefilling:
            streams = [(c.deadline_s, steps_to_frame(r)) for r, c in codecs.items() if c.deadline_s is not None]
            rows = scheduler.num_running - scheduler.num_prefilling
            in_flight_s = model.step_s(len(in_flight[0].decode), in_flight[0].prefill_tokens) if in_flight else 0.0
            budget = admission.prefill_budget(now, streams, rows, in_flight_s)
        step = scheduler.schedule(budget)
        launched = None
        if not step.empty:
            gpu_end = max(now, gpu_end) + model.step_s(len(step.decode), step.prefill_tokens)
            launched = (step, gpu_end)
            steps += 1
            burst_steps += any(c.request.request_id.startswith("burst") for c in step.prefill)
        if in_flight is None:
            now = gpu_end if launched else arrivals[0][0]
        else:
            done, end = in_flight
            step_s = end - now if step_s is None else step_s + STEP_EWMA * (end - now - step_s)
            now = end
            out = scheduler.postprocess(done, [AUDIO] * len(done.decode), [AUDIO] * sum(c.last for c in done.prefill))
            for c in done.prefill:
                first_token.setdefault(c.request, now) if c.last else None
            delivered_at = gpu_end if launched else now  # SNAC queues behind the step just launched
            for request, _ in out.frames:
                for w in codecs[request].push(CODES, now=now, wait_s=decode_wait_s(step_s, 1.25)):
                    chunks[request].append((delivered_at, w.emit))
            for request in out.finished:
                chunks[request] += [(delivered_at, w.emit) for w in codecs.pop(request).finish()]
        in_flight = launched
    late = 0
    for got in chunks.values():
        start, played = got[0][0], 0
        for t, n in got:
            late += t > start + played * FRAME_S + 1e-9
            played += n
    ttft = [first_token[r] - arrived[r] for r in first_token if r.request_id.startswith("burst")]
    return {"late": late, "burst_ttft_p95": float(np.percentile(ttft, 95)), "burst_steps": burst_steps, "steps": steps}


def test_a_burst_joins_in_fewer_steps_without_a_late_chunk():
    """Slack admission prefills a burst in far fewer steps than the fixed budget, and no stream goes late.

    Giving every step the whole chunk regardless of the streams' slack does make streams late:
    the simulation can see lateness, and the slack is what keeps it away.
    """
    slack, fixed, greedy = simulate("slack"), simulate("fixed"), simulate(None)
    assert slack["late"] == 0 and fixed["late"] == 0
    assert greedy["late"] > 0
    assert slack["burst_steps"] * 2 <= fixed["burst_steps"]
    assert slack["burst_ttft_p95"] <= 0.6 * fixed["burst_ttft_p95"]


# -- headroom and busy -----------------------------------------------------------------------------


def test_capacity_and_headroom_follow_the_step_model():
    """Real-time capacity is the batch whose step still fits 1/82 s (times the speed); headroom what is left of it."""
    a = Admission(engine_config(max_slots=1000, busy_below_speed=1.0), MODEL)
    capacity = int((REALTIME_STEP_S - MODEL.fixed_s) / MODEL.row_s)
    assert a.capacity() == capacity and MODEL.step_s(capacity) <= REALTIME_STEP_S < MODEL.step_s(capacity + 1)
    assert a.headroom(capacity - 5) == 5 and a.headroom(capacity + 5) == 0
    assert Admission(engine_config(max_slots=100), MODEL).capacity() == 100  # within the slots
    faster = Admission(engine_config(max_slots=1000, busy_below_speed=1.2), MODEL)
    assert faster.capacity() == int((REALTIME_STEP_S / 1.2 - MODEL.fixed_s) / MODEL.row_s)


def test_busy_before_every_stream_would_run_below_real_time():
    """Past the real-time capacity a new request is refused, naming the key; one stream is always admitted."""
    a = Admission(engine_config(max_slots=1000, busy_below_speed=1.0), MODEL)
    a.check(a.capacity() - 1)
    with pytest.raises(EngineBusy, match="engine.busy_below_speed"):
        a.check(a.capacity())
    slow = Admission(engine_config(busy_below_speed=1.0), dataclasses.replace(MODEL, fixed_s=0.02))
    assert slow.capacity() == 0
    slow.check(0)  # even one stream is slower than real time: it runs, alone
    with pytest.raises(EngineBusy):
        slow.check(1)
    Admission(engine_config(max_slots=1000, busy_below_speed=0.0), MODEL).check(10**6)  # off: slots and queue only
    Admission(engine_config(max_slots=100, busy_below_speed=1.0), MODEL).check(10**6)  # the slots bind first


async def test_the_engine_refuses_past_its_real_time_capacity_and_counts_its_headroom(tiny_models, tiny_model_dir):
    """With a step model that allows two streams in real time, a third is refused with busy; headroom counts down."""
    config = make_config(tiny_model_dir, **{"engine.busy_below_speed": 1.0})  # three slots
    model = StepModel(fixed_s=2e-3, row_s=4e-3, token_s=0.0, mixed_tokens=16, rate=0.0)  # 2 rows: 10 ms, 3: 14 ms
    llm, tokenizer, snac = tiny_models
    engine = OrpheusEngine(llm, tokenizer, SnacCodec(snac, config.codec, "cpu"), config=config.engine, step_model=model)
    speech = speech_for(engine, config)
    sampling = SamplingParams(max_tokens=14, seed=1)
    try:
        assert engine.admission.capacity() == 2
        first, second = speech.submit("one", sampling=sampling), speech.submit("two", sampling=sampling)
        with pytest.raises(EngineBusy, match="engine.busy_below_speed"):
            speech.submit("three", sampling=sampling)
        assert engine.admission.headroom(engine.active_requests) == 0
        await asyncio.gather(first.read_all(), second.read_all())
        speech.submit("three", sampling=sampling).cancel()  # room again once they are done
        await until(lambda: engine.active_requests == 0)  # the cancel is applied at the next step
        assert speech.engine_stats[0].headroom == engine.stats.headroom == 2
    finally:
        engine.close()
