"""What the integrity guard costs the engine: per-step time with loop detection on and off, same engine, same load.

One engine (the Orpheus-3B-shaped random model on the GPU, or the tiny one with --tiny) runs N
forced-length streams at a time (END_OF_SPEECH masked, so every step decodes all N rows), once
with the shipped loop detector and once without it (`scheduler.loops` set to None: exactly
`guard.loop_frames: 0`), alternating for --rounds rounds so drift hits both alike. The duration
budget is a cap the scheduler already has and costs nothing per token, so only the loop detector
is timed. Also timed alone: one `LoopDetector.check` of a step's frames (N / 7 of them on average,
N when every row completes a frame in the same step).

  python3 -m bench.engine.guard --out bench/results/guard_h200.json          # GPU
  python3 -m bench.engine.guard --tiny --device cpu --out /tmp/guard.json    # CPU check of this script
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import build, command_line
from pipecat_orpheus import format as fmt
from pipecat_orpheus.codec import SnacCodec
from pipecat_orpheus.config import load_config
from pipecat_orpheus.engine import OrpheusEngine, SamplingParams
from pipecat_orpheus.engine.guard import LoopDetector


async def run_level(engine: OrpheusEngine, prompt: list[int], n: int, tokens: int) -> dict:
    """`n` streams of `tokens` audio tokens each, all at once; the engine's steps and seconds in them."""
    stats = engine.stats
    steps, busy = stats.steps, stats.busy_s
    sampling = [SamplingParams(max_tokens=tokens, min_tokens=tokens, seed=i) for i in range(n)]
    streams = [engine.submit_prompts([prompt], sp) for sp in sampling]
    await asyncio.gather(*(s.read_all() for s in streams))
    return {"steps": stats.steps - steps, "busy_s": stats.busy_s - busy}


def check_us(detector: LoopDetector, frames: int, repeats: int) -> float:
    """Microseconds of one `check` of `frames` frames in distinct slots (random codes: no loop)."""
    rng = np.random.default_rng(0)
    slots = list(range(frames))
    batches = [fmt.codes_to_tokens(rng.integers(0, fmt.CODEBOOK_SIZE, (frames, 7))) for _ in range(8)]
    batches = [[b[i : i + 7] for i in range(0, len(b), 7)] for b in batches]
    t0 = time.perf_counter()
    for r in range(repeats):
        detector.check(slots, batches[r % len(batches)])
    return (time.perf_counter() - t0) / repeats * 1e6


async def main_async(args) -> dict:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    llm, tokenizer, snac = build(args.tiny, device, dtype)
    config = load_config(overrides={
        "model.device": args.device, "engine.max_slots": max(args.streams),
        "engine.max_tokens_per_slot": 64 * ((args.tokens + 80) // 64 + 1), "sampling.max_tokens": args.tokens,
        "engine.kv_cache_dtype": args.kv_cache_dtype,
    })  # fmt: skip
    engine = OrpheusEngine(llm, tokenizer, SnacCodec(snac, config.codec, device), config=config.engine)
    engine.warm_up()
    detector = engine.scheduler.loops
    assert detector is not None, "the shipped config has loop detection on"
    prompt = fmt.build_prompt(tokenizer, "The guard bench reads this sentence.", config.voices.default)
    levels = []
    try:
        for n in args.streams:
            runs = {"on": [], "off": []}
            for _ in range(args.rounds):
                for name in ("off", "on"):
                    engine.scheduler.loops = detector if name == "on" else None
                    runs[name].append(await run_level(engine, prompt, n, args.tokens))
            level = {"streams": n}
            for name, rs in runs.items():
                level[f"step_ms_{name}"] = 1e3 * sum(r["busy_s"] for r in rs) / sum(r["steps"] for r in rs)
                level[f"step_ms_{name}_rounds"] = [1e3 * r["busy_s"] / r["steps"] for r in rs]
            level["added_ms"] = level["step_ms_on"] - level["step_ms_off"]
            level["added_pct"] = 100 * level["added_ms"] / level["step_ms_off"]
            level["check_us_mean_frames"] = check_us(detector, max(1, n // fmt.FRAME_TOKENS), args.check_repeats)
            level["check_us_all_rows"] = check_us(detector, n, args.check_repeats)
            levels.append(level)
            print(
                f"{n:>5} streams: step {level['step_ms_off']:.3f} ms off, {level['step_ms_on']:.3f} ms on "
                f"({level['added_pct']:+.2f} %); check {level['check_us_mean_frames']:.1f} us "
                f"({max(1, n // 7)} frames), {level['check_us_all_rows']:.1f} us ({n} frames)",
                flush=True,
            )
    finally:
        engine.scheduler.loops = detector
        engine.close()
    return {
        "command": command_line(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "model": "tiny" if args.tiny else "orpheus-3b-shaped random",
        "guard": {"loop_frames": config.guard.loop_frames, "loop_window_frames": config.guard.loop_window_frames},
        "tokens_per_stream": args.tokens,
        "rounds": args.rounds,
        "levels": levels,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="the tiny test model (CPU check of this script)")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--tokens", type=int, default=700, help="audio tokens per stream (700 = 8.5 s)")
    ap.add_argument("--rounds", type=int, default=3, help="off/on pairs per level")
    ap.add_argument("--check-repeats", type=int, default=2000)
    ap.add_argument("--kv-cache-dtype", default="fp8", choices=["auto", "fp8"])
    ap.add_argument("--out", default="bench/results/guard.json")
    args = ap.parse_args()
    result = asyncio.run(main_async(args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
