import math
import os

import pytest
import torch

from pipecat_orpheus import format as fmt
from pipecat_orpheus.engine import attention
from pipecat_orpheus.engine.attention import decode_attention, num_splits
from pipecat_orpheus.engine.model import OrpheusLM
from pipecat_orpheus.engine.sampler import head_token_ids
from pipecat_orpheus.loader import load_llm


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    model, tokenizer = load_llm(str(tiny_model_dir / "llm"), dtype=torch.float32, device="cpu")
    return model, tokenizer


def naive_attention(q, k_cache, v_cache, slots, lens):
    """Per-row softmax attention over the live positions, GQA by repeating KV heads."""
    out = []
    group = q.shape[1] // k_cache.shape[1]
    for b in range(q.shape[0]):
        k = k_cache[slots[b], :, : lens[b]].repeat_interleave(group, 0)  # (H, len, D)
        v = v_cache[slots[b], :, : lens[b]].repeat_interleave(group, 0)
        w = torch.softmax((k @ q[b][:, :, None])[..., 0] / math.sqrt(q.shape[-1]), dim=-1)  # (H, len)
        out.append((w[:, None, :] @ v)[:, 0])
    return torch.stack(out)


def random_cache(slots=5, kv_heads=2, length=300, dim=16):
    torch.manual_seed(0)
    return torch.randn(slots + 1, kv_heads, length, dim), torch.randn(slots + 1, kv_heads, length, dim)


def test_decode_attention_reads_live_lengths_only():
    """The SDPA fallback attends over exactly each row's live positions of its own slot."""
    k_cache, v_cache = random_cache()
    q = torch.randn(3, 6, 16)
    slots, lens = torch.tensor([4, 0, 2]), torch.tensor([1, 300, 77])
    v_poisoned = v_cache.clone()
    v_poisoned[2, :, 77:] = 1e4  # beyond slot 2's live length: must not reach the result
    out = decode_attention(q, k_cache, v_poisoned, slots, lens, max_len=300, use_triton=False)
    torch.testing.assert_close(out, naive_attention(q, k_cache, v_cache, slots, lens))


needs_triton_interpreter = pytest.mark.skipif(
    attention.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs Triton's CPU interpreter: TRITON_INTERPRET=1 pytest tests/engine (with triton installed)",
)


@needs_triton_interpreter
def test_triton_decode_kernel_matches_naive():
    """The split-K Triton kernel (interpreted on CPU) equals naive attention, with empty and partial splits."""
    k_cache, v_cache = random_cache()
    for batch in (1, 3):
        q = torch.randn(batch, 6, 16)
        slots, lens = torch.tensor([4, 0, 2][:batch]), torch.tensor([130, 300, 1][:batch])
        out = decode_attention(q, k_cache, v_cache, slots, lens, max_len=300, use_triton=True)
        torch.testing.assert_close(out, naive_attention(q, k_cache, v_cache, slots, lens), atol=1e-5, rtol=1e-4)


def test_num_splits_fills_the_gpu_and_is_a_power_of_two():
    """Small batches get many splits, large ones one; always a power of two up to 32."""
    assert num_splits(1, 8) == 32 and num_splits(256, 8) == 1
    assert all(n & (n - 1) == 0 and 1 <= n <= 32 for n in (num_splits(b, 8) for b in range(1, 300)))


def test_chunked_prefill_and_decode_match_transformers(llm):
    """Head-row logits of chunked prefill then decode equal transformers' full-vocabulary forward."""
    model, tokenizer = llm
    lm = OrpheusLM(model, max_positions=64)
    shape = (lm.num_layers, 3, lm.num_kv_heads, 64, lm.head_dim)
    k_cache, v_cache = torch.zeros(shape), torch.zeros(shape)
    prompts = [fmt.build_prompt(tokenizer, t, "tara") for t in ("hello there", "hi")]
    slots = torch.tensor([1, 0])
    # two chunks for the first prompt (the second chunk attends to the first through the cache)
    split = 6
    with torch.inference_mode():
        first_chunk = torch.tensor(prompts[0][:split])
        lm.forward(first_chunk, torch.arange(split), torch.full((split,), 1), k_cache, v_cache, split, False)
        # one flat step: the rest of prompt 0 (slot 1), all of prompt 1 (slot 0), two padding tokens (dummy slot 2)
        rest = prompts[0][split:]
        ids = torch.tensor([*rest, *prompts[1], 0, 0])  # (T,)
        pos = torch.tensor([*range(split, len(prompts[0])), *range(len(prompts[1])), 0, 0])  # (T,)
        tok_slots = torch.tensor([1] * len(rest) + [0] * len(prompts[1]) + [2, 2])  # (T,)
        hidden = lm.forward(ids, pos, tok_slots, k_cache, v_cache, len(prompts[0]), False)  # (T, H)
        last = lm.head_logits(hidden[[len(rest) - 1, len(rest) + len(prompts[1]) - 1]])  # (2, head rows)
        nxt = torch.tensor([fmt.audio_token(0, 7), fmt.audio_token(0, 9)])
        positions = torch.tensor([len(prompts[0]), len(prompts[1])])
        step = lm.head_logits(lm.forward(nxt, positions, slots, k_cache, v_cache, 64, False))  # a decode step
        rows = head_token_ids()
        for i, prompt in enumerate(prompts):
            ref = model(torch.tensor([[*prompt, int(nxt[i])]])).logits[0].float()  # (P + 1, V)
            torch.testing.assert_close(last[i, : len(rows)], ref[-2, rows], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(step[i, : len(rows)], ref[-1, rows], atol=1e-4, rtol=1e-4)
        assert (last[:, len(rows) :] == 0).all()  # alignment padding rows of the head


def test_fused_weights_are_shared_with_the_transformers_model(llm):
    """Fusing q/k/v and gate/up re-points the transformers modules at views: no copy, same outputs."""
    model, _ = llm
    lm = OrpheusLM(model, max_positions=16)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.data_ptr() == lm.layers[0].qkv.data_ptr()
    assert model.model.layers[0].mlp.up_proj.weight.untyped_storage().data_ptr() == lm.layers[0].gate_up.data_ptr()


@needs_triton_interpreter
def test_fused_decode_kernels_match_plain_decode(llm):
    """Fused Triton prefill and decode (norms, rope + cache write, SiLU) give the plain path's logits and cache."""
    model, tokenizer = llm
    lm = OrpheusLM(model, max_positions=64)
    prompt = fmt.build_prompt(tokenizer, "hello", "tara")
    shape = (lm.num_layers, 3, lm.num_kv_heads, 64, lm.head_dim)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(2)]
    slots, n = torch.tensor([1]), len(prompt)
    logits = []
    with torch.inference_mode():
        for (kc, vc), fused in zip(caches, (False, True), strict=False):
            lm.forward(torch.tensor(prompt), torch.arange(n), slots.repeat(n), kc, vc, n, fused)
            nxt = torch.tensor([fmt.audio_token(0, 3)])
            logits.append(lm.head_logits(lm.forward(nxt, torch.tensor([n]), slots, kc, vc, n + 1, fused)))
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(caches[1][0], caches[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(caches[1][1], caches[0][1])
