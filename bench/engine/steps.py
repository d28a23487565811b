"""Decode-step GPU time against the bandwidth floor, and a per-kernel profile (for `bench.engine.run`).

The floor of a decode step is the bytes it must read (every weight once, plus the live KV of
each row) at the measured device-to-device copy bandwidth.
"""

from __future__ import annotations

import time

import torch

from bench.common import sync
from pipecat_orpheus import format as fmt
from pipecat_orpheus.engine import OrpheusEngine
from pipecat_orpheus.engine.model import OrpheusLM
from pipecat_orpheus.engine.sampler import N_HEAD_ROWS


def weight_bytes(lm: OrpheusLM) -> int:
    """Bytes a decode step must read: every layer matrix, the norms and the audio head rows."""
    n = sum(t.numel() for layer in lm.layers for t in (layer.qkv, layer.o, layer.gate_up, layer.down))
    return (n + N_HEAD_ROWS * lm.head.shape[1]) * lm.dtype.itemsize


def kv_bytes_per_token(lm: OrpheusLM, kv_dtype: torch.dtype) -> int:
    return 2 * lm.num_layers * lm.num_kv_heads * lm.head_dim * kv_dtype.itemsize


def step_timing(engine: OrpheusEngine, device, batches: list[int], context: int, bw: float) -> list[dict]:
    """GPU time of one decode step (graph replay) at each batch size, all rows at `context` tokens."""
    runner = engine.runner
    out = []
    wbytes = weight_bytes(runner.lm)
    context = min(context, runner.max_len - 2)  # the tiny check's slots are short
    for b in batches:
        if b > runner.max_slots:
            continue
        runner._dev_out[:b] = fmt.audio_token(0, 1)  # each row's input token: row i reads _dev_out[i]
        runner._dev_in[:, :b] = torch.stack(
            [torch.arange(b), torch.arange(b), torch.full((b,), context),
             torch.zeros(b, dtype=torch.long), torch.zeros(b, dtype=torch.long)]
        ).to(device)  # fmt: skip
        graph = runner._graphs.get((b, 0))  # (decode rows, prompt tokens) -> (graph, output)
        fn = graph[0].replay if graph is not None else lambda b=b: runner._decode_step(b, max_len=context + 1)
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
