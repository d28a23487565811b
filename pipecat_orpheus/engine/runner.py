"""Everything the engine keeps on the GPU, and the two things it runs there: decode and prefill.

The runner owns the static slotted KV cache (sized from config and checked against free memory
at start), the per-slot sampling parameters and repetition-penalty presence masks, and the
persistent input/output buffers. A step is: one H2D copy of a pinned int64 block (slots, where
each row's input token is in the last step's output, positions, counters), one CUDA-graph replay
of the decode rows (the smallest captured batch size that fits; padding rows write to a dummy
slot) together with this step's prompt chunks (padded to a multiple of 16), sampling on the GPU,
and one D2H copy of the sampled tokens. Input tokens never travel through the host, so the next step can be
launched before the host has seen this one's tokens: `launch()` queues a step, `collect()` waits
for the oldest one; two may be in flight (pinned buffers alternate between them).
With `enforce_eager` (and always on CPU) the same step function runs without graphs.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
from loguru import logger

from pipecat_orpheus.config import EngineConfig
from pipecat_orpheus.errors import ModelLoadError
from pipecat_orpheus.format import FRAME_TOKENS
from pipecat_orpheus.graphs import capture, step_buckets
from pipecat_orpheus.noise import noise_key

from .admission import PREFILL_PAD, StepModel
from .attention import triton_available
from .model import OrpheusLM
from .request import Request, SamplingParams
from .sampler import N_HEAD_ROWS, SamplingRows, sample
from .scheduler import PrefillChunk, ScheduledStep

_IN_ROWS = 5  # decode input block: slot, index of the input token in `_dev_out`, position, num_generated, noise_step
_IN_FLIGHT = 2  # steps launched and not yet collected, at most: pinned host buffers alternate between them
_ACTIVATION_RESERVE = 2 * 2**30  # bytes kept free beyond the KV cache for activations and graphs


@dataclass(frozen=True, slots=True)
class _Launched:
    """A step in flight: its decode rows, graph bucket, completed prompts, and which host buffers it uses."""

    n: int
    bucket: int
    m: int
    buffer: int
    done: torch.cuda.Event | None


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
        # (decode rows, prompt tokens) -> (graph, the prompt tokens' hidden states (T, H) or None); 0 = none of them
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor | None]] = {}
        self._buckets: list[int] = []
        self._in_flight: deque[_Launched] = deque()
        self._launches = 0
        self._token_index: dict[Request, int] = {}  # where each request's last sampled token is in `_dev_out`
        self._pad_rows = np.array([[self.dummy_slot], [0], [0], [0], [0]], dtype=np.int64)  # (5, 1) padding rows

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
        # step I/O: one pinned block in, the sampled tokens out; host buffers alternate between steps in flight
        pin = self.device.type == "cuda"
        self._host_in = torch.zeros(_IN_FLIGHT, _IN_ROWS, s, dtype=torch.int64, pin_memory=pin)  # (2, 5, S + 1)
        self._dev_in = torch.zeros(_IN_ROWS, s, dtype=torch.int64, device=self.device)  # (5, S + 1)
        self._dev_out = torch.zeros(2 * s, dtype=torch.int64, device=self.device)  # (2 (S + 1),) decode, then prefill
        self._host_out = torch.zeros(_IN_FLIGHT, 2 * s, dtype=torch.int64, pin_memory=pin)  # (2, 2 (S + 1))
        # prefill I/O: ids | positions | slots per prompt token (T padded), then rows | slots | noise steps per
        # completed prompt (at most one per slot); the scheduler keeps a step's tokens within prefill_chunk_tokens
        self.prefill_capacity = -(-self.config.prefill_chunk_tokens // PREFILL_PAD) * PREFILL_PAD
        size = 3 * self.prefill_capacity + 3 * s
        self._host_pf = torch.zeros(_IN_FLIGHT, size, dtype=torch.int64, pin_memory=pin)  # (2, 3 T_max + 3 (S + 1))
        self._dev_pf = torch.zeros(size, dtype=torch.int64, device=self.device)  # (3 T_max + 3 (S + 1),)
        self._done = [torch.cuda.Event() if pin else None for _ in range(_IN_FLIGHT)]  # one per host buffer

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

    @property
    def stream(self) -> torch.cuda.Stream | None:
        """The CUDA stream every step runs on (None on CPU); the engine queues the codec's work on it too."""
        return self._stream

    def step(self, step: ScheduledStep) -> tuple[np.ndarray, np.ndarray]:
        """Run one engine step; returns the sampled tokens of the decode rows and of the last chunks."""
        self.launch(step)
        return self.collect()

    @torch.inference_mode()
    def launch(self, step: ScheduledStep) -> None:
        """Queue one step on the GPU and return at once; `collect()` waits for its tokens."""
        if len(self._in_flight) == _IN_FLIGHT:
            raise RuntimeError(f"{_IN_FLIGHT} steps are in flight: collect() one first")
        with torch.cuda.stream(self._stream):
            self._launch(step)

    def collect(self) -> tuple[np.ndarray, np.ndarray]:
        """Wait for the oldest step in flight (releasing the GIL): tokens of its decode rows and of its last chunks."""
        launched = self._in_flight.popleft()
        if launched.done is not None:
            launched.done.synchronize()
        tokens = self._host_out[launched.buffer].numpy()
        n, bucket, m = launched.n, launched.bucket, launched.m
        return tokens[:n].copy(), tokens[bucket : bucket + m].copy()

    def _launch(self, step: ScheduledStep) -> None:
        decode, buffer = step.decode, self._launches % _IN_FLIGHT
        n, bucket = len(decode), 0
        if n:
            bucket = self._bucket(n)
            host = self._host_in[buffer].numpy()  # (5, S + 1) view of this step's pinned block
            total = [r.num_generated_total + g - r.num_generated for r, g in zip(decode, step.generated, strict=True)]
            host[:, :n] = [
                [r.slot for r in decode],
                [self._token_index[r] for r in decode],  # every decode row sampled its input in the last step
                [r.num_prompt_tokens + g - 1 for r, g in zip(decode, step.generated, strict=True)],
                step.generated,
                total,  # the noise counter: audio tokens of every piece before this one
            ]
            host[:, n:bucket] = self._pad_rows
            self._dev_in[:, :bucket].copy_(self._host_in[buffer, :, :bucket], non_blocking=True)
        completed = [c.request for c in step.prefill if c.last]
        t, m = self._stage_prefill(step.prefill, buffer) if step.prefill else (0, 0)
        lens = [c.end for c in step.prefill] + ([int(host[2, :n].max()) + 1] if n else [])
        max_len = max(lens, default=1)  # the longest live length (the eager SDPA path crops the cache to it)
        x = self._run(bucket, t, max_len=max_len)
        if m:
            self._sample_first(x, t, m, offset=bucket)
        self._host_out[buffer, : bucket + m].copy_(self._dev_out[: bucket + m], non_blocking=True)
        done = self._done[buffer]
        if done is not None:
            done.record()
        self._in_flight.append(_Launched(n, bucket, m, buffer, done))
        self._launches += 1
        self._token_index = {r: i for i, r in enumerate(decode)} | {r: bucket + j for j, r in enumerate(completed)}

    def _run(self, bs: int, t: int, *, max_len: int) -> torch.Tensor | None:
        """`bs` decode rows and `t` staged prompt tokens: their graph if captured, else eagerly.

        Without a mixed graph of this size (more prompt tokens than `prefill_tokens_while_decoding`)
        the decode graph and the prefill graph run one after the other.
        """
        entry = self._graphs.get((bs, t))
        if entry is not None:
            entry[0].replay()
            return entry[1]
        if bs and t and self.use_graphs:
            self._run(bs, 0, max_len=max_len)
            return self._run(0, t, max_len=max_len)
        return self._forward_step(bs, t, max_len=max_len)

    def _forward_step(self, bs: int, t: int, *, max_len: int) -> torch.Tensor | None:
        """The body of every step graph: decode rows (sampled), prompt tokens (hidden states returned), or both."""
        if bs and t:
            return self._mixed_step(bs, t, max_len=max_len)
        if bs:
            return self._decode_step(bs, max_len=max_len)
        return self._prefill_forward(t, max_len=max_len)

    def abandon(self) -> None:
        """Forget the steps in flight after a failure (their requests are failed by the engine)."""
        self._in_flight.clear()
        self._token_index = {}

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

    def _decode_inputs(self, bs: int) -> tuple[torch.Tensor, ...]:
        """Token, position, slot, num_generated and noise step of `bs` decode rows: (bs,) each."""
        slots, token_index, positions, num_generated, noise_step = self._dev_in[:, :bs]  # (bs,) each
        tokens = self._dev_out[token_index]  # (bs,) sampled by the last step, read before this one writes
        return tokens, positions, slots, num_generated, noise_step

    def _sample(self, x: torch.Tensor, slots, num_generated, noise_step, *, offset: int = 0) -> None:
        """Sample each row's next token from its hidden state (B, H) into `_dev_out[offset:offset + B]`."""
        out = sample(self.lm.head_logits(x), self.presence[slots], self._rows(slots, num_generated, noise_step))
        self.presence.index_put_((slots, out.head_rows), self._true)  # a device scalar: graph-safe
        self._dev_out[offset : offset + x.shape[0]] = out.token_ids

    def _decode_step(self, bs: int, *, max_len: int) -> None:
        """Decode + sample `bs` rows from `_dev_in` into `_dev_out` (the body of each decode graph)."""
        tokens, positions, slots, num_generated, noise_step = self._decode_inputs(bs)
        x = self.lm.forward(tokens, positions, slots, self.k_cache, self.v_cache, max_len, self.use_triton)  # (bs, H)
        self._sample(x, slots, num_generated, noise_step)

    def _mixed_step(self, bs: int, t: int, *, max_len: int) -> torch.Tensor:
        """`bs` decode rows and `t` staged prompt tokens in one forward: the weights are read once for both.

        The decode rows are sampled as in `_decode_step`; returns the prompt tokens' hidden states (T, H).
        """
        tokens, positions, slots, num_generated, noise_step = self._decode_inputs(bs)
        dev = self._dev_pf
        ids, pos, slot = dev[:t], dev[t : 2 * t], dev[2 * t : 3 * t]  # (T,) each
        x = self.lm.forward(
            torch.cat([tokens, ids]),
            torch.cat([positions, pos]),
            torch.cat([slots, slot]),
            self.k_cache,
            self.v_cache,
            max_len,
            self.use_triton,
        )  # (bs + T, H); fmt: skip
        self._sample(x[:bs], slots, num_generated, noise_step)
        return x[bs:]

    def _stage_prefill(self, chunks: list[PrefillChunk], buffer: int) -> tuple[int, int]:
        """Stage `chunks` in `_dev_pf` (one flat row per prompt token, padded); returns (T, completed prompts).

        Every host input travels in one non-blocking copy from a persistent pinned block, so
        launching never waits for the work queued before it, and a new request allocates nothing
        on the host or the device.
        """
        for c in chunks:
            if c.start == 0:
                self.start_piece(c.request.slot, c.request.sampling, c.request.seed)
        total = sum(c.end - c.start for c in chunks)
        t = -(-total // PREFILL_PAD) * PREFILL_PAD  # padded: the shapes are few and captured
        if t > self.prefill_capacity:
            raise ValueError(f"{total} prefill tokens in one step exceed engine.prefill_chunk_tokens")
        host = self._host_pf[buffer].numpy()  # (3 T_max + 3 (S + 1),) view of this step's pinned block
        ids, pos, slot = host[:t], host[t : 2 * t], host[2 * t : 3 * t]  # (T,) views
        done: list[tuple[int, int, int]] = []  # (flat row, slot, noise step) of each completed prompt
        i = 0
        for c in chunks:
            k = c.end - c.start
            ids[i : i + k] = c.request.prompt[c.start : c.end]
            pos[i : i + k] = np.arange(c.start, c.end)
            slot[i : i + k] = c.request.slot
            i += k
            if c.last:
                done.append((i - 1, c.request.slot, c.request.num_generated_total))
        ids[i:], pos[i:], slot[i:] = 0, 0, self.dummy_slot  # padding tokens write to the dummy slot
        m = len(done)
        if m:
            host[3 * t : 3 * t + 3 * m] = np.array(done, dtype=np.int64).T.reshape(-1)  # rows | slots | steps
        self._dev_pf[: 3 * t + 3 * m].copy_(self._host_pf[buffer, : 3 * t + 3 * m], non_blocking=True)
        return t, m

    def _sample_first(self, x: torch.Tensor, t: int, m: int, *, offset: int) -> None:
        """The first audio token of each of the `m` completed prompts, from the prompt tokens' hidden states (T, H)."""
        rows, slots, noise_step = self._dev_pf[3 * t : 3 * t + 3 * m].view(3, m)  # (M,) each
        self._sample(x[rows], slots, torch.zeros_like(slots), noise_step, offset=offset)  # no token generated yet

    def _prefill_forward(self, t: int, *, max_len: int) -> torch.Tensor:
        """The forward of `t` packed prompt tokens in `_dev_pf` (the body of each prefill graph): (T, H)."""
        dev = self._dev_pf
        return self.lm.forward(
            dev[:t], dev[t : 2 * t], dev[2 * t : 3 * t], self.k_cache, self.v_cache, max_len, self.use_triton
        )

    @torch.inference_mode()
    def warm_up(self, *, force: bool = False) -> None:
        """Run the prefill step once per padded length (and a few prompt counts) on the dummy slot.

        Every shape a caller's prefill can take is then warmed up (cuBLAS plans, caching-allocator
        blocks, Triton specialisations), so no request pays for a first use. GPU only (on a CPU
        there is nothing to warm up) unless `force`.
        """
        if self.device.type != "cuda" and not force:
            return
        dummy = SamplingParams(max_tokens=FRAME_TOKENS)
        longest = self.max_len // PREFILL_PAD * PREFILL_PAD  # one chunk's positions stay inside a slot
        lengths = [[t] for t in range(PREFILL_PAD, min(self.prefill_capacity, longest) + 1, PREFILL_PAD)]
        lengths += [[PREFILL_PAD] * m for m in (2, 4, 8) if m * PREFILL_PAD <= self.prefill_capacity]
        lengths += [
            [longest] * (t // longest) for t in range(longest + PREFILL_PAD, self.prefill_capacity + 1, longest)
        ]
        for chunk_lengths in lengths:
            chunks = []
            for j, t in enumerate(chunk_lengths):
                request = Request(f"warm-up-{j}", [[0] * t], dummy, seed=j)
                request.slot = self.dummy_slot
                chunks.append(PrefillChunk(request, 0, t))
            self.step(ScheduledStep([], chunks))

    @torch.inference_mode()
    def measure_step_model(self, repeats: int = 3) -> StepModel:
        """The engine's first `StepModel`: decode at 1 row and at every slot, prefill at the shortest and longest.

        Each is timed on the dummy slot, the fastest of `repeats` after one to warm it up: the
        per-row cost at almost no context (the engine's own steps then teach it the rest) and
        the per-token cost of a prefill.
        """
        self._dev_in.copy_(torch.from_numpy(self._pad_rows).expand_as(self._dev_in))  # every row: the dummy slot
        dummy = SamplingParams(max_tokens=FRAME_TOKENS)

        def seconds(rows: int, tokens: int) -> float:
            request = Request("step-model", [[0] * tokens], dummy, seed=0, slot=self.dummy_slot)
            times = []
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                if tokens:
                    self.step(ScheduledStep([], [PrefillChunk(request, 0, tokens)]))
                else:
                    self._run(self._bucket(rows), 0, max_len=1)
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                times.append(time.perf_counter() - t0)
            return min(times[1:])

        rows, short = self.max_slots, PREFILL_PAD
        long = min(self.prefill_capacity, self.max_len // PREFILL_PAD * PREFILL_PAD)
        one, full, first, last = seconds(1, 0), seconds(rows, 0), seconds(0, short), seconds(0, long)
        row_s = max(full - one, 0.0) / max(rows - 1, 1)
        mixed = self.prefill_capacity  # eagerly, decode rows and prompt tokens always share one forward
        if self.use_graphs:  # only up to the mixed graphs' length (none without Triton)
            mixed = -(-self.config.prefill_tokens_while_decoding // PREFILL_PAD) * PREFILL_PAD * self.use_triton
        token_s = max(last - first, 0.0) / max(long - short, 1)
        return StepModel(fixed_s=max(one - row_s, 0.0), row_s=row_s, token_s=token_s, mixed_tokens=mixed)

    # -- CUDA graphs -------------------------------------------------------------------------

    @torch.inference_mode()
    def capture_graphs(self) -> None:
        """Capture decode steps, prefill forwards and mixed decode + prefill steps, largest first, in one pool.

        Decode: one graph per batch bucket. Prefill: the forward of T prompt tokens (T a multiple
        of 16 up to the chunk budget), for steps with no decode rows. Mixed: a decode bucket plus
        up to `engine.prefill_tokens_while_decoding` prompt tokens (padded) in one forward, so a
        join costs the live streams no second read of the weights. Picking each completed
        prompt's last row and sampling it stay eager. Graphs turn ~300 kernel launches into one.
        Prefill and mixed graphs need the Triton kernels (the SDPA fallback crops the cache on the host).
        """
        if not self.use_graphs:
            return
        ladder = step_buckets(self.max_slots)
        self._dev_in.copy_(torch.from_numpy(self._pad_rows).expand_as(self._dev_in))
        lengths = list(range(PREFILL_PAD, self.prefill_capacity + 1, PREFILL_PAD)) if self.use_triton else []
        mixed = [t for t in lengths if t < self.config.prefill_tokens_while_decoding + PREFILL_PAD]
        keys = [(bs, 0) for bs in reversed(ladder)] + [(0, t) for t in reversed(lengths)]
        keys += [(bs, t) for bs in reversed(ladder) for t in reversed(mixed)]

        def pad_prompt(key: tuple[int, int]) -> None:  # padding tokens: id 0 at position 0 of the dummy slot
            t = key[1]
            self._dev_pf[: 2 * t] = 0
            self._dev_pf[2 * t : 3 * t] = self.dummy_slot

        def body(key: tuple[int, int]) -> torch.Tensor | None:
            return self._forward_step(*key, max_len=self.max_len)

        self._graphs = capture(keys, body, device=self.device, desc="Engine CUDA graphs", setup=pad_prompt)
        self._buckets = ladder

    def __repr__(self) -> str:
        return f"ModelRunner(slots={self.max_slots}, tokens_per_slot={self.max_len}, device={self.device})"
