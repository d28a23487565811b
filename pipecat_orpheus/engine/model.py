"""The engine's Llama forward: math only, over a static slotted KV cache.

Weights are taken from a loaded transformers `LlamaForCausalLM` (q/k/v and gate/up fused into
one matrix each; the model's own modules are re-pointed at views of the fused weights, so no
memory is duplicated and transformers still runs the same model for the reference path). The
LM head keeps only the audio rows plus END_OF_SPEECH: the other 128k rows can never be sampled.
The arithmetic follows transformers' Llama step for step (RMSNorm in float32, rope in the
model dtype) so greedy decoding gives the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import decode_attention
from .sampler import head_token_ids

_HEAD_ALIGN = 64  # 28673 head rows padded to 28736: an aligned GEMM (an odd N falls back to a slow kernel)


@dataclass(frozen=True, slots=True)
class LayerWeights:
    """One decoder layer's weights, (out_features, in_features) as in nn.Linear."""

    input_norm: torch.Tensor  # (H,)
    qkv: torch.Tensor  # ((NH + 2 * KVH) * D, H)
    o: torch.Tensor  # (H, NH * D)
    post_norm: torch.Tensor  # (H,)
    gate_up: torch.Tensor  # (2 * F, H)
    down: torch.Tensor  # (H, F)


def store_kv(cache: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> None:
    """cache[slots, :, positions] = values (tokens, KVH, D); a float8 cache is written through a byte view."""
    if cache.dtype == values.dtype:
        cache[slots, :, positions] = values
    else:  # index_put has no float8 kernel on every build: move the bytes instead
        cache.view(torch.uint8)[slots, :, positions] = values.to(cache.dtype).view(torch.uint8)


def _fuse(linears: list[torch.nn.Linear]) -> torch.Tensor:
    """Concatenate nn.Linear weights along out_features and re-point each module at its view."""
    fused = torch.cat([m.weight.detach() for m in linears], dim=0)  # (sum out, in)
    row = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight.data = fused[row : row + n]  # a view: the module keeps working, memory is shared
        row += n
    return fused


class OrpheusLM:
    """Decode and prefill forwards of an Orpheus (Llama-3.2-3B-shaped) model.

    Args:
        hf_model: a loaded `LlamaForCausalLM` (its weights are shared, not copied, except the head rows).
        max_positions: positions per slot (the rope table's length).
    """

    def __init__(self, hf_model, *, max_positions: int):
        cfg = hf_model.config
        inner = hf_model.model
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.num_layers = cfg.num_hidden_layers
        self.embed = inner.embed_tokens.weight.detach()  # (V, H)
        self.dtype = self.embed.dtype
        self.device = self.embed.device
        self.layers = []
        with torch.no_grad():
            for layer in inner.layers:
                attn, mlp = layer.self_attn, layer.mlp
                self.layers.append(
                    LayerWeights(
                        input_norm=layer.input_layernorm.weight.detach(),
                        qkv=_fuse([attn.q_proj, attn.k_proj, attn.v_proj]),
                        o=attn.o_proj.weight.detach(),
                        post_norm=layer.post_attention_layernorm.weight.detach(),
                        gate_up=_fuse([mlp.gate_proj, mlp.up_proj]),
                        down=mlp.down_proj.weight.detach(),
                    )
                )
            self.final_norm = inner.norm.weight.detach()  # (H,)
            rows = head_token_ids().to(self.device)  # (N_HEAD_ROWS,)
            head = hf_model.lm_head.weight.detach().index_select(0, rows)  # (N_HEAD_ROWS, H)
            pad = -len(rows) % _HEAD_ALIGN  # zero rows: their logits are never read
            self.head = torch.cat([head, head.new_zeros(pad, head.shape[1])]).contiguous()  # (N_HEAD_ROWS + pad, H)
            # rope table exactly as transformers builds cos/sin: float32 product, then cast
            rotary = inner.rotary_emb
            inv_freq = rotary.inv_freq.float().to(self.device)  # (D / 2,)
            freqs = torch.arange(max_positions, device=self.device).float()[:, None] * inv_freq[None, :]  # (P, D/2)
            emb = torch.cat([freqs, freqs], dim=-1)  # (P, D)
            self.cos = (emb.cos() * rotary.attention_scaling).to(self.dtype)  # (P, D)
            self.sin = (emb.sin() * rotary.attention_scaling).to(self.dtype)  # (P, D)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim

    # -- building blocks (transformers' arithmetic) --------------------------------------------

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * h.to(x.dtype)

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def _qkv(self, x: torch.Tensor, layer: LayerWeights, positions: torch.Tensor):
        """(tokens, H) -> rope'd q (tokens, NH, D), k and v (tokens, KVH, D)."""
        qkv = F.linear(x, layer.qkv)  # (tokens, (NH + 2 KVH) * D)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)  # (tokens, NH, D)
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # (tokens, KVH, D)
        v = v.view(-1, self.num_kv_heads, self.head_dim)  # (tokens, KVH, D)
        cos = self.cos[positions][:, None, :]  # (tokens, 1, D)
        sin = self.sin[positions][:, None, :]  # (tokens, 1, D)
        return self._rope(q, cos, sin), self._rope(k, cos, sin), v

    def _mlp(self, x: torch.Tensor, layer: LayerWeights) -> torch.Tensor:
        gate, up = F.linear(x, layer.gate_up).chunk(2, dim=-1)  # (tokens, F) each
        return F.linear(F.silu(gate) * up, layer.down)  # (tokens, H)

    def head_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The head rows over final-normed hidden states: (tokens, H) -> (tokens, N_HEAD_ROWS + padding) float32."""
        return F.linear(x, self.head).float()

    # -- forwards --------------------------------------------------------------------------

    def forward(self, input_ids, positions, slots, k_cache, v_cache, max_len: int, use_triton: bool) -> torch.Tensor:
        """(B,) tokens at (B,) positions of (B,) slots -> (B, H) final-normed hidden states.

        Writes each row's K/V at its position, then attends over its slot's positions 0..position.
        k_cache, v_cache: (layers, S + 1, KVH, L, D). `max_len` bounds positions + 1 (the SDPA
        fallback crops the cache to it). With `use_triton` the fused kernels run.
        """
        lens = positions + 1  # (B,) live length after this token's K/V is written
        if use_triton:
            return self._forward_fused(input_ids, positions, lens, slots, k_cache, v_cache)
        h = F.embedding(input_ids, self.embed)  # (B, H)
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(self._norm(h, layer.input_norm), layer, positions)
            kc, vc = k_cache[i], v_cache[i]  # (S + 1, KVH, L, D) views
            store_kv(kc, slots, positions, k)  # (B, KVH, D)
            store_kv(vc, slots, positions, v)
            o = decode_attention(q, kc, vc, slots, lens, max_len=max_len, use_triton=False)  # (B, NH, D)
            h = h + F.linear(o.reshape(o.shape[0], -1), layer.o)  # (B, H)
            h = h + self._mlp(self._norm(h, layer.post_norm), layer)  # (B, H)
        return self._norm(h, self.final_norm)

    def _forward_fused(self, input_ids, positions, lens, slots, k_cache, v_cache) -> torch.Tensor:
        """`forward` with Triton kernels: 10 launches per layer (4 of them matmuls)."""
        from . import kernels  # needs Triton

        b = input_ids.shape[0]
        h, x = kernels.add_rms_norm(F.embedding(input_ids, self.embed), None, self.layers[0].input_norm, self.eps)
        for i, layer in enumerate(self.layers):
            kc, vc = k_cache[i], v_cache[i]  # (S + 1, KVH, L, D) views
            qkv = F.linear(x, layer.qkv)  # (B, (NH + 2 KVH) * D)
            q = kernels.rope_and_cache(qkv, self.cos, self.sin, positions, slots, kc, vc, self.num_heads)  # (B, NH, D)
            o = decode_attention(q, kc, vc, slots, lens, max_len=0, use_triton=True)  # (B, NH, D)
            h, x = kernels.add_rms_norm(F.linear(o.reshape(b, -1), layer.o), h, layer.post_norm, self.eps)
            mlp = F.linear(kernels.silu_mul(F.linear(x, layer.gate_up)), layer.down)  # (B, H)
            nxt = self.layers[i + 1].input_norm if i + 1 < self.num_layers else self.final_norm
            h, x = kernels.add_rms_norm(mlp, h, nxt, self.eps)  # (B, H) residual stream and its next norm
        return x  # (B, H) after the final norm
