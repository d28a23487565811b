"""Triton GEMV for the small-batch decode step: y (B, N) = x (B, K) @ W (N, K).T, bound by reading W.

Why: at batch 1-8 a decode step only streams weights, and cuBLAS's kernels for these skinny shapes
reach 2.0-2.7 TB/s on an H100 where a copy reaches 3.0. Each program here reads BLOCK_N rows of W
once for all B rows of x and accumulates in fp32 over K. Shapes with too few row blocks to fill
the SMs split K over SPLIT_K programs: fp32 partials summed by a second kernel ("partials"), or
atomically added into a zeroed fp32 buffer that the cast kernel zeroes again ("atomic"), so no
memset is needed. `GemvPlan` preallocates everything, so a CUDA graph can capture it.
Used by `bench.experiments.gemv`; a `GemvConfig` dict from its JSON can be copied as is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MODE_DIRECT, MODE_PARTIALS, MODE_ATOMIC = 0, 1, 2
REDUCE_BLOCK = 1024  # elements per program of the reduce/cast kernel
DOT_MIN_ROWS = 16  # tl.dot needs M >= 16: batch rows are padded to this on the dot path


@dataclass(frozen=True)
class GemvConfig:
    """One launch configuration; `reduce` only matters when split_k > 1."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1
    reduce: str = "partials"  # "partials" | "atomic"
    dot: bool = False  # tl.dot on tensor cores (rows padded to 16) instead of multiply + sum

    def fits(self, n: int, k: int) -> bool:
        """True when every split is a whole number of BLOCK_K tiles and N a whole number of blocks (no masks)."""
        return k % self.split_k == 0 and (k // self.split_k) % self.block_k == 0 and n % self.block_n == 0


def padded_rows(b: int, dot: bool) -> int:
    """Batch rows a program holds: the next power of two (tl.arange needs one), at least 16 for tl.dot."""
    p = triton.next_power_of_2(b)
    return max(p, DOT_MIN_ROWS) if dot else p


class GemvPlan:
    """y = x @ W.T for a fixed (B, N, K) and config, with its fp32 scratch allocated once (graph-safe)."""

    def __init__(self, b: int, n: int, k: int, cfg: GemvConfig, device: torch.device):
        if n * k >= 2**31 or k % cfg.split_k:
            raise ValueError(f"unsupported shape N={n} K={k} for {cfg}")
        self.b, self.n, self.k, self.cfg = b, n, k, cfg
        self.rows = padded_rows(b, cfg.dot)
        self.even = cfg.fits(n, k)
        self.mode = MODE_DIRECT
        self.scratch = torch.zeros(1, dtype=torch.float32, device=device)  # unused; fp32 keeps one kernel signature
        if cfg.split_k > 1 and cfg.reduce == "partials":
            self.mode = MODE_PARTIALS
            self.scratch = torch.empty(cfg.split_k, b, n, dtype=torch.float32, device=device)  # (S, B, N)
        elif cfg.split_k > 1:
            self.mode = MODE_ATOMIC
            self.scratch = torch.zeros(b, n, dtype=torch.float32, device=device)  # (B, N), kept zero between calls

    def __call__(self, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Write x (B, K) @ w (N, K).T into out (B, N) (row stride free, unit column stride) and return it."""
        cfg, b, n, k = self.cfg, self.b, self.n, self.k
        grid = (triton.cdiv(n, cfg.block_n), cfg.split_k)
        _gemv_kernel[grid](
            x, w, out, self.scratch, b, n, k, k // cfg.split_k, x.stride(0), out.stride(0), self.mode,
            BP=self.rows, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN=self.even, DOT=cfg.dot,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        if self.mode != MODE_DIRECT:
            splits = cfg.split_k if self.mode == MODE_PARTIALS else 1
            _reduce_kernel[(triton.cdiv(b * n, REDUCE_BLOCK),)](
                self.scratch, out, b * n, n, out.stride(0), splits,
                CLEAR=self.mode == MODE_ATOMIC, BLOCK=REDUCE_BLOCK, num_warps=4,
            )  # fmt: skip
        return out


@triton.jit(do_not_specialize=["MODE"])
def _gemv_kernel(
    X, W, Out, Scratch, B, N, K, K_SPLIT, stride_x, stride_o, MODE,
    BP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output columns = rows of W
    rows = tl.arange(0, BP)  # (BP,) batch rows, padded to a power of two
    rk = tl.arange(0, BLOCK_K)  # (BLOCK_K,)
    k_lo = pid_k * K_SPLIT
    k_hi = k_lo + K_SPLIT
    acc = tl.zeros((BP, BLOCK_N), dtype=tl.float32)  # (BP, BLOCK_N)
    acc_1 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # (BLOCK_N, BLOCK_K) batch-1 products, summed once
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + rk  # (BLOCK_K,)
        w_ptrs = W + cols[:, None] * K + ks[None, :]  # (BLOCK_N, BLOCK_K)
        x_ptrs = X + rows[:, None] * stride_x + ks[None, :]  # (BP, BLOCK_K)
        if EVEN:  # W is read once per step: evict it first, keep x (read by every program) in L2
            w = tl.load(w_ptrs, eviction_policy="evict_first")
            x = tl.load(x_ptrs, mask=rows[:, None] < B, other=0.0)
        else:
            w = tl.load(
                w_ptrs, mask=(cols[:, None] < N) & (ks[None, :] < k_hi), other=0.0, eviction_policy="evict_first"
            )
            x = tl.load(x_ptrs, mask=(rows[:, None] < B) & (ks[None, :] < k_hi), other=0.0)
        if DOT:
            acc = tl.dot(x, tl.trans(w), acc)  # (BP, BLOCK_N), fp32 accumulation
        elif BP == 1:
            acc_1 += w.to(tl.float32) * x.to(tl.float32)  # (BLOCK_N, BLOCK_K): x (1, BLOCK_K) broadcast
        else:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)  # (BP, BLOCK_N)
    if not DOT and BP == 1:
        acc = tl.sum(acc_1, axis=1)[None, :]  # (1, BLOCK_N)
    ok = (rows[:, None] < B) & (cols[None, :] < N)  # (BP, BLOCK_N)
    dense = rows[:, None] * N + cols[None, :]  # (BP, BLOCK_N) offsets into a dense (B, N) fp32 buffer
    if MODE == 0:
        tl.store(Out + rows[:, None] * stride_o + cols[None, :], acc.to(Out.dtype.element_ty), mask=ok)
    elif MODE == 1:
        tl.store(Scratch + pid_k * B * N + dense, acc, mask=ok)
    else:
        tl.atomic_add(Scratch + dense, acc, mask=ok)


@triton.jit
def _reduce_kernel(Scratch, Out, TOTAL, N, stride_o, SPLITS, CLEAR: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) flat index into (B, N)
    ok = offs < TOTAL
    s = tl.zeros((BLOCK,), dtype=tl.float32)  # (BLOCK,)
    for i in range(SPLITS):
        s += tl.load(Scratch + i * TOTAL + offs, mask=ok, other=0.0)
    if CLEAR:
        tl.store(Scratch + offs, tl.zeros((BLOCK,), dtype=tl.float32), mask=ok)  # ready for the next atomic call
    tl.store(Out + (offs // N) * stride_o + offs % N, s.to(Out.dtype.element_ty), mask=ok)
