"""Benchmark of the batched engine (pipecat_orpheus/engine) on an Orpheus-3B-shaped random model.

Random bf16 weights with the real sizes (the compute of Orpheus 3B; the sound is noise) and a
real-size random SNAC, both built in-process. In one run:
  1. the measured copy bandwidth and the bandwidth floor of a decode step;
  2. baselines: transformers `generate` (eager DynamicCache, and static cache) at batch 1 and 64;
  3. correctness: greedy tokens of the engine's runner (CUDA graphs, Triton kernels) vs the
     reference path (`reference.generate_tokens`, transformers + DynamicCache), as a match rate;
  4. decode-step GPU time per batch size (graph replay) vs the floor, and a kernel profile;
  5. a concurrency sweep of ~20 s streams through `OrpheusEngine.submit` with the codec on:
     time to first audio, gaps between chunks, per-stream real-time factor, underruns
     (a chunk arriving after the audio before it finished playing), tokens/s, GPU memory.
Writes engine_h100.json and engine_h100.png to --out-dir and prints a short table.

  python bench/bench_engine.py --out-dir bench/results          # GPU
  python bench/bench_engine.py --tiny --out-dir /tmp/bench       # quick CPU check of the script
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipecat_orpheus import format as fmt
from pipecat_orpheus.codec import SnacCodec
from pipecat_orpheus.config import EngineConfig, load_config
from pipecat_orpheus.engine import OrpheusEngine, SamplingParams
from pipecat_orpheus.engine.model import OrpheusLM
from pipecat_orpheus.engine.request import Request
from pipecat_orpheus.engine.runner import ModelRunner
from pipecat_orpheus.engine.sampler import N_HEAD_ROWS
from pipecat_orpheus.engine.scheduler import Scheduler
from pipecat_orpheus.reference import generate_tokens
from pipecat_orpheus.testing import make_tiny_tokenizer, tiny_llama_config, tiny_snac_config

REAL_LLAMA = dict(
    hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
    head_dim=128,
)  # fmt: skip
REAL_SNAC = dict(
    sampling_rate=24000, encoder_dim=48, encoder_rates=[2, 4, 8, 8], decoder_dim=1024, decoder_rates=[8, 8, 4, 2],
    attn_window_size=None, codebook_size=4096, codebook_dim=8, vq_strides=[4, 2, 1], noise=True, depthwise=True,
)  # fmt: skip
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine_report import plot, summary_table  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus written."""
    if device.type != "cuda":
        return float("nan")
    x = torch.empty(2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    sync(device)
    return 2 * 10 * x.numel() / (start.elapsed_time(end) / 1e3)


def build(args, device, dtype):
    """The random Orpheus-shaped LLM, its tokenizer and a random SNAC."""
    from snac import SNAC
    from transformers import AutoTokenizer, LlamaForCausalLM

    cfg = tiny_llama_config(**({} if args.tiny else REAL_LLAMA))
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            llm = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    llm.generation_config.eos_token_id = fmt.END_OF_SPEECH
    tok_dir = Path(tempfile.mkdtemp()) / "tok"
    make_tiny_tokenizer(tok_dir)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    snac = SNAC(**(tiny_snac_config() if args.tiny else REAL_SNAC)).to(device).eval()
    return llm, tokenizer, snac


def weight_bytes(lm: OrpheusLM) -> int:
    """Bytes a decode step must read: every layer matrix, the norms and the audio head rows."""
    n = sum(t.numel() for layer in lm.layers for t in (layer.qkv, layer.o, layer.gate_up, layer.down))
    return (n + N_HEAD_ROWS * lm.head.shape[1]) * lm.dtype.itemsize


def kv_bytes_per_token(lm: OrpheusLM, kv_dtype: torch.dtype) -> int:
    return 2 * lm.num_layers * lm.num_kv_heads * lm.head_dim * kv_dtype.itemsize


# -- baselines -------------------------------------------------------------------------------------


def hf_baseline(llm, device, batch: int, new_tokens: int, static: bool) -> float:
    """transformers `generate` tokens/s (greedy, fixed length) at `batch`; no torch.compile (minutes per shape)."""
    ids = torch.randint(1000, 2000, (batch, 32), device=device)
    kwargs = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids), disable_compile=True)
    if static:
        kwargs["cache_implementation"] = "static"
    with torch.inference_mode():
        llm.generate(ids, max_new_tokens=4, min_new_tokens=4, **kwargs)
        sync(device)
        t0 = time.perf_counter()
        llm.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        sync(device)
    return batch * new_tokens / (time.perf_counter() - t0)


# -- correctness -----------------------------------------------------------------------------------


def first_difference(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


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
            dec, first = runner.step(step.decode, step.prefill)
            sched.postprocess(step, dec.tolist(), first.tolist())
        step_no += 1
    ref = ref or [list(generate_tokens(llm, p, greedy)) for p in prompts]
    got = [[t for t in r.output_ids[0] if t != fmt.END_OF_SPEECH] for r in reqs]
    prefix = [first_difference(g, e) for g, e in zip(got, ref, strict=True)]
    same = [sum(a == b for a, b in zip(g, e, strict=False)) for g, e in zip(got, ref, strict=False)]
    with torch.inference_mode():  # logits of the first audio token: engine prefill vs transformers
        shape = (runner.lm.num_layers, 2, runner.lm.num_kv_heads, 256, runner.lm.head_dim)
        kc, vc = (
            torch.zeros(shape, dtype=runner.lm.dtype, device=device),
            torch.zeros(shape, dtype=runner.lm.dtype, device=device),
        )
        p = prompts[0]
        hidden = runner.lm.prefill(
            torch.tensor([p], device=device), torch.arange(len(p), device=device)[None],
            torch.tensor([0], device=device), kc, vc, dummy_slot=1, max_end=len(p), use_triton=runner.use_triton,
        )  # fmt: skip
        ours = runner.lm.logits(hidden[:, -1])[0, :N_HEAD_ROWS]
        rows = torch.cat([torch.arange(fmt.AUDIO_TOKEN_OFFSET, fmt.AUDIO_TOKEN_END), torch.tensor([fmt.END_OF_SPEECH])])
        theirs = llm(torch.tensor([p], device=device)).logits[0, -1].float()[rows.to(device)]
        rel = float((ours - theirs).norm() / theirs.norm())
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


# -- decode-step timing and profile ---------------------------------------------------------------


def step_timing(engine: OrpheusEngine, device, batches: list[int], context: int, bw: float) -> list[dict]:
    """GPU time of one decode step (graph replay) at each batch size, all rows at `context` tokens."""
    runner = engine.runner
    out = []
    wbytes = weight_bytes(runner.lm)
    for b in batches:
        if b > runner.max_slots:
            continue
        runner._dev_in[:, :b] = torch.stack(
            [torch.arange(b), torch.full((b,), fmt.audio_token(0, 1)), torch.full((b,), context),
             torch.zeros(b, dtype=torch.long), torch.zeros(b, dtype=torch.long)]
        ).to(device)  # fmt: skip
        fn = (
            runner._graphs[b].replay if b in runner._graphs else lambda b=b: runner._decode_step(b, max_len=context + 1)
        )
        for _ in range(3):
            fn()
        sync(device)
        reps = 30
        t0 = time.perf_counter()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            sync(device)
            ms = start.elapsed_time(end) / reps
        else:
            for _ in range(reps):
                fn()
            ms = (time.perf_counter() - t0) * 1e3 / reps
        floor_ms = (wbytes + b * (context + 1) * kv_bytes_per_token(runner.lm, runner.kv_dtype)) / bw * 1e3
        out.append({"batch": b, "step_ms": ms, "floor_ms": floor_ms, "ratio_to_floor": ms / floor_ms,
                    "tok_s": b * 1e3 / ms,
                    "realtime_streams": min(b, b * 1e3 / ms / fmt.TOKENS_PER_SECOND)})  # fmt: skip
    return out


def kernel_profile(engine: OrpheusEngine, device, batch: int, context: int) -> list[dict]:
    """CUDA time by kernel of eager decode steps (the same kernels the graphs replay)."""
    if device.type != "cuda":
        return []
    from torch.profiler import ProfilerActivity, profile

    runner = engine.runner
    with torch.inference_mode():
        runner._decode_step(batch, max_len=context + 1)
        sync(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                runner._decode_step(batch, max_len=context + 1)
            sync(device)
    rows = [(e.key, e.device_time_total / 3 / 1e3, e.count // 3) for e in prof.key_averages()]
    rows = sorted((r for r in rows if r[1] > 0), key=lambda r: -r[1])
    return [{"kernel": k[:90], "ms_per_step": round(ms, 4), "launches_per_step": n} for k, ms, n in rows[:20]]


# -- the sweep ---------------------------------------------------------------------------------------


async def run_level(engine: OrpheusEngine, n: int, args) -> dict:
    """`n` streams of ~20 s, arrivals spread over `args.stagger_s`; per-stream timing of every chunk."""
    tokens = args.stream_tokens

    async def one(i: int):
        await asyncio.sleep(args.stagger_s * i / n)
        sp = SamplingParams(
            temperature=0.6, top_p=0.8, repetition_penalty=1.1, max_tokens=tokens, min_tokens=tokens, seed=i
        )
        t0 = time.perf_counter()
        stream = engine.submit(f"Stream {i} reads this sentence for the benchmark.", sampling=sp)
        request = engine._requests[stream.request_id]  # for the engine-side timestamps only
        arrivals, sizes = [], []
        async for chunk in stream:
            arrivals.append(time.perf_counter())
            sizes.append(len(chunk))
        marks.append(((request.first_token_s - t0) * 1e3, (request.first_frame_s - t0) * 1e3))
        return t0, np.array(arrivals), np.array(sizes)

    marks: list[tuple[float, float]] = []
    before = (engine.stats.decode_tokens, engine.stats.steps, engine.stats.busy_s, engine.codec_worker.decode_seconds)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_start = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - t_start
    d_tokens = engine.stats.decode_tokens - before[0]
    d_steps = engine.stats.steps - before[1]
    ttfb, gaps, rtf, underruns, late_ms = [], [], [], 0, []
    for t0, arr, sizes in results:
        ttfb.append((arr[0] - t0) * 1e3)
        gaps.extend(np.diff(arr) * 1e3)
        played = arr[0] + np.concatenate([[0], np.cumsum(sizes)[:-1]]) / fmt.SAMPLE_RATE  # when each chunk is due
        late = arr - played
        underruns += int((late[1:] > 0).sum())
        late_ms.append(float(late.max()) * 1e3)
        rtf.append(sizes.sum() / fmt.SAMPLE_RATE / (arr[-1] - t0))
    free, total = torch.cuda.mem_get_info() if args.device == "cuda" else (0, 0)
    return {
        "streams": n,
        "audio_s_per_stream": float(np.median([s.sum() for _, _, s in results]) / fmt.SAMPLE_RATE),
        "ttfb_ms_p50": float(np.percentile(ttfb, 50)),
        "ttfb_ms_p95": float(np.percentile(ttfb, 95)),
        "first_token_ms_p50": float(np.percentile([m[0] for m in marks], 50)),
        "first_token_ms_p95": float(np.percentile([m[0] for m in marks], 95)),
        "first_frame_ms_p50": float(np.percentile([m[1] for m in marks], 50)),
        "first_frame_ms_p95": float(np.percentile([m[1] for m in marks], 95)),
        "gap_ms_p50": float(np.percentile(gaps, 50)),
        "gap_ms_p99": float(np.percentile(gaps, 99)),
        "rtf_median": float(np.median(rtf)),
        "rtf_min": float(np.min(rtf)),
        "underruns": underruns,
        "streams_with_underrun": sum(1 for m in late_ms if m > 0),
        "worst_lateness_ms": float(max(late_ms)),
        "tok_s": d_tokens / wall,
        "wall_s": wall,
        "steps": d_steps,
        "mean_step_ms": (engine.stats.busy_s - before[2]) / max(d_steps, 1) * 1e3,
        "codec_decode_s": engine.codec_worker.decode_seconds - before[3],
        "gpu_mem_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else 0.0,
        "gpu_mem_used_gib": (total - free) / 2**30,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="the tiny test model (CPU check of this script)")
    ap.add_argument("--out-dir", default="bench/results")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32, 64, 128, 192, 256, 288, 320])
    ap.add_argument("--slots", type=int, default=320)
    ap.add_argument("--kv-cache-dtype", default="fp8", choices=["auto", "fp8"])
    ap.add_argument("--codec-dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: config")
    ap.add_argument("--codec-compile", type=int, default=None, choices=[0, 1], help="default: config")
    ap.add_argument("--stream-tokens", type=int, default=1638, help="audio tokens per stream (1638 = 19.97 s)")
    ap.add_argument("--stagger-s", type=float, default=1.0, help="arrivals spread over this many seconds")
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--baseline-tokens", type=int, default=32)
    ap.add_argument("--baseline-batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--check-prompts", type=int, default=3)
    ap.add_argument("--check-tokens", type=int, default=49)
    ap.add_argument("--timing-batches", type=int, nargs="+", default=[1, 8, 64, 128, 256, 320])
    ap.add_argument("--timing-context", type=int, default=820, help="KV length per row (mid-stream)")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "command": "python " + " ".join(sys.argv),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    }
    result["torch"] = torch.__version__
    log(f"device {result['device']}, torch {torch.__version__}")

    bw = copy_bandwidth(device)
    llm, tokenizer, snac = build(args, device, dtype)
    log(f"built model: {sum(p.numel() for p in llm.parameters()) / 1e9:.2f} B parameters")

    result["baselines"] = {}
    for b in args.baseline_batches:
        for static in (False, True):
            name = f"baseline_{'static' if static else 'eager'}_tok_s_bs{b}"
            result["baselines"][name] = hf_baseline(llm, device, b, args.baseline_tokens, static)
            log(f"{name}: {result['baselines'][name]:.1f}")
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    result["correctness"], ref = correctness(llm, tokenizer, device, args, "auto", None)
    log(f"correctness (KV in the model dtype): {result['correctness']}")
    result["correctness_fp8_kv"], _ = correctness(llm, tokenizer, device, args, "fp8", ref)
    log(f"correctness (fp8 KV): {result['correctness_fp8_kv']}")

    config = load_config(overrides={
        "model.device": args.device, "engine.max_slots": args.slots,
        "engine.max_tokens_per_slot": 64 * ((args.stream_tokens + 80) // 64 + 1), "engine.max_queue": 2 * args.slots,
        "engine.prefill_chunk_tokens": args.prefill_chunk, "sampling.max_tokens": args.stream_tokens,
        "engine.kv_cache_dtype": args.kv_cache_dtype, "codec.dtype": args.codec_dtype,  # None: the config's
        "codec.compile": None if args.codec_compile is None else bool(args.codec_compile),
    })  # fmt: skip
    t0 = time.perf_counter()
    engine = OrpheusEngine(llm, tokenizer, SnacCodec(snac, config.codec, device), config=config)
    engine.warm_up()
    result["engine_start_s"] = time.perf_counter() - t0
    result["engine_config"] = {
        k: getattr(config.engine, k) for k in ("max_slots", "max_tokens_per_slot", "prefill_chunk_tokens")
    }
    result["codec_config"] = {
        k: getattr(config.codec, k) for k in ("left_context_frames", "lookahead_frames", "dtype", "compile")
    }
    lm = engine.lm
    result["floor"] = {
        "copy_bandwidth_gb_s": bw / 1e9,
        "weight_bytes_per_step_gb": weight_bytes(lm) / 1e9,
        "kv_bytes_per_token_kib": kv_bytes_per_token(lm, engine.runner.kv_dtype) / 1024,
        "single_stream_floor_tok_s": bw / weight_bytes(lm),
        "single_stream_floor_x_realtime": bw / weight_bytes(lm) / fmt.TOKENS_PER_SECOND,
    }
    log(f"engine ready in {result['engine_start_s']:.1f} s; floor {result['floor']}")
    result["step_timing"] = step_timing(engine, device, args.timing_batches, args.timing_context, bw)
    for row in result["step_timing"]:
        log(
            f"step bs={row['batch']}: {row['step_ms']:.2f} ms "
            f"(floor {row['floor_ms']:.2f}, x{row['ratio_to_floor']:.2f})"
        )
    result["profile_bs1"] = kernel_profile(engine, device, 1, args.timing_context)
    result["profile_bs256"] = kernel_profile(engine, device, min(256, args.slots), args.timing_context)

    levels = []
    for n in [lv for lv in args.levels if lv <= args.slots]:
        level = asyncio.run(run_level(engine, n, args))
        levels.append(level)
        result["levels"] = levels
        (out_dir / "engine_h100.json").write_text(
            json.dumps(result, indent=2, default=str)
        )  # partial, in case of a timeout
        log(
            f"level {n}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in level.items())
        )
    engine.close()
    result["levels"] = levels
    ok = [lv["streams"] for lv in levels if lv["underruns"] == 0]
    by = {lv["streams"]: lv for lv in levels}
    single = by.get(1, {})
    result.update({
        "max_realtime_streams": max(ok) if ok else 0,
        "ttfb_ms_p50_1": single.get("ttfb_ms_p50"),
        "ttfb_ms_p95_128": by.get(128, {}).get("ttfb_ms_p95"),
        "single_stream_rtf": single.get("rtf_median"),
        "engine_tok_s_bs64": by.get(64, {}).get("tok_s"),
        "baseline_static_tok_s_bs64": result["baselines"].get("baseline_static_tok_s_bs64"),
        "baseline_eager_tok_s_bs1": result["baselines"].get("baseline_eager_tok_s_bs1"),
    })  # fmt: skip
    for buffer_ms in (100, 250):  # the same, for a player that buffers this much before it starts
        fits = [lv["streams"] for lv in levels if lv["worst_lateness_ms"] <= buffer_ms]
        result[f"max_realtime_streams_{buffer_ms}ms_buffer"] = max(fits) if fits else 0
    ratios = {}
    if result["engine_tok_s_bs64"] and result["baseline_static_tok_s_bs64"]:
        ratios["engine_vs_static_bs64"] = result["engine_tok_s_bs64"] / result["baseline_static_tok_s_bs64"]
        ratios["engine_vs_eager_bs64"] = result["engine_tok_s_bs64"] / result["baselines"]["baseline_eager_tok_s_bs64"]
    if single and result["baseline_eager_tok_s_bs1"]:
        single_tok_s = single["rtf_median"] * fmt.TOKENS_PER_SECOND
        ratios["engine_vs_eager_bs1"] = single_tok_s / result["baseline_eager_tok_s_bs1"]
        ratios["engine_vs_static_bs1"] = single_tok_s / result["baselines"]["baseline_static_tok_s_bs1"]
        ratios["single_stream_vs_floor"] = single_tok_s / result["floor"]["single_stream_floor_tok_s"]
    result["ratios"] = ratios
    (out_dir / "engine_h100.json").write_text(json.dumps(result, indent=2, default=str))
    try:
        plot(result, out_dir / "engine_h100.png")
    except ImportError:
        log("matplotlib missing: no plot (bench_engine_report.py can draw it from the JSON)")
    print(summary_table(result))


if __name__ == "__main__":
    main()
