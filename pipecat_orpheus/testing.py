"""A tiny Orpheus-format model for tests and CI: random weights, real on-disk layout. Noise, not speech.

`make_tiny_model(root)` writes:

- `root/llm`: a small random `LlamaForCausalLM` with the full 156,940-token Orpheus vocabulary,
  llama3 rope scaling and tied embeddings like the real checkpoint, saved as safetensors, plus a
  small tokenizer built with the `tokenizers` library. Text is byte-level (ids 0..255), the
  Llama-3 special tokens sit at their real ids (128000..128255) and `<custom_token_N>` at
  128256 + N, so every id in `format.py` means what it means for Orpheus.
- `root/snac`: a small random SNAC with the 24 kHz model's hop (512), codebooks and noise,
  written as `config.json` + `pytorch_model.bin` like `hubertsiuzdak/snac_24khz`.

`forced_tokens` drives the engine's host side (frames, the integrity guard) with chosen tokens.

Both load through `pipecat_orpheus.loader` exactly as the real weights do. The weights are random
(seeded, so the files are identical run to run): the model emits random audio tokens and SNAC
turns them into noise. Nothing here produces speech.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipecat_orpheus import format as fmt

if TYPE_CHECKING:
    from pipecat_orpheus.engine.request import Request
    from pipecat_orpheus.engine.scheduler import ScheduledStep

TINY_SEED = 1234  # fixed so the tiny model (and every test built on it) is the same on every machine

# Llama-3 special tokens at their real ids (128000 + index); the rest are reserved placeholders.
_LLAMA3_SPECIALS = {
    0: "<|begin_of_text|>",
    1: "<|end_of_text|>",
    4: "<|finetune_right_pad_id|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    8: "<|eom_id|>",
    9: "<|eot_id|>",
    10: "<|python_tag|>",
}
_N_LLAMA3_SPECIALS = fmt.TEXT_VOCAB_SIZE - fmt.BOS  # 256 ids, 128000..128255
_N_CUSTOM_TOKENS = fmt.VOCAB_SIZE - fmt.TEXT_VOCAB_SIZE  # 28684 <custom_token_N>, N = 0..28683
_N_BYTE_TOKENS = 256  # byte-level BPE alphabet: every text is encodable


def tiny_llama_config(**overrides: object):
    """The tiny model's `LlamaConfig`: Orpheus's vocabulary, rope and special ids, small sizes.

    `overrides` replace any field (e.g. `num_hidden_layers=4`), so other helpers can reuse it.
    """
    from transformers import LlamaConfig

    values: dict[str, object] = {
        "vocab_size": fmt.VOCAB_SIZE,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 131072,  # as the real config (rope is computed, not stored)
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "bos_token_id": fmt.BOS,
        "eos_token_id": fmt.BOS + 1,  # <|end_of_text|>, as in the real config (generation stops on END_OF_SPEECH)
        "rope_theta": 500000.0,
        "rope_scaling": {  # the real checkpoint's llama3 scaling
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "torch_dtype": "float32",
    }
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_snac_config() -> dict:
    """Constructor kwargs of the tiny SNAC: the 24 kHz model's rates and codebooks, narrow channels."""
    return {
        "sampling_rate": fmt.SAMPLE_RATE,
        "encoder_dim": 4,  # latent 4 * 2**4 = 64 channels (real: 48 -> 768)
        "encoder_rates": [2, 4, 8, 8],  # hop 512, as the real model
        "decoder_dim": 64,  # real: 1024; 64 keeps CPU decode fast
        "decoder_rates": [8, 8, 4, 2],
        "attn_window_size": None,
        "codebook_size": fmt.CODEBOOK_SIZE,
        "codebook_dim": 8,
        "vq_strides": [4, 2, 1],  # 4 latent steps per L0 code: one frame = 2048 samples
        "noise": True,
        "depthwise": True,
    }


def make_tiny_tokenizer(path: Path) -> None:
    """Write a byte-level tokenizer with Orpheus's special-token layout to `path` (AutoTokenizer loads it)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 printable stand-ins for bytes
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    for i in range(_N_BYTE_TOKENS, fmt.BOS):  # unused filler ids, so the specials land at their real ids
        vocab[f"<|tiny_filler_{i}|>"] = i
    specials = []
    for j in range(_N_LLAMA3_SPECIALS):
        name = _LLAMA3_SPECIALS.get(j, f"<|reserved_special_token_{j}|>")
        vocab[name] = fmt.BOS + j
        specials.append(name)
    for n in range(_N_CUSTOM_TOKENS):
        name = f"<custom_token_{n}>"
        vocab[name] = fmt.TEXT_VOCAB_SIZE + n
        specials.append(name)
    assert len(vocab) == fmt.VOCAB_SIZE

    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    bos = _LLAMA3_SPECIALS[0]
    tok.post_processor = processors.TemplateProcessing(  # like Llama-3: BOS before every encoded text
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, fmt.BOS)]
    )
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": _LLAMA3_SPECIALS[9],  # <|eot_id|>
        "pad_token": f"<custom_token_{fmt.PAD - fmt.TEXT_VOCAB_SIZE}>",
        "model_max_length": 131072,
        "clean_up_tokenization_spaces": False,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    special_map = {k: tokenizer_config[k] for k in ("bos_token", "eos_token", "pad_token")}
    (path / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))


def make_tiny_llm(path: Path, *, seed: int = TINY_SEED) -> None:
    """Write the tiny random Llama (safetensors) and its tokenizer to `path`."""
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_llama_config())
    model.generation_config.eos_token_id = fmt.END_OF_SPEECH
    model.save_pretrained(path, safe_serialization=True)
    make_tiny_tokenizer(path)


def make_tiny_snac(path: Path, *, seed: int = TINY_SEED) -> None:
    """Write the tiny random SNAC as `config.json` + `pytorch_model.bin` to `path`."""
    from snac import SNAC

    config = tiny_snac_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SNAC(**config)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    torch.save(model.state_dict(), path / "pytorch_model.bin")


def make_tiny_model(root: Path | str) -> None:
    """Write `root/llm` (tiny Llama + tokenizer) and `root/snac` (tiny SNAC). Random weights: noise, not speech."""
    root = Path(root)
    make_tiny_llm(root / "llm")
    make_tiny_snac(root / "snac")


def tiny_model_overrides(root: Path | str) -> dict[str, object]:
    """Config overrides (`load_config(overrides=...)`) for the tiny model `make_tiny_model(root)` wrote, on the CPU.

    A shared CPU runs the tiny model near or below real time, so refusing streams by speed
    (`engine.busy_below_speed`) is off: what a test admits must not depend on the machine.
    """
    root = Path(root)
    return {
        "model.llm": str(root / "llm"), "model.codec": str(root / "snac"), "model.device": "cpu",
        "engine.busy_below_speed": 0.0,
    }  # fmt: skip


def forced_tokens(
    script: Callable[[Request, int], int | None],
) -> Callable[[ScheduledStep, list[int], list[int]], None]:
    """A test hook for `OrpheusEngine.rewrite_tokens`: the tokens the host sees are `script`'s, not the sampled ones.

    Token `index` of a request's current piece becomes `script(request, index)` (None keeps the
    sampled token). The model's own next input stays the token it sampled: only what the host
    does with tokens (frames, the integrity guard, the codec) is driven, e.g. with a loop of frames.
    """

    def rewrite(step: ScheduledStep, decode_tokens: list[int], first_tokens: list[int]) -> None:
        for i, (request, index) in enumerate(zip(step.decode, step.generated, strict=True)):
            decode_tokens[i] = _or(script(request, index), decode_tokens[i])
        for j, chunk in enumerate([c for c in step.prefill if c.last]):
            first_tokens[j] = _or(script(chunk.request, 0), first_tokens[j])

    return rewrite


def _or(forced: int | None, sampled: int) -> int:
    return sampled if forced is None else forced
