"""Attention over the static slotted KV cache, reading only each slot's live length.

Cache layout: (slots + 1, kv_heads, max_len, head_dim) per layer; the batch index is the slot,
and the last slot is a dummy that padding rows of a CUDA-graph bucket write to. The cache may be
float8 (e4m3, unscaled): it is upcast to the query dtype as it is read.

Decode uses a Triton split-K kernel (one program per row, KV head and split of the live length,
then a log-sum-exp merge of the splits), so a step costs the bytes of the live KV, not of the
whole cache, and its shapes are static (CUDA-graph safe). Without Triton (CPU tests) the same
call falls back to SDPA over the cache cropped to the batch's longest live length. Prefill
uses the same call with one row per prompt token (its slot, its position + 1 as the length).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

try:  # Triton ships with CUDA builds of torch; CPU-only installs use the SDPA fallback
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

_TILE_BYTES = 64 * 128 * 2  # bytes of K per inner iteration: 64 positions of bf16 (128 of fp8)
_MAX_SPLITS = 32  # splits of the live length per (row, KV head) at batch 1
_PROGRAMS_PER_SM = 4  # programs per SM a decode launch aims for: every SM busy several times over
_CPU_SMS = 132  # the SM count assumed off the GPU (an H100's; Triton's CPU interpreter in tests)


def triton_available(device: torch.device) -> bool:
    """Whether the Triton decode kernel can run on `device`."""
    return triton is not None and (device.type == "cuda" or _interpreting())


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device`, read from the device itself."""
    if device.type != "cuda":
        return _CPU_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def num_splits(batch: int, kv_heads: int, sms: int = _CPU_SMS) -> int:
    """Splits of each live length so that a decode launch on `sms` SMs has enough programs (a power of two)."""
    want = max(1, math.ceil(_PROGRAMS_PER_SM * sms / (batch * kv_heads)))
    return min(_MAX_SPLITS, 1 << (want - 1).bit_length())


def gather_kv(cache: torch.Tensor, slots: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """cache[slots, :, :length] as `dtype`; a float8 cache is gathered through a byte view, then upcast."""
    if cache.dtype.itemsize == 1 and cache.dtype != torch.uint8:
        return cache.view(torch.uint8)[slots, :, :length].view(cache.dtype).to(dtype)
    return cache[slots, :, :length].to(dtype)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    lens: torch.Tensor,
    *,
    max_len: int,
    use_triton: bool,
) -> torch.Tensor:
    """One query token per row against its slot's first `lens[row]` cached positions.

    Args:
        q: (B, H, D) queries (rope applied).
        k_cache: (S + 1, KVH, L, D) one layer's keys.
        v_cache: (S + 1, KVH, L, D) one layer's values.
        slots: (B,) int64 slot of each row.
        lens: (B,) int64 live length of each row (>= 1).
        max_len: an upper bound of `lens` known on the host (the SDPA fallback crops to it).
        use_triton: run the split-K kernel (CUDA, or the Triton interpreter in tests).

    Returns:
        (B, H, D) attention output in q's dtype.
    """
    if use_triton:
        return _triton_decode(q, k_cache, v_cache, slots, lens)
    keys = gather_kv(k_cache, slots, max_len, q.dtype)  # (B, KVH, max_len, D)
    values = gather_kv(v_cache, slots, max_len, q.dtype)  # (B, KVH, max_len, D)
    live = torch.arange(max_len, device=q.device)[None, :] < lens[:, None]  # (B, max_len)
    out = F.scaled_dot_product_attention(
        q[:, :, None, :], keys, values, attn_mask=live[:, None, None, :], enable_gqa=True
    )  # (B, H, 1, D)
    return out[:, :, 0, :]


def _triton_decode(q, k_cache, v_cache, slots, lens):
    b, h, d = q.shape
    kvh = k_cache.shape[1]
    splits = num_splits(b, kvh, sm_count(q.device))
    part = torch.empty(b, h, splits, d, dtype=torch.float32, device=q.device)  # (B, H, splits, D)
    lse = torch.empty(b, h, splits, dtype=torch.float32, device=q.device)  # (B, H, splits)
    out = torch.empty_like(q)  # (B, H, D)
    _decode_split_kernel[(b, kvh, splits)](
        q, k_cache, v_cache, slots, lens, part, lse,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        1.0 / math.sqrt(d),
        GROUP=h // kvh, BLOCK_H=16, BLOCK_N=_TILE_BYTES // (d * k_cache.element_size()), D=d, SPLITS=splits,
        num_warps=4, num_stages=2,
    )  # fmt: skip
    _merge_splits_kernel[(b, h)](
        part, lse, out, out.stride(0), out.stride(1),
        SPLITS=splits, BLOCK_S=max(2, splits), D=d,
    )  # fmt: skip
    return out


if triton is not None:

    @triton.jit
    def _decode_split_kernel(
        Q, K, V, Slots, Lens, Part, Lse,
        stride_qb, stride_qh,
        stride_ks, stride_kh, stride_kl,
        stride_vs, stride_vh, stride_vl,
        sm_scale,
        GROUP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
    ):  # fmt: skip
        """One (row, KV head, split): online softmax over the split's live KV positions."""
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        slot = tl.load(Slots + row)
        length = tl.load(Lens + row)
        split_len = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_N) * BLOCK_N
        start = split * split_len
        end = tl.minimum(start + split_len, length)

        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, D)
        offs_n = tl.arange(0, BLOCK_N)
        heads = kv_head * GROUP + offs_h  # (BLOCK_H,) query heads sharing this KV head
        h_ok = offs_h < GROUP
        q = tl.load(Q + row * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=h_ok[:, None], other=0.0)
        k_base = K + slot * stride_ks + kv_head * stride_kh
        v_base = V + slot * stride_vs + kv_head * stride_vh

        m_i = tl.full([BLOCK_H], -float("inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, D], dtype=tl.float32)
        for n0 in range(start, end, BLOCK_N):
            n = n0 + offs_n
            n_ok = n < end
            k = tl.load(k_base + n[:, None] * stride_kl + offs_d[None, :], mask=n_ok[:, None], other=0.0).to(q.dtype)
            qk = tl.dot(q, tl.trans(k)) * sm_scale  # (BLOCK_H, BLOCK_N)
            qk = tl.where(n_ok[None, :], qk, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.exp(qk - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + n[:, None] * stride_vl + offs_d[None, :], mask=n_ok[:, None], other=0.0).to(q.dtype)
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v)
            m_i = m_new

        has = l_i > 0
        acc = acc / tl.where(has, l_i, 1.0)[:, None]
        lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), -float("inf"))
        part_row = (row * tl.num_programs(1) * GROUP + heads) * SPLITS + split  # (BLOCK_H,) into (B, H, splits)
        tl.store(Part + part_row[:, None] * D + offs_d[None, :], acc, mask=h_ok[:, None])
        tl.store(Lse + part_row, lse, mask=h_ok)

    @triton.jit
    def _merge_splits_kernel(
        Part, Lse, Out, stride_ob, stride_oh, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, D: tl.constexpr
    ):
        """One (row, head): weight each split's partial output by its share of the softmax mass."""
        row = tl.program_id(0)
        head = tl.program_id(1)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, D)
        base = row * tl.num_programs(1) + head
        lse = tl.load(Lse + base * SPLITS + offs_s, mask=offs_s < SPLITS, other=-float("inf"))  # (BLOCK_S,)
        w = tl.exp(lse - tl.max(lse, 0))
        w = w / tl.sum(w, 0)
        part = tl.load(
            Part + (base * SPLITS + offs_s)[:, None] * D + offs_d[None, :], mask=(offs_s < SPLITS)[:, None], other=0.0
        )  # (BLOCK_S, D)
        out = tl.sum(w[:, None] * part, 0)
        tl.store(Out + row * stride_ob + head * stride_oh + offs_d, out.to(Out.dtype.element_ty))
