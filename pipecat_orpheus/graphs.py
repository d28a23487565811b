"""CUDA graph capture, shared by the engine's steps and the codec's windows.

A graph replays a whole step (hundreds of kernels) in one launch. Both the engine and the
codec capture a list of shapes the same way: largest first into one memory pool (smaller
graphs reuse the largest one's blocks), each warmed up outside the capture first (cuBLAS and
cuDNN plans, Triton and inductor compiles).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from pipecat_orpheus.progress import progress

K = TypeVar("K")


def step_buckets(max_batch: int) -> list[int]:
    """Engine decode batches that get a graph: 1, 2, 4, 8, then steps of 16 to 128, of 32 beyond, and `max_batch`."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch]
    sizes += list(range(16, min(max_batch, 128) + 1, 16)) + list(range(160, max_batch + 1, 32))
    return sorted(set(s for s in sizes if s < max_batch) | {max_batch})


def window_buckets(max_batch: int) -> list[int]:
    """Codec batches that get a graph: 1, 2, 3, 4, 6, 8, 12, ... (powers of two and 1.5x them), and `max_batch`."""
    sizes = {m << i for i in range(max_batch.bit_length()) for m in (2, 3)} | {1}
    return sorted({s for s in sizes if s < max_batch} | {max_batch})


def capture(
    keys: Sequence[K],
    body: Callable[[K], Any],
    *,
    device: torch.device,
    desc: str,
    setup: Callable[[K], None] | None = None,
    stream: torch.cuda.Stream | None = None,
    warm_ups: int = 1,
) -> dict[K, tuple[torch.cuda.CUDAGraph, Any]]:
    """Capture `body(key)` for every key, in order (largest first), into one pool: key -> (graph, its output).

    `setup(key)` runs before the warm-ups, outside the graph (e.g. to write padding inputs).
    """
    graphs: dict[K, tuple[torch.cuda.CUDAGraph, Any]] = {}
    pool = None
    for key in progress(keys, desc, "graph"):
        if setup is not None:
            setup(key)
        for _ in range(warm_ups):
            body(key)
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            out = body(key)
        pool = graph.pool()
        graphs[key] = (graph, out)
    torch.cuda.synchronize(device)
    return graphs
