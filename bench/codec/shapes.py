"""What each SNAC window shape costs under CUDA graphs, by how much of the decode is compiled.

A live stream decodes its first frames, frames sent early for their deadline and its tail in
other window shapes than the steady one; when many streams start at once these edge shapes fill
the engine's steps. For every shape of `codec.stream.graphed_shapes` and a few batch sizes this
times one graph replay (CUDA events) of a real-size random SNAC 24 kHz in float16, and checks
the same path against a float32 eager decode of random windows (SNR), for:
  graphs      no compile (the eager decode captured as graphs);
  default     windows with the full left context compiled whole (what `codec.compile` does).
`results/history/codec_shapes_h100.json` also holds a third variant, "pointwise": Snake and the
hashed noise compiled with dynamic shapes for every shape (see bench/results/history/README.md).

  python3 -m bench.codec.shapes --out $OUT/codec_shapes_h100.json      # GPU
  python3 -m bench.codec.shapes --tiny --device cpu --out /tmp/shapes.json   # CPU check of the script
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from snac import SNAC

from bench.common import REAL_SNAC
from pipecat_orpheus.codec import SnacCodec
from pipecat_orpheus.codec.stream import Window, graphed_shapes
from pipecat_orpheus.config import CodecConfig
from pipecat_orpheus.format import CODEBOOK_SIZE
from pipecat_orpheus.pcm import snr_db
from pipecat_orpheus.testing import tiny_snac_config


def variant(model, name: str, device, max_batch: int) -> SnacCodec:
    """A codec as `name` says, its graphs captured (GPU; the compiles run then, timed by the caller)."""
    codec = SnacCodec(model, CodecConfig(dtype="float16", compile=name != "graphs", max_batch=max_batch), device)
    codec.capture_graphs()  # on CPU nothing is compiled or graphed: every variant runs eagerly
    return codec


def time_shape(codec: SnacCodec, shape, batch: int, reps: int) -> float:
    """Milliseconds of one decode of `batch` windows of `shape` (a graph replay on GPU)."""
    packed = torch.zeros(batch, shape[0] * 7 + 2, dtype=torch.int64, device=codec.device)  # (B, frames * 7 + 2)
    graphs = codec._graphs.get(shape)
    if graphs:
        bucket = min(b for b in graphs if b >= batch)
        run = graphs[bucket][0].replay
    else:
        fn = codec._decode_fn(shape)
        run = lambda: fn(packed)  # noqa: E731
    run()
    if codec.device.type != "cuda":
        t = time.perf_counter()
        for _ in range(reps):
            run()
        return (time.perf_counter() - t) / reps * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(codec._stream):
        start.record()
        for _ in range(reps):
            run()
        end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def fidelity_db(codec: SnacCodec, reference: SnacCodec, shape, rng, batch: int = 5) -> float:
    """Worst SNR (dB) over `batch` random windows of `shape` decoded by `codec` (graphs if captured) vs `reference`."""
    frames, left, emit = shape
    windows = [
        Window(codec.open_stream(i), rng.integers(0, CODEBOOK_SIZE, (frames, 7)), int(rng.integers(0, 50)), left, emit)
        for i in range(batch)
    ]
    got, want = codec.decode(windows), reference.decode(windows)
    return min(snr_db(a, b) for a, b in zip(got, want, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="the tiny test SNAC (CPU check of this script)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 16, 64, 256])
    ap.add_argument("--variants", nargs="+", default=["graphs", "default"])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default="bench/results/codec_shapes_h100.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    model = SNAC(**(tiny_snac_config() if args.tiny else REAL_SNAC)).eval()
    shapes = graphed_shapes(2, 2)
    rng = np.random.default_rng(0)
    reference = SnacCodec(model, CodecConfig(dtype="float32", compile=False, cuda_graphs=False), device)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__}
    for name in args.variants:
        t = time.perf_counter()
        codec = variant(model, name, device, max(args.batches))
        result[name] = {"start_s": time.perf_counter() - t, "ms": {}, "snr_db_vs_fp32_eager": {}}
        for shape in shapes:
            result[name]["snr_db_vs_fp32_eager"]["x".join(map(str, shape))] = fidelity_db(codec, reference, shape, rng)
            cap = max(codec._graphs[shape]) if shape in codec._graphs else max(args.batches)
            key = "x".join(map(str, shape))
            result[name]["ms"][key] = {b: time_shape(codec, shape, b, args.reps) for b in args.batches if b <= cap}
        snr = result[name]["snr_db_vs_fp32_eager"]
        worst = min(snr.values())
        print(f"{name}: start {result[name]['start_s']:.1f} s, worst SNR vs fp32 eager {worst:.1f} dB: {snr}")
    print(f"{'shape':>8} {'batch':>5} " + " ".join(f"{n:>10}" for n in args.variants))
    for shape in shapes:
        key = "x".join(map(str, shape))
        for b in args.batches:
            row = [result[n]["ms"][key].get(b) for n in args.variants]
            if any(v is not None for v in row):
                print(f"{key:>8} {b:>5} " + " ".join(f"{v:>10.3f}" if v is not None else f"{'-':>10}" for v in row))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
