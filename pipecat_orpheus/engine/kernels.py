"""Fused Triton kernels for the decode step: fewer launches per layer, the same arithmetic.

A decode step at small batch is bound by weight reads plus one launch per small op; the plain
PyTorch layer issues ~30 elementwise kernels, these three replace them with one each:
residual add + RMSNorm, rope on q and k + the K/V cache write, and SiLU(gate) * up. Each kernel
rounds to the model dtype wherever transformers' Llama does, so it computes the same function.
Only imported where Triton exists (CUDA builds of torch, or the interpreter in tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, RMSNorm(x + residual) * weight) for (B, H) rows; residual None: plain norm."""
    b, h = x.shape
    out = torch.empty_like(x)  # (B, H)
    summed = torch.empty_like(x) if residual is not None else x  # (B, H)
    _add_rms_norm_kernel[(b,)](
        x, residual if residual is not None else x, weight, out, summed, x.stride(0),
        residual.stride(0) if residual is not None else 0, eps,
        N=h, BLOCK=triton.next_power_of_2(h), HAS_RESIDUAL=residual is not None, num_warps=8,
    )  # fmt: skip
    return summed, out


def rope_and_cache(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    num_heads: int,
) -> torch.Tensor:
    """Rope q and k of fused qkv rows (B, (NH + 2 KVH) * D); write k, v to the slot cache; return q (B, NH, D)."""
    b = qkv.shape[0]
    kv_heads, d = k_cache.shape[1], k_cache.shape[3]
    q = torch.empty(b, num_heads, d, dtype=qkv.dtype, device=qkv.device)  # (B, NH, D)
    _rope_cache_kernel[(b, num_heads + kv_heads)](
        qkv, cos, sin, positions, slots, q, k_cache, v_cache, qkv.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NH=num_heads, KVH=kv_heads, D=d, HALF=d // 2, num_warps=1,
    )  # fmt: skip
    return q


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for rows (B, 2F) laid out [gate | up] -> (B, F)."""
    b, two_f = gate_up.shape
    f = two_f // 2
    out = torch.empty(b, f, dtype=gate_up.dtype, device=gate_up.device)  # (B, F)
    block = 1024
    _silu_mul_kernel[(b, triton.cdiv(f, block))](gate_up, out, gate_up.stride(0), F=f, BLOCK=block, num_warps=4)
    return out


@triton.jit
def _add_rms_norm_kernel(
    X, R, W, Out, Sum, stride_x, stride_r, eps, N: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    ok = offs < N
    x = tl.load(X + row * stride_x + offs, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + offs, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # the residual stream is kept in the model dtype
        tl.store(Sum + row * N + offs, x, mask=ok)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, 0) / N
    normed = (xf * (1.0 / tl.sqrt(var + eps))).to(x.dtype)  # float32 norm, cast back, as transformers
    w = tl.load(W + offs, mask=ok, other=0.0)
    tl.store(Out + row * N + offs, (w.to(tl.float32) * normed.to(tl.float32)).to(x.dtype), mask=ok)


@triton.jit
def _rope_cache_kernel(
    QKV, Cos, Sin, Pos, Slots, Q, KC, VC, stride_qkv, stride_ks, stride_kh, stride_kl,
    NH: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    head = tl.program_id(1)  # q heads first, then k heads (which also copy their v head)
    pos = tl.load(Pos + row)
    d = tl.arange(0, HALF)
    base = QKV + row * stride_qkv + head * D
    x1 = tl.load(base + d)
    x2 = tl.load(base + HALF + d)
    dt = x1.dtype
    cos1 = tl.load(Cos + pos * D + d).to(tl.float32)
    cos2 = tl.load(Cos + pos * D + HALF + d).to(tl.float32)
    sin1 = tl.load(Sin + pos * D + d).to(tl.float32)
    sin2 = tl.load(Sin + pos * D + HALF + d).to(tl.float32)
    # x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]; each product and the sum rounded as torch does
    o1 = ((x1.to(tl.float32) * cos1).to(dt).to(tl.float32) + (-x2.to(tl.float32) * sin1).to(dt).to(tl.float32)).to(dt)
    o2 = ((x2.to(tl.float32) * cos2).to(dt).to(tl.float32) + (x1.to(tl.float32) * sin2).to(dt).to(tl.float32)).to(dt)
    if head < NH:
        q_base = Q + (row * NH + head) * D
        tl.store(q_base + d, o1)
        tl.store(q_base + HALF + d, o2)
    else:
        kv_head = head - NH
        slot = tl.load(Slots + row)
        dst = slot * stride_ks + kv_head * stride_kh + pos * stride_kl
        kv_dt = KC.dtype.element_ty  # the model dtype, or float8 e4m3
        tl.store(KC + dst + d, o1.to(tl.float32).to(kv_dt))
        tl.store(KC + dst + HALF + d, o2.to(tl.float32).to(kv_dt))
        full = tl.arange(0, D)
        v = tl.load(QKV + row * stride_qkv + (NH + KVH + kv_head) * D + full)
        tl.store(VC + dst + full, v.to(tl.float32).to(kv_dt))


@triton.jit
def _silu_mul_kernel(GU, Out, stride_gu, F: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < F
    g = tl.load(GU + row * stride_gu + offs, mask=ok, other=0.0)
    u = tl.load(GU + row * stride_gu + F + offs, mask=ok, other=0.0)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)  # silu in float32, rounded, as torch does for bf16
    tl.store(Out + row * F + offs, (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=ok)
