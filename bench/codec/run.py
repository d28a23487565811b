"""Benchmark of the streaming SNAC codec (pipecat_orpheus/codec).

Measures, on a real-size SNAC 24 kHz with random weights (the compute of the real model; the
sound is noise):
  1. streaming fidelity (SNR of streamed vs one offline decode, noise seeded) over a grid of
     left context and lookahead frames;
  2. decode time per batch of steady-state windows at 1..256 windows, fp32 vs bf16, eager vs
     torch.compile(dynamic=True), and the precision loss of bf16 against fp32;
  3. the GPU share at 256 real-time streams, frames/s at saturation, first-window cost.
Writes a JSON (default bench/results/codec_h100.json) and prints a short table.

  python3 -m bench.codec.run                      # GPU, real-size SNAC
  python3 -m bench.codec.run --tiny --device cpu  # quick CPU check of the script itself
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from snac import SNAC

from bench.common import REAL_SNAC, command_line
from pipecat_orpheus.codec import SnacCodec
from pipecat_orpheus.codec.stream import Window
from pipecat_orpheus.config import CodecConfig
from pipecat_orpheus.format import CODEBOOK_SIZE, SAMPLE_RATE, SAMPLES_PER_FRAME
from pipecat_orpheus.pcm import snr_db
from pipecat_orpheus.testing import tiny_snac_config

FRAMES_PER_S = SAMPLE_RATE / SAMPLES_PER_FRAME  # 11.72 windows per second per real-time stream
TARGET_DB = 40.0
ENGINE_STEP_MS = (3.52, 5.41)  # an H100 decode step at batch 1 and 64 (audio-rows head), for the lookahead cost


def stream_decode(codec: SnacCodec, seqs: list[np.ndarray], seeds: list[int]) -> list[np.ndarray]:
    """Push all sequences in lockstep; every step's ready windows go to one decode() call."""
    streams = [codec.open_stream(s) for s in seeds]
    out: list[list[np.ndarray]] = [[] for _ in seqs]
    for t in range(max(map(len, seqs)) + 1):
        ready = [
            (i, w)
            for i, (st, q) in enumerate(zip(streams, seqs, strict=False))
            for w in (st.push(q[t]) if t < len(q) else st.finish())
        ]
        for (i, _), pcm in zip(ready, codec.decode([w for _, w in ready]), strict=False):
            out[i].append(pcm)
    return [np.concatenate(o) for o in out]


def fidelity_grid(model, device, args, rng) -> dict:
    seqs = [rng.integers(0, CODEBOOK_SIZE, (args.fid_frames, 7)) for _ in range(args.fid_streams)]
    seeds = list(range(len(seqs)))
    base = SnacCodec(model, CodecConfig(), device)
    offline = [base.decode_frames(q, s) for q, s in zip(seqs, seeds, strict=False)]
    grid = {}
    for left in args.lefts:
        for right in args.rights:
            codec = SnacCodec(model, CodecConfig(left_context_frames=left, lookahead_frames=right), device)
            streamed = stream_decode(codec, seqs, seeds)
            both = snr_db(np.concatenate(streamed), np.concatenate(offline))
            worst = min(snr_db(s, o) for s, o in zip(streamed, offline, strict=False))
            grid[f"L{left}_R{right}"] = {
                "left": left,
                "right": right,
                "snr_db": round(both, 2),
                "min_stream_snr_db": round(worst, 2),
            }
            print(f"  fidelity L={left} R={right}: {both:6.1f} dB (worst stream {worst:6.1f})", flush=True)
    return grid


def choose_context(grid: dict) -> tuple[int, int]:
    """Fewest lookahead frames, then fewest left frames, reaching 40 dB + 5 dB margin (else 40 dB)."""
    for need in (TARGET_DB + 5, TARGET_DB):
        ok = sorted((g["right"], g["left"]) for g in grid.values() if g["min_stream_snr_db"] >= need)
        if ok:
            return ok[0][1], ok[0][0]
    best = max(grid.values(), key=lambda g: g["min_stream_snr_db"])
    return best["left"], best["right"]


def steady_windows(codec: SnacCodec, n: int, rng) -> list[Window]:
    """n windows of the steady-state shape (left context, 1 frame, lookahead), one per stream."""
    cfg = codec.config
    out = []
    for i in range(n):
        st = codec.open_stream(i)
        for f in rng.integers(0, CODEBOOK_SIZE, (cfg.left_context_frames + cfg.lookahead_frames + 1, 7)):
            ws = st.push(f)
        out.append(ws[-1])
    return out


def time_decode(codec: SnacCodec, windows: list[Window], reps: int) -> float:
    for _ in range(2):
        codec.decode(windows)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        codec.decode(windows)  # ends with a device-to-host copy: synchronous
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def speed(model, device, left, right, args, rng, specs) -> dict:
    """Time each variant spec "dtype[+compile][+graphs][+cudnn]" (graphs: CUDA graphs of the steady window;
    cudnn: torch.backends.cudnn.benchmark on)."""
    variants = {}
    pool = None
    for name in specs:
        parts = name.split("+")
        dtype, comp = parts[0], "compile" in parts
        torch.backends.cudnn.benchmark = "cudnn" in parts
        cfg = CodecConfig(
            left_context_frames=left,
            lookahead_frames=right,
            dtype=dtype,
            compile=comp,
            cuda_graphs="graphs" in parts,
            max_batch=max(args.batches),
        )
        try:
            codec = SnacCodec(model, cfg, device)
            codec.capture_graphs()  # a no-op unless cuda_graphs (and a GPU)
            pool = pool or steady_windows(codec, max(args.batches), rng)
            t0 = time.perf_counter()
            for b in args.batches:  # warm-up (compiles, with dynamic shapes)
                codec.decode(pool[:b])
            warm = time.perf_counter() - t0
            ms = {b: round(time_decode(codec, pool[:b], args.reps), 3) for b in args.batches}
        except Exception as e:  # a variant that cannot run is reported, not fatal
            print(f"  {name}: failed: {e!r}", flush=True)
            variants[name] = {"error": repr(e)[:500]}
            continue
        seqs = [rng.integers(0, CODEBOOK_SIZE, (24, 7)) for _ in range(4)]
        ref32 = SnacCodec(model, CodecConfig(dtype="float32", compile=False, cuda_graphs=False), device)
        prec = min(snr_db(codec.decode_frames(q, i), ref32.decode_frames(q, i)) for i, q in enumerate(seqs))
        stream_fid = min(
            snr_db(s, codec.decode_frames(q, i))
            for i, (q, s) in enumerate(zip(seqs, stream_decode(codec, seqs, list(range(4))), strict=False))
        )
        variants[name] = {
            "decode_ms": ms,
            "warmup_s": round(warm, 2),
            "precision_snr_vs_fp32_db": round(prec, 2),
            "stream_snr_db": round(stream_fid, 2),
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "codec": codec,
        }
        print(
            f"  {name}: "
            + " ".join(f"b{b}={v:.2f}ms" for b, v in ms.items())
            + f"  warm {warm:.1f}s  vs fp32 {prec:.1f} dB  stream {stream_fid:.1f} dB",
            flush=True,
        )
    return variants


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="the tiny test SNAC (CPU check of this script)")
    ap.add_argument("--out", default="bench/results/codec_h100.json")
    ap.add_argument("--lefts", type=int, nargs="+", default=[0, 1, 2, 3, 4, 6])
    ap.add_argument("--rights", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--fid-streams", type=int, default=16)
    ap.add_argument("--fid-frames", type=int, default=48)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256])
    ap.add_argument(
        "--variants",
        nargs="+",
        default=["float32", "float16", "bfloat16", "float32+compile", "float16+compile", "float16+compile+cudnn"],
        help="dtype[+compile][+graphs][+cudnn]: precision, torch.compile, CUDA graphs, cudnn.benchmark",
    )
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = SNAC(**(tiny_snac_config() if args.tiny else REAL_SNAC)).eval()
    rng = np.random.default_rng(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device {name}; SNAC {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params (random weights)",
        flush=True,
    )

    print("fidelity (fp32, streamed vs offline, seeded noise):", flush=True)
    grid = fidelity_grid(model, device, args, rng)
    left, right = choose_context(grid)
    print(f"chosen context: left {left}, lookahead {right}", flush=True)

    print("speed (steady-state windows, eager):", flush=True)
    variants = speed(model, device, left, right, args, rng, [v for v in args.variants if "compile" not in v])
    result = report(args, name, grid, left, right, variants, rng)
    compiled = [v for v in args.variants if "compile" in v]
    if compiled:  # last: each compile costs ~40 s of warm-up
        print("speed (torch.compile of the steady-state shape, dynamic batch):", flush=True)
        variants.update(speed(model, device, left, right, args, rng, compiled))
        result = report(args, name, grid, left, right, variants, rng)
    print_table(args, name, result)


def report(args, name, grid, left, right, variants, rng) -> dict:
    """Pick the fastest variant within 40 dB of fp32, measure its batching latency, write the JSON."""
    ok = {
        k: v
        for k, v in variants.items()
        if "error" not in v and v["precision_snr_vs_fp32_db"] >= TARGET_DB and v["stream_snr_db"] >= TARGET_DB
    }
    top = max(args.batches)
    best = min(ok, key=lambda k: ok[k]["decode_ms"][top]) if ok else "float32"
    codec = variants[best]["codec"]
    torch.backends.cudnn.benchmark = variants[best].get("cudnn_benchmark", False)
    share = FRAMES_PER_S * 256 / top * variants[best]["decode_ms"][top] / 1e3  # GPU seconds per second at 256 streams
    fps = max(b / (ms / 1e3) for b, ms in variants[best]["decode_ms"].items())
    st = codec.open_stream(0)
    first_windows = [w for f in rng.integers(0, CODEBOOK_SIZE, (right + 1, 7)) for w in st.push(f)]
    first_ms = time_decode(codec, first_windows, args.reps)
    result = {
        "device": name,
        "command": command_line(),
        "model": "SNAC 24 kHz config, random weights" if not args.tiny else "tiny SNAC (script check only)",
        "fidelity_db": grid[f"L{left}_R{right}"]["min_stream_snr_db"],
        "lookahead_frames": right,
        "left_context_frames": left,
        "chosen_variant": best,
        "dtype": best.split("+")[0],
        "compile": "compile" in best.split("+"),
        "cuda_graphs": "graphs" in best.split("+"),
        "decode_ms_bs1": variants[best]["decode_ms"].get(1),
        "decode_ms_bs64": variants[best]["decode_ms"].get(64),
        "gpu_share_at_256_streams": round(share, 4),
        "frames_per_s_saturation": round(fps, 1),
        "first_window_decode_ms": round(first_ms, 3),
        "lookahead_first_audio_cost_ms": {f"engine_step_{s}ms": round(right * 7 * s, 1) for s in ENGINE_STEP_MS},
        "fidelity_grid": grid,
        "variants": {k: {kk: vv for kk, vv in v.items() if kk != "codec"} for k, v in variants.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    return result


def print_table(args, name, r) -> None:
    print(f"\n== codec on {name} ==")
    print(f"context L={r['left_context_frames']} R={r['lookahead_frames']}: ", end="")
    print(f"fidelity {r['fidelity_db']} dB (target >= {TARGET_DB}); variant {r['chosen_variant']}")
    print("| variant | " + " | ".join(f"bs{b} ms" for b in args.batches) + " | vs fp32 dB | stream dB | warm-up s |")
    for k, v in r["variants"].items():
        if "error" in v:
            print(f"| {k} | failed |")
            continue
        print(
            f"| {k} | "
            + " | ".join(f"{v['decode_ms'][b]:.2f}" for b in args.batches)
            + f" | {v['precision_snr_vs_fp32_db']:.1f} | {v['stream_snr_db']:.1f} | {v['warmup_s']} |"
        )
    print(f"GPU share at 256 streams: {r['gpu_share_at_256_streams'] * 100:.1f}% (target < 15%); ", end="")
    print(f"saturation {r['frames_per_s_saturation']:.0f} frames/s")
    print(f"first window decode {r['first_window_decode_ms']:.2f} ms; ", end="")
    print(f"lookahead {r['lookahead_frames']} frames costs {r['lookahead_first_audio_cost_ms']} ms of first audio")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
