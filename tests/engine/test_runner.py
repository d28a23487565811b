import random

import pytest
import torch

from pipecat_orpheus import format as fmt
from pipecat_orpheus.config import EngineConfig
from pipecat_orpheus.engine.model import OrpheusLM
from pipecat_orpheus.engine.request import Request, SamplingParams
from pipecat_orpheus.engine.runner import ModelRunner, check_kv_fits
from pipecat_orpheus.engine.scheduler import Scheduler
from pipecat_orpheus.errors import ModelLoadError
from pipecat_orpheus.graphs import step_buckets
from pipecat_orpheus.loader import load_llm
from pipecat_orpheus.reference import generate_tokens

GREEDY = SamplingParams(temperature=0.0, repetition_penalty=1.1, max_tokens=21)
TEXTS = ["hello there", "a longer sentence, so that its prompt is prefilled in chunks", "hi", "x y z"]


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    model, tokenizer = load_llm(str(tiny_model_dir / "llm"), dtype=torch.float32, device="cpu")
    prompts = [fmt.build_prompt(tokenizer, t, "tara") for t in TEXTS]
    expected = [list(generate_tokens(model, p, GREEDY)) for p in prompts]
    return model, prompts, expected


def make(model, slots=3, chunk=8):
    config = EngineConfig(max_slots=slots, max_tokens_per_slot=128, prefill_chunk_tokens=chunk, max_queue=8)
    runner = ModelRunner(OrpheusLM(model, max_positions=128), config)
    scheduler = Scheduler(max_slots=slots, max_queue=8, max_tokens_per_slot=128, prefill_chunk_tokens=chunk)
    return runner, scheduler


def test_step_buckets_cover_every_batch_size():
    """The ladder starts at 1, ends at the slot count, is increasing, and has a bucket for every batch size."""
    for slots in (1, 3, 8, 100, 256, 300):
        ladder = step_buckets(slots)
        assert ladder[0] == 1 and ladder[-1] == slots and ladder == sorted(set(ladder))
    assert step_buckets(256)[:6] == [1, 2, 4, 8, 16, 32]


def test_kv_cache_that_does_not_fit_names_the_keys():
    """A KV cache larger than the free memory share fails at start, naming the config keys to lower."""
    config = EngineConfig(max_slots=256, max_tokens_per_slot=2048, gpu_memory_fraction=0.9)
    check_kv_fits(10 * 2**30, 80 * 2**30, config)
    with pytest.raises(ModelLoadError, match="engine.max_slots.*engine.max_tokens_per_slot"):
        check_kv_fits(60 * 2**30, 40 * 2**30, config)


@pytest.mark.parametrize("pipelined", [False, True])
def test_greedy_tokens_match_reference_under_joins_and_cancels(setup, pipelined):
    """Greedy decoding through scheduler + runner equals the reference, whatever joins and cancels interleave.

    Pipelined as the engine runs it: step k+1 is scheduled and launched before step k's tokens
    are collected and applied. Some requests speak two pieces in one slot.
    """
    model, prompts, expected = setup
    runner, scheduler = make(model)
    rng = random.Random(0)
    pending = list(range(len(prompts))) * 2  # every prompt twice: one copy may get cancelled
    rng.shuffle(pending)
    reqs: list[tuple[list[int], Request]] = []
    cancelled: set[str] = set()
    in_flight = None
    while pending or any(not r.is_done for _, r in reqs) or in_flight:
        if pending and rng.random() < 0.4 and scheduler.can_admit():
            pieces = [pending.pop()] + ([pending.pop()] if len(pending) > 1 and rng.random() < 0.3 else [])
            r = Request(f"r{len(reqs)}", [prompts[i] for i in pieces], GREEDY, seed=0)
            scheduler.admit(r)
            reqs.append((pieces, r))
        live = [r for _, r in reqs if not r.is_done]
        if live and rng.random() < 0.08:
            victim = rng.choice(live)
            scheduler.cancel(victim.request_id)
            cancelled.add(victim.request_id)
        step = scheduler.schedule()
        if not step.empty:
            runner.launch(step)
        if in_flight is not None:
            decoded, first = runner.collect()
            scheduler.postprocess(in_flight, decoded.tolist(), first.tolist())
        in_flight = None if step.empty else step
        if not pipelined and in_flight is not None:
            decoded, first = runner.collect()
            scheduler.postprocess(in_flight, decoded.tolist(), first.tolist())
            in_flight = None
    for pieces, r in reqs:
        got = [[t for t in ids if t != fmt.END_OF_SPEECH] for ids in r.output_ids]
        want = [expected[i] for i in pieces]
        if r.request_id in cancelled:
            flat, flat_want = sum(got, []), sum(want, [])
            assert flat == flat_want[: len(flat)]  # a prefix, then nothing more
        else:
            assert got == want
    assert sum(r.request_id not in cancelled for _, r in reqs) >= len(prompts) // 2


def test_padding_rows_do_not_change_live_rows(setup):
    """Decode rows padded up to a graph bucket (dummy slot) give the same tokens as the exact batch."""
    model, prompts, expected = setup
    runner, scheduler = make(model, slots=4, chunk=64)
    runner._buckets = [4]  # as if graphs were captured for batch 4 only: 2 live rows + 2 padding rows
    reqs = [Request(f"r{i}", [prompts[i]], GREEDY, seed=0) for i in (0, 2)]
    for r in reqs:
        scheduler.admit(r)
    while any(not r.is_done for r in reqs):
        step = scheduler.schedule()
        decoded, first = runner.step(step)
        scheduler.postprocess(step, decoded.tolist(), first.tolist())
    assert [r.output_ids[0] for r in reqs] == [expected[0], expected[2]]


def test_fp8_kv_cache_halves_memory_and_stays_close(setup):
    """An fp8 KV cache takes a quarter of float32's bytes and its first logits stay close to the exact cache's."""
    model, prompts, _ = setup
    lm = OrpheusLM(model, max_positions=128)
    logits = []
    for kv in ("auto", "fp8"):
        config = EngineConfig(max_slots=2, max_tokens_per_slot=128, kv_cache_dtype=kv)
        runner = ModelRunner(lm, config)
        assert runner.k_cache.dtype == (torch.float8_e4m3fn if kv == "fp8" else torch.float32)
        n = len(prompts[1])
        with torch.inference_mode():
            hidden = lm.forward(
                torch.tensor(prompts[1]), torch.arange(n), torch.zeros(n, dtype=torch.long), runner.k_cache,
                runner.v_cache, n, False,
            )  # fmt: skip
            logits.append(lm.head_logits(hidden[-1:]))
    exact, fp8 = logits
    assert (exact - fp8).norm() / exact.norm() < 0.1
    assert ModelRunner(
        lm, EngineConfig(max_slots=2, max_tokens_per_slot=128, kv_cache_dtype="fp8")
    ).kv_cache_bytes() * 4 == (ModelRunner(lm, EngineConfig(max_slots=2, max_tokens_per_slot=128)).kv_cache_bytes())


def test_prefill_warm_up_touches_only_the_dummy_slot(setup):
    """Warming every prefill shape up writes the dummy slot's cache only, and live requests decode as before."""
    model, prompts, expected = setup
    runner, scheduler = make(model, slots=2, chunk=40)
    runner.warm_up(force=True)
    assert not runner.k_cache[:, : runner.dummy_slot].any() and runner.k_cache[:, runner.dummy_slot].any()
    r = Request("r", [prompts[0]], GREEDY, seed=0)
    scheduler.admit(r)
    while not r.is_done:
        step = scheduler.schedule()
        decoded, first = runner.step(step)
        scheduler.postprocess(step, decoded.tolist(), first.tolist())
    assert r.output_ids[0] == expected[0]
