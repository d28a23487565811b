"""Churn at full concurrency (connect, speak, read/cancel/abort/Eos, disconnect) leaves nothing behind.

Resident memory is sampled every 5 s; its growth is measured after a warm-up (a quarter of the
run, at most 30 s) and must stay under 5 %. `Bench.phase` around it checks slots, streams and tasks.
"""

from __future__ import annotations

import asyncio
import gc
import random
import sys
import time

from websockets.asyncio.client import connect

from bench.reliability.common import AUTH, LONG_TEXT, Bench, heap_mib, pack, rss_mib
from pipecat_orpheus.wire import protocol as p


async def churner(bench: Bench, rng: random.Random, deadline: float, counts: dict) -> None:
    texts = ["Hi.", "How are you doing today?", "Let me check.", LONG_TEXT[:300]]
    while time.perf_counter() < deadline:
        ws = await connect(bench.url, additional_headers=AUTH, compression=None)
        await ws.recv()
        counts["connections"] += 1
        action = rng.choice(["read", "cancel", "abort", "eos"])
        await ws.send(pack(type="Speak", text=rng.choice(texts), id=1))
        if action == "abort":
            for _ in range(rng.randrange(3)):
                await ws.recv()
            ws.transport.abort()
        elif action == "cancel":
            await ws.recv()
            await ws.send(pack(type="Cancel", id=1))
            while not isinstance(p.decode_server(await ws.recv()), p.Cancelled):
                pass
            await ws.close()
        elif action == "read":
            while not isinstance(p.decode_server(await ws.recv()), p.Done):
                pass
            await ws.close()
        else:
            await ws.send(pack(type="Eos"))
            async for _ in ws:
                pass
            if ws.close_code != 1000:
                bench.fail(f"soak: Eos ended with {ws.close_code}")
        counts[action] += 1


def memory() -> dict:
    """Resident set, the C heap as glibc sees it, and Python's live blocks, after a full collection.

    RSS alone cannot tell a leak (memory in use grows) from the allocator keeping what was freed:
    `heap_in_use` and `python_blocks` can.
    """
    gc.collect()
    return {"rss": rss_mib(), **(heap_mib() or {}), "python_blocks": sys.getallocatedblocks()}


async def run_soak(bench: Bench, seconds: float, concurrency: int, seed: int) -> dict:
    counts = {"connections": 0, "read": 0, "cancel": 0, "abort": 0, "eos": 0}
    start = time.perf_counter()
    warm = min(30.0, seconds / 4)  # allocator arenas and caches fill first; growth is measured after
    workers = [churner(bench, random.Random(seed + i), start + seconds, counts) for i in range(concurrency)]
    task = asyncio.gather(*workers)
    await asyncio.sleep(warm)
    m0, connections0, samples = memory(), counts["connections"], []
    while not task.done():
        await asyncio.wait([task], timeout=5)
        samples.append(rss_mib())
    await task
    m1 = memory()
    growth = 100 * (m1["rss"] - m0["rss"]) / m0["rss"]
    if growth >= 5:
        bench.fail(f"soak: RSS grew {growth:.1f} %")
    measured = max(counts["connections"] - connections0, 1)
    return {
        "soak_s": seconds,
        "concurrency": concurrency,
        "rss_after_warmup_mib": round(m0["rss"], 1),
        "rss_end_mib": round(m1["rss"], 1),
        "rss_max_mib": round(max(samples or [m1["rss"]]), 1),
        "rss_every_5s_mib": [round(x, 1) for x in samples],
        "soak_rss_growth_pct": round(growth, 2),
        # after warm-up -> end, each after gc.collect(): what a leak would move
        **{f"{k}_mib": [round(m0[k], 1), round(m1[k], 1)] for k in ("heap_in_use", "heap_free_held") if k in m0},
        "python_blocks": [m0["python_blocks"], m1["python_blocks"]],
        "python_blocks_per_connection": round((m1["python_blocks"] - m0["python_blocks"]) / measured, 2),
        **counts,
    }
