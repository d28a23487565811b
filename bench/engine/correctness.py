"""Greedy correctness of the engine's runner against the reference path, on the same random model.

The runner (CUDA graphs, Triton kernels where they run, requests joining one per step) against
`reference.generate_tokens` (transformers + DynamicCache): position and prefix match rates, and
the relative error of the first-step logits over the audio head rows. Used by `bench.engine.run`
and `bench.engine.numerics`.
"""

from __future__ import annotations

import gc

import torch

from pipecat_orpheus import format as fmt
from pipecat_orpheus.config import EngineConfig
from pipecat_orpheus.engine import SamplingParams
from pipecat_orpheus.engine.attention import triton_available
from pipecat_orpheus.engine.model import OrpheusLM
from pipecat_orpheus.engine.request import Request
from pipecat_orpheus.engine.runner import ModelRunner
from pipecat_orpheus.engine.sampler import N_HEAD_ROWS
from pipecat_orpheus.engine.scheduler import Scheduler
from pipecat_orpheus.reference import generate_tokens


def first_difference(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def hf_first_logits(llm, prompt: list[int], device) -> torch.Tensor:
    """transformers' logits of the first audio token over the head rows (audio tokens + END_OF_SPEECH), float32."""
    rows = torch.cat([torch.arange(fmt.AUDIO_TOKEN_OFFSET, fmt.AUDIO_TOKEN_END), torch.tensor([fmt.END_OF_SPEECH])])
    with torch.inference_mode():
        return llm(torch.tensor([prompt], device=device)).logits[0, -1].float()[rows.to(device)]


def engine_first_logits(lm: OrpheusLM, prompt: list[int], device) -> torch.Tensor:
    """The engine's prefill + head at the same position (its fused kernels where Triton runs), float32."""
    n = len(prompt)
    shape = (lm.num_layers, 1, lm.num_kv_heads, 256, lm.head_dim)
    kc, vc = torch.zeros(shape, dtype=lm.dtype, device=device), torch.zeros(shape, dtype=lm.dtype, device=device)
    with torch.inference_mode():
        hidden = lm.forward(
            torch.tensor(prompt, device=device), torch.arange(n, device=device),
            torch.zeros(n, dtype=torch.long, device=device), kc, vc, n, triton_available(device),
        )  # fmt: skip
        return lm.head_logits(hidden[-1:])[0, :N_HEAD_ROWS]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return float((a - b).norm() / b.norm())


def correctness(llm, tokenizer, device, args, kv_cache_dtype: str, ref: list | None) -> tuple[dict, list]:
    """Greedy runner tokens (graphs + kernels, staggered joins) vs reference.generate_tokens."""
    greedy = SamplingParams(temperature=0.0, repetition_penalty=1.1, max_tokens=args.check_tokens)
    texts = ["Hello there, how are you?", "The quick brown fox.", "One more sentence to check."][: args.check_prompts]
    prompts = [fmt.build_prompt(tokenizer, t, "tara") for t in texts]
    cfg = EngineConfig(
        max_slots=8, max_tokens_per_slot=256, prefill_chunk_tokens=16, cuda_graphs=True, kv_cache_dtype=kv_cache_dtype
    )
    runner = ModelRunner(OrpheusLM(llm, max_positions=256), cfg)
    runner.capture_graphs()
    sched = Scheduler(max_slots=8, max_queue=8, max_tokens_per_slot=256, prefill_chunk_tokens=16)
    reqs = [Request(f"c{i}", [p], greedy, seed=0) for i, p in enumerate(prompts)]
    step_no = 0
    while any(not r.is_done for r in reqs) or step_no < len(reqs):
        if step_no < len(reqs):
            sched.admit(reqs[step_no])  # one joins per step: prefill interleaves with decode
        step = sched.schedule()
        if not step.empty:
            dec, first = runner.step(step)
            sched.postprocess(step, dec.tolist(), first.tolist())
        step_no += 1
    ref = ref or [list(generate_tokens(llm, p, greedy)) for p in prompts]
    got = [[t for t in r.output_ids[0] if t != fmt.END_OF_SPEECH] for r in reqs]
    prefix = [first_difference(g, e) for g, e in zip(got, ref, strict=True)]
    same = [sum(a == b for a, b in zip(g, e, strict=False)) for g, e in zip(got, ref, strict=False)]
    rel = relative_error(engine_first_logits(runner.lm, prompts[0], device), hf_first_logits(llm, prompts[0], device))
    del runner
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    total = sum(len(e) for e in ref)
    return {
        "kv_cache_dtype": kv_cache_dtype,
        "prompts": len(prompts),
        "tokens_per_prompt": args.check_tokens,
        "identical_sequences": sum(g == e for g, e in zip(got, ref, strict=False)),
        "matching_prefix_tokens": prefix,
        "position_match_rate": sum(same) / max(total, 1),
        "prefix_match_rate": sum(prefix) / max(total, 1),
        "first_step_logits_rel_err": rel,
    }, ref
