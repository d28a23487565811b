"""Benchmark of the batched engine (pipecat_orpheus/engine) on an Orpheus-3B-shaped random model.

Random bf16 weights with the real sizes (the compute of Orpheus 3B; the sound is noise) and a
real-size random SNAC, both built in-process. In one run:
  1. the measured copy bandwidth and the bandwidth floor of a decode step;
  2. baselines: transformers `generate` (eager DynamicCache, and static cache) at batch 1 and 64;
  3. correctness: greedy tokens of the engine's runner (CUDA graphs, Triton kernels) vs the
     reference path (`reference.generate_tokens`, transformers + DynamicCache), as a match rate;
  4. decode-step GPU time per batch size (graph replay) vs the floor, and a kernel profile;
  5. a concurrency sweep of ~12 s streams through `OrpheusEngine.submit` with the codec on:
     time to first audio, gaps between chunks, per-stream real-time factor, underruns
     (a chunk arriving after the audio before it finished playing), tokens/s, GPU memory;
     after level 1, a probe of lone short requests one after another for first-audio p50;
     with `--admission slack fixed`, the sweep once per `engine.admission` policy on the same engine.
Levels that would end past --budget-s (330 s from start) are skipped, so one run fits in about
6 minutes. Writes engine.json (after every level) and engine.png to --out-dir.

  python3 -m bench.engine.run --out-dir bench/results          # GPU
  python3 -m bench.engine.run --tiny --out-dir /tmp/bench       # quick CPU check of the script
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from bench.common import build, command_line, copy_bandwidth, sync
from bench.engine.correctness import correctness
from bench.engine.report import admission_table, level_stats, plot, summarize, summary_table
from bench.engine.steps import kernel_profile, kv_bytes_per_token, step_timing, weight_bytes
from bench.engine.trace import LevelTrace, diagnose
from pipecat_orpheus import format as fmt
from pipecat_orpheus.codec import SnacCodec
from pipecat_orpheus.codec.stream import FRAME_S
from pipecat_orpheus.config import load_config
from pipecat_orpheus.engine import OrpheusEngine, SamplingParams
from pipecat_orpheus.speech import Speech, speech_for


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


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


# -- codec graphs ----------------------------------------------------------------------------------


def codec_graph_check(snac, config, device, rng) -> dict:
    """SNR of every graphed window shape decoded by CUDA graphs vs eagerly (both uncompiled, the config's dtype)."""
    graphed = SnacCodec(snac, dataclasses.replace(config.codec, compile=False), device)
    graphed.capture_graphs()
    eager = SnacCodec(snac, dataclasses.replace(config.codec, compile=False, cuda_graphs=False), device)
    left, lookahead = config.codec.left_context_frames, config.codec.lookahead_frames
    snr = {}
    for pace in (None, 0.2, 0.5, 0.9):  # offline, or live with frames arriving at this fraction of their length
        streams = [graphed.open_stream(seed) for seed in range(3)]
        for t in range(left + lookahead + 3):
            live = {} if pace is None else {"now": t * pace * FRAME_S, "wait_s": 0.3 * FRAME_S}
            windows = [w for s in streams for w in s.push(rng.integers(0, fmt.CODEBOOK_SIZE, 7), **live)]
            windows += [w for s in streams for w in s.finish()] if t == left + lookahead + 2 else []
            if not windows:
                continue
            got, want = graphed.launch(windows).wait(), eager.decode(windows)
            for w, a, b in zip(windows, got, want, strict=True):
                key = "x".join(map(str, w.shape_key))
                err = float(np.sum((a - b) ** 2)) or 1e-30
                snr[key] = min(snr.get(key, np.inf), 10 * np.log10(float(np.sum(b**2)) / err))
    return {"snr_db_by_shape": snr, "min_snr_db": min(snr.values())}


# -- the sweep ---------------------------------------------------------------------------------------


async def run_level(speech: Speech, n: int, args) -> dict:
    """`n` streams, arrivals spread over `args.stagger_s`; per-stream timing of every chunk, and why some are late."""
    engine: OrpheusEngine = speech.backend
    tokens = args.stream_tokens
    puts: list[list[float]] = [[] for _ in range(n)]

    async def one(i: int):
        await asyncio.sleep(args.stagger_s * i / n)
        sp = SamplingParams(max_tokens=tokens, min_tokens=tokens, seed=i)
        t0 = time.perf_counter()
        stream = speech.submit(f"Stream {i} reads this sentence for the benchmark.", sampling=sp)
        puts[i] = trace.watch(stream)
        request = engine._requests[stream.request_id]  # for the engine-side timestamps only
        arrivals, sizes = [], []
        async for chunk in stream:
            arrivals.append(time.perf_counter())
            sizes.append(len(chunk))
        marks = ((request.first_token_s - t0) * 1e3, (request.first_frame_s - t0) * 1e3)
        return t0, np.array(arrivals), np.array(sizes), marks

    stats = engine.stats
    before = (stats.decode_tokens, stats.steps, stats.busy_s, stats.codec_windows)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_start = time.perf_counter()
    with LevelTrace(engine) as trace:
        streams = await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - t_start
    free, total = torch.cuda.mem_get_info() if args.device == "cuda" else (0, 0)
    return (
        level_stats(streams, wall)
        | {"lateness": diagnose(streams, puts, trace, t_start)}
        | {
            "tok_s": (stats.decode_tokens - before[0]) / wall,
            "steps": stats.steps - before[1],
            "mean_step_ms": (stats.busy_s - before[2]) / max(stats.steps - before[1], 1) * 1e3,
            "codec_windows": stats.codec_windows - before[3],
            "gpu_mem_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else 0.0,
            "gpu_mem_used_gib": (total - free) / 2**30,
        }
    )


async def ttfb_probe(speech: Speech, args) -> dict:
    """Time to first audio of lone short requests, one after another (level 1 alone is one sample)."""
    engine: OrpheusEngine = speech.backend
    ttfb, first_token = [], []
    tokens = args.probe_tokens
    for i in range(args.probe_repeats):
        sp = SamplingParams(max_tokens=tokens, min_tokens=tokens, seed=1000 + i)
        t0 = time.perf_counter()
        stream = speech.submit(f"Probe {i} reads this sentence for the benchmark.", sampling=sp)
        request = engine._requests[stream.request_id]  # for the engine-side timestamp only
        first = None
        async for _ in stream:
            first = first or time.perf_counter()
        ttfb.append((first - t0) * 1e3)
        first_token.append((request.first_token_s - t0) * 1e3)
    return {
        "repeats": len(ttfb), "ttfb_ms": ttfb, "ttfb_ms_p50": float(np.median(ttfb)),
        "first_token_ms": first_token, "first_token_ms_p50": float(np.median(first_token)),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="the tiny test model (CPU check of this script)")
    ap.add_argument("--out-dir", default="bench/results")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32, 64, 128, 192, 256, 288])
    ap.add_argument("--slots", type=int, default=288)
    ap.add_argument("--kv-cache-dtype", default="fp8", choices=["auto", "fp8"])
    ap.add_argument("--codec-dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: config")
    ap.add_argument("--codec-compile", type=int, default=None, choices=[0, 1], help="default: config")
    ap.add_argument("--stream-tokens", type=int, default=987, help="audio tokens per stream (987 = 12.03 s)")
    ap.add_argument("--stagger-s", type=float, default=1.0, help="arrivals spread over this many seconds")
    ap.add_argument("--probe-repeats", type=int, default=6, help="lone requests timed for first audio")
    ap.add_argument("--probe-tokens", type=int, default=168, help="audio tokens per probe request (2 s)")
    ap.add_argument("--budget-s", type=float, default=330, help="skip the levels that would end past this")
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument(
        "--admission", nargs="+", choices=["slack", "fixed"], default=None,
        help="engine.admission policies, each swept in turn on the same engine (default: the config's)",
    )  # fmt: skip
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, last")
    ap.add_argument("--baseline-tokens", type=int, default=32)
    ap.add_argument("--baseline-batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--check-prompts", type=int, default=3)
    ap.add_argument("--check-tokens", type=int, default=35)
    ap.add_argument("--timing-batches", type=int, nargs="+", default=[1, 8, 64, 128, 256, 288])
    ap.add_argument("--timing-context", type=int, default=820, help="KV length per row (mid-stream)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_json = out_dir / "engine.json"
    result: dict = {
        "command": command_line(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    log(f"device {result['device']}, torch {torch.__version__}")

    bw = copy_bandwidth(device)
    llm, tokenizer, snac = build(args.tiny, device, dtype)
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
        "engine.busy_below_speed": 0.0,  # the sweep finds the real-time count itself (the prediction is reported)
        "codec.compile": None if args.codec_compile is None else bool(args.codec_compile),
    } | {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)})  # fmt: skip
    if device.type == "cuda":
        result["codec_graph_check"] = codec_graph_check(snac, config, device, np.random.default_rng(0))
        log(f"codec graphs vs eager: {result['codec_graph_check']}")
    t0 = time.perf_counter()
    # the engine captures its decode graphs, warms every prefill shape up and captures the codec's graphs;
    # warm_up() then runs two requests end to end (full lookahead, then a lookahead ramp)
    engine = OrpheusEngine(llm, tokenizer, SnacCodec(snac, config.codec, device), config=config.engine)
    engine.warm_up()
    speech = speech_for(engine, config)  # the text front: voice, text split, prompts
    result["engine_start_s"] = time.perf_counter() - t0
    warm_up_s = result["engine_start_s"] - sum(engine.start_timings.values())
    result["engine_start_stages_s"] = {**engine.start_timings, "end-to-end warm-up": warm_up_s}
    result["engine_config"] = {
        k: getattr(config.engine, k)
        for k in ("max_slots", "max_tokens_per_slot", "prefill_chunk_tokens", "prefill_tokens_while_decoding")
    }
    result["admission"] = args.admission or [config.engine.admission]
    result["step_model_start"] = dataclasses.asdict(engine.admission.model)
    result["codec_config"] = {
        k: getattr(config.codec, k) for k in ("left_context_frames", "lookahead_frames", "dtype", "compile")
    }
    result["codec_config"]["cuda_graphs"] = getattr(config.codec, "cuda_graphs", None)
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
        log(f"step bs={row['batch']}: {row['step_ms']:.2f} ms (floor {row['floor_ms']:.2f} ms)")
    context = min(args.timing_context, engine.runner.max_len - 2)
    result["profile_bs1"] = kernel_profile(engine, device, 1, context)
    result["profile_bs256"] = kernel_profile(engine, device, min(256, args.slots), context)

    levels: list[dict] = []
    result["levels"], rtf_min = levels, 3.0  # the same list: partial JSON dumps show the levels done
    audio_s = args.stream_tokens / fmt.TOKENS_PER_SECOND
    sweep = [(policy, n) for policy in result["admission"] for n in args.levels if n <= args.slots]
    for policy, n in sweep:
        elapsed = time.perf_counter() - t_start
        if n > 1 and elapsed + args.stagger_s + audio_s / max(rtf_min, 0.3) + 5 > args.budget_s:  # 1 always runs
            log(f"level {n} ({policy}) skipped: {elapsed:.0f} s spent of --budget-s {args.budget_s:.0f}")
            result.setdefault("levels_skipped", []).append(f"{n} {policy}")
            continue
        engine.admission.policy = policy
        level = {"admission": policy} | asyncio.run(run_level(speech, n, args))
        level["predicted_capacity"] = engine.admission.capacity()  # the step model's real-time streams, after it
        levels.append(level)
        rtf_min = level["rtf_min"]
        fig = {k: v for k, v in level.items() if k != "lateness"}
        log(f"level {n}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in fig.items()))
        late = level["lateness"]
        log(f"level {n} lateness: " + ", ".join(f"{k}={v:.4g}" for k, v in late.items() if not isinstance(v, list)))
        for d in late["late_engine_worst"][:3] + late["slowest_steps"][:3]:
            log(f"   {', '.join(f'{k}={v:.4g}' for k, v in d.items())}")
        if n == 1 and "ttfb_probe_1" not in result:
            result["ttfb_probe_1"] = asyncio.run(ttfb_probe(speech, args))
            log(f"first audio of lone requests: {result['ttfb_probe_1']}")
        out_json.write_text(json.dumps(result, indent=2, default=str))  # partial, in case of a timeout
    result["engine_stats"] = {"steps": engine.stats.steps, "step_s_ewma": engine.feed.step_s}
    result["step_model_end"] = dataclasses.asdict(engine.admission.model)
    engine.close()
    summarize(result)
    result["wall_s"] = time.perf_counter() - t_start
    out_json.write_text(json.dumps(result, indent=2, default=str))
    try:
        plot(result, out_dir / "engine.png")
    except ImportError:
        log("matplotlib missing: no plot (python3 -m bench.engine.report can draw it from the JSON)")
    print(summary_table(result))
    print(admission_table(result))
    log(f"done in {result['wall_s']:.0f} s: {out_json}")


if __name__ == "__main__":
    main()
