"""Everything the engine keeps on the GPU, and the two things it runs there: decode and prefill.

The runner owns the static slotted KV cache (sized from config and checked against free memory
at start), the per-slot sampling parameters and repetition-penalty presence masks, and the
persistent input/output buffers. A step is: one H2D copy of a pinned int64 block (slots, tokens,
positions, counters), a CUDA-graph replay of decode + sampling for the smallest captured batch
size that fits (padding rows write to a dummy slot), the eager prefill of this step's prompt
chunks queued behind it, and one D2H copy of the sampled tokens that the host waits for.
With `enforce_eager` (and always on CPU) the same step function runs without graphs.
"""

from __future__ import annotations

import bisect

import numpy as np
import torch
from loguru import logger
from tqdm.auto import tqdm

from pipecat_orpheus.config import EngineConfig
from pipecat_orpheus.errors import ModelLoadError

from .attention import triton_available
from .model import OrpheusLM
from .request import Request, SamplingParams
from .sampler import N_HEAD_ROWS, SamplingRows, noise_key, sample
from .scheduler import PrefillChunk

_IN_ROWS = 5  # decode input block: slot, token, position, num_generated, noise_step
_ACTIVATION_RESERVE = 2 * 2**30  # bytes kept free beyond the KV cache for activations and graphs
_PREFILL_PAD = 16  # prefill chunks are padded to a multiple of this: few distinct GEMM shapes to warm up


def graph_ladder(max_batch: int) -> list[int]:
    """Batch sizes captured as CUDA graphs: 1, 2, 4, 8, then steps of 16 to 128, of 32 beyond."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch]
    sizes += list(range(16, min(max_batch, 128) + 1, 16)) + list(range(160, max_batch + 1, 32))
    return sorted(set(s for s in sizes if s < max_batch) | {max_batch})


def check_kv_fits(need: int, free: int, config: EngineConfig) -> None:
    """Raise `ModelLoadError` naming the keys to change if `need` bytes of cache do not fit in `free`."""
    allowed = int(free * config.gpu_memory_fraction) - _ACTIVATION_RESERVE
    if need > allowed:
        raise ModelLoadError(
            f"the KV cache needs {need / 2**30:.1f} GiB but only {max(allowed, 0) / 2**30:.1f} GiB of GPU memory is "
            f"available ({free / 2**30:.1f} GiB free x engine.gpu_memory_fraction {config.gpu_memory_fraction}, minus "
            f"{_ACTIVATION_RESERVE / 2**30:.0f} GiB for activations): lower engine.max_slots ({config.max_slots}) or "
            f"engine.max_tokens_per_slot ({config.max_tokens_per_slot}), or raise engine.gpu_memory_fraction"
        )


class ModelRunner:
    """Owns the GPU state of one engine and runs decode/prefill steps on it.

    Args:
        lm: the engine's forward (weights already on the device).
        config: the `engine` section (slots, tokens per slot, CUDA graphs, memory fraction).
        enforce_eager: never capture CUDA graphs (always true on CPU).
    """

    def __init__(self, lm: OrpheusLM, config: EngineConfig, *, enforce_eager: bool = False):
        self.lm = lm
        self.config = config
        self.device = lm.device
        self.max_slots = config.max_slots
        self.max_len = config.max_tokens_per_slot
        self.dummy_slot = config.max_slots  # padding rows of a graph bucket write here
        self.use_graphs = self.device.type == "cuda" and config.cuda_graphs and not enforce_eager
        self.use_triton = triton_available(self.device)
        self.kv_dtype = torch.float8_e4m3fn if config.kv_cache_dtype == "fp8" else lm.dtype
        self._allocate()
        # the engine's work outranks the codec's SNAC decodes on the GPU (lower number = higher priority)
        self._stream = torch.cuda.Stream(self.device, priority=-1) if self.device.type == "cuda" else None
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._buckets: list[int] = []

    # -- memory ------------------------------------------------------------------------------

    def kv_cache_bytes(self) -> int:
        """Bytes of the K and V caches for every slot (plus the dummy) and layer."""
        lm = self.lm
        per_token = 2 * lm.num_layers * lm.num_kv_heads * lm.head_dim * self.kv_dtype.itemsize
        return per_token * (self.max_slots + 1) * self.max_len

    def _allocate(self) -> None:
        lm, s = self.lm, self.max_slots + 1
        need = self.kv_cache_bytes() + s * N_HEAD_ROWS
        if self.device.type == "cuda":
            check_kv_fits(need, torch.cuda.mem_get_info(self.device)[0], self.config)
        shape = (lm.num_layers, s, lm.num_kv_heads, self.max_len, lm.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)  # (layers, S + 1, KVH, L, D)
        self.v_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)  # (layers, S + 1, KVH, L, D)
        logger.info(f"{self}: KV cache {2 * self.k_cache.nbytes / 2**30:.2f} GiB for {self.max_slots} slots")
        # per-slot sampling state, set when a piece starts; read by index inside the graphs
        self.temperature = torch.zeros(s, dtype=torch.float32, device=self.device)  # (S + 1,)
        self.top_p = torch.ones(s, dtype=torch.float32, device=self.device)  # (S + 1,)
        self.penalty = torch.ones(s, dtype=torch.float32, device=self.device)  # (S + 1,)
        self.noise_key = torch.zeros(s, dtype=torch.int64, device=self.device)  # (S + 1,)
        self.min_tokens = torch.zeros(s, dtype=torch.int64, device=self.device)  # (S + 1,)
        self.presence = torch.zeros(s, N_HEAD_ROWS, dtype=torch.bool, device=self.device)  # (S + 1, head rows)
        self._true = torch.ones((), dtype=torch.bool, device=self.device)  # ()
        # step I/O: one pinned block in, the sampled tokens out
        pin = self.device.type == "cuda"
        self._host_in = torch.zeros(_IN_ROWS, s, dtype=torch.int64, pin_memory=pin)  # (5, S + 1)
        self._dev_in = torch.zeros(_IN_ROWS, s, dtype=torch.int64, device=self.device)  # (5, S + 1)
        self._dev_out = torch.zeros(2 * s, dtype=torch.int64, device=self.device)  # (2 (S + 1),) decode, then prefill
        self._host_out = torch.zeros(2 * s, dtype=torch.int64, pin_memory=pin)  # (2 (S + 1),)
        self._done = torch.cuda.Event() if pin else None

    # -- per-slot state ----------------------------------------------------------------------

    def start_piece(self, slot: int, sampling: SamplingParams, seed: int) -> None:
        """A piece begins in `slot`: its sampling parameters, and an empty presence mask."""
        self.temperature[slot] = sampling.temperature
        self.top_p[slot] = sampling.top_p
        self.penalty[slot] = sampling.repetition_penalty
        self.noise_key[slot] = noise_key(seed)
        self.min_tokens[slot] = sampling.min_tokens
        self.presence[slot] = False

    # -- one step ------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, decode: list[Request], prefill: list[PrefillChunk]) -> tuple[np.ndarray, np.ndarray]:
        """Run one engine step; returns the sampled tokens of the decode rows and of the last chunks."""
        if self._stream is None:
            return self._step(decode, prefill)
        with torch.cuda.stream(self._stream):
            return self._step(decode, prefill)

    def _step(self, decode: list[Request], prefill: list[PrefillChunk]) -> tuple[np.ndarray, np.ndarray]:
        n = len(decode)
        bucket = 0
        if n:
            bucket = self._bucket(n)
            host = self._host_in.numpy()  # (5, S + 1) view of the pinned block
            host[:, :n] = [
                [r.slot for r in decode],
                [r.last_token for r in decode],
                [r.num_prompt_tokens + r.num_generated - 1 for r in decode],
                [r.num_generated for r in decode],
                [r.num_generated_total for r in decode],
            ]
            host[:, n:bucket] = [[self.dummy_slot], [0], [0], [0], [0]]
            self._dev_in[:, :bucket].copy_(self._host_in[:, :bucket], non_blocking=True)
            if bucket in self._graphs:
                self._graphs[bucket].replay()
            else:
                self._decode_step(bucket, max_len=int(host[2, :n].max()) + 1)
        m = self._prefill(prefill, offset=bucket) if prefill else 0
        self._host_out[: bucket + m].copy_(self._dev_out[: bucket + m], non_blocking=True)
        if self._done is not None:
            self._done.record()
            self._done.synchronize()
        tokens = self._host_out.numpy()
        return tokens[:n].copy(), tokens[bucket : bucket + m].copy()

    def _bucket(self, n: int) -> int:
        if not self._buckets:
            return n
        return self._buckets[bisect.bisect_left(self._buckets, n)]

    def _rows(self, slots: torch.Tensor, num_generated: torch.Tensor, noise_step: torch.Tensor) -> SamplingRows:
        return SamplingRows(
            temperature=self.temperature[slots],
            top_p=self.top_p[slots],
            repetition_penalty=self.penalty[slots],
            noise_key=self.noise_key[slots],
            noise_step=noise_step,
            num_generated=num_generated,
            min_tokens=self.min_tokens[slots],
        )

    def _decode_step(self, bs: int, *, max_len: int) -> None:
        """Decode + sample `bs` rows from `_dev_in` into `_dev_out` (the body of each CUDA graph)."""
        slots, tokens, positions, num_generated, noise_step = self._dev_in[:, :bs]  # (bs,) each
        logits = self.lm.decode(
            tokens, positions, slots, self.k_cache, self.v_cache, max_len=max_len, use_triton=self.use_triton
        )  # (bs, head rows)
        out = sample(logits, self.presence[slots], self._rows(slots, num_generated, noise_step))
        self.presence.index_put_((slots, out.head_rows), self._true)  # a device scalar: graph-safe
        self._dev_out[:bs] = out.token_ids

    def _prefill(self, chunks: list[PrefillChunk], *, offset: int) -> int:
        """Prefill `chunks` (eager); the first tokens of completed prompts go to `_dev_out[offset:]`.

        Every host input travels in one pinned non-blocking copy, so launching the prefill never
        waits for the decode graph queued before it.
        """
        for c in chunks:
            if c.start == 0:
                self.start_piece(c.request.slot, c.request.sampling, c.request.seed)
        n = len(chunks)
        t = -(-max(c.end - c.start for c in chunks) // _PREFILL_PAD) * _PREFILL_PAD
        last = [i for i, c in enumerate(chunks) if c.last]
        m = len(last)
        packed = np.zeros(2 * n * t + n + 3 * m, dtype=np.int64)  # ids | positions | slots | rows | cols | steps
        ids, positions = packed[: n * t].reshape(n, t), packed[n * t : 2 * n * t].reshape(n, t)  # (N, T) views
        positions[:] = -1  # padding
        for i, c in enumerate(chunks):
            ids[i, : c.end - c.start] = c.request.prompt[c.start : c.end]
            positions[i, : c.end - c.start] = np.arange(c.start, c.end)
        tail = packed[2 * n * t :]
        tail[:n] = [c.request.slot for c in chunks]
        tail[n : n + m] = last
        tail[n + m : n + 2 * m] = [chunks[i].end - chunks[i].start - 1 for i in last]
        tail[n + 2 * m :] = [chunks[i].request.num_generated_total for i in last]
        dev = self._upload(packed)  # (2NT + N + 3M,)
        dev_ids, dev_pos = dev[: n * t].view(n, t), dev[n * t : 2 * n * t].view(n, t)  # (N, T)
        slots, rows, cols, noise_step = dev[2 * n * t :].split([n, m, m, m])
        hidden = self.lm.prefill(
            dev_ids,
            dev_pos,
            slots,
            self.k_cache,
            self.v_cache,
            dummy_slot=self.dummy_slot,
            max_end=max(c.end for c in chunks),
            use_triton=self.use_triton,
        )  # (N, T, H)
        if not m:
            return 0
        logits = self.lm.logits(hidden[rows, cols])  # (M, head rows)
        first = slots[rows]  # (M,)
        zeros = torch.zeros_like(first)  # (M,) the first token of a piece
        out = sample(logits, self.presence[first], self._rows(first, zeros, noise_step))
        self.presence.index_put_((first, out.head_rows), self._true)
        self._dev_out[offset : offset + m] = out.token_ids
        return m

    def _upload(self, array: np.ndarray) -> torch.Tensor:
        """A host array on the device without a sync: pinned staging (cached by torch), non-blocking copy."""
        host = torch.from_numpy(array)
        if self.device.type != "cuda":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    @torch.inference_mode()
    def warm_up_prefill(self) -> None:
        """Run prefill and first-token sampling once per padded shape, so no caller pays for first use."""
        if self.device.type != "cuda":
            return
        longest = min(self.config.prefill_chunk_tokens, 256, self.max_len)
        with torch.cuda.stream(self._stream):
            for n in (1, 2, 4):
                for t in range(_PREFILL_PAD, longest + 1, _PREFILL_PAD):
                    ids = torch.zeros(n, t, dtype=torch.int64, device=self.device)  # (N, T)
                    pos = torch.arange(t, device=self.device).expand(n, t)  # (N, T)
                    slots = torch.full((n,), self.dummy_slot, device=self.device)  # (N,)
                    hidden = self.lm.prefill(
                        ids,
                        pos,
                        slots,
                        self.k_cache,
                        self.v_cache,
                        dummy_slot=self.dummy_slot,
                        max_end=t,
                        use_triton=self.use_triton,
                    )  # (N, T, H)
                    logits = self.lm.logits(hidden[:, -1])  # (N, head rows)
                    sample(logits, self.presence[slots], self._rows(slots, torch.zeros_like(slots), slots))
        torch.cuda.synchronize(self.device)

    # -- CUDA graphs -------------------------------------------------------------------------

    @torch.inference_mode()
    def capture_graphs(self) -> None:
        """Capture the decode step for the batch-size ladder, largest first, sharing one memory pool."""
        if not self.use_graphs:
            return
        ladder = graph_ladder(self.max_slots)
        self._host_in[:] = torch.tensor([[self.dummy_slot], [0], [0], [0], [0]])
        self._dev_in.copy_(self._host_in)
        pool = None
        for bs in tqdm(list(reversed(ladder)), desc="Capturing CUDA graphs", unit="graph"):
            self._decode_step(bs, max_len=self.max_len)  # warm-up: compiles kernels, sizes the pool
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                self._decode_step(bs, max_len=self.max_len)
            pool = graph.pool()
            self._graphs[bs] = graph
        torch.cuda.synchronize(self.device)
        self._buckets = ladder

    def __repr__(self) -> str:
        return f"ModelRunner(slots={self.max_slots}, tokens_per_slot={self.max_len}, device={self.device})"
