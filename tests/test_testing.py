import json

import torch
from transformers import AutoTokenizer

from pipecat_orpheus import format as fmt
from pipecat_orpheus.testing import make_tiny_model, tiny_llama_config


def test_tiny_model_layout(tiny_model_dir):
    """The tiny model is written in the real on-disk format: safetensors Llama + tokenizer, SNAC config + bin."""
    llm, snac = tiny_model_dir / "llm", tiny_model_dir / "snac"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (llm / name).is_file(), name
    assert (snac / "config.json").is_file() and (snac / "pytorch_model.bin").is_file()
    config = json.loads((llm / "config.json").read_text())
    assert config["vocab_size"] == fmt.VOCAB_SIZE
    assert config["tie_word_embeddings"] is True
    snac_config = json.loads((snac / "config.json").read_text())
    assert snac_config["encoder_rates"] == [2, 4, 8, 8] and snac_config["vq_strides"] == [4, 2, 1]


def test_tiny_tokenizer_special_ids(tiny_model_dir):
    """Llama-3 specials and <custom_token_N> sit at Orpheus's real ids; text stays below 128000."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir / "llm")
    ids = tok.convert_tokens_to_ids(["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"])
    assert ids == [fmt.BOS, fmt.BOS + 1, fmt.EOT]
    assert tok.convert_tokens_to_ids("<custom_token_0>") == fmt.TEXT_VOCAB_SIZE
    assert tok.convert_tokens_to_ids("<custom_token_2>") == fmt.END_OF_SPEECH
    assert tok.convert_tokens_to_ids("<custom_token_10>") == fmt.AUDIO_TOKEN_OFFSET
    assert tok.convert_tokens_to_ids("<custom_token_28683>") == fmt.VOCAB_SIZE - 1
    assert len(tok) == fmt.VOCAB_SIZE
    text_ids = tok.encode("tara: Hello <laugh> wörld!", add_special_tokens=False)
    assert text_ids and max(text_ids) < fmt.BOS
    assert tok.decode(text_ids) == "tara: Hello <laugh> wörld!"
    assert tok.encode("Hi")[0] == fmt.BOS  # like Llama-3, BOS is added by default


def test_tiny_model_is_deterministic(tmp_path, tiny_model_dir):
    """Two builds write identical weights, so every test sees the same model."""
    make_tiny_model(tmp_path)
    a = (tmp_path / "llm" / "model.safetensors").read_bytes()
    b = (tiny_model_dir / "llm" / "model.safetensors").read_bytes()
    assert a == b
    sa = torch.load(tmp_path / "snac" / "pytorch_model.bin", weights_only=True)
    sb = torch.load(tiny_model_dir / "snac" / "pytorch_model.bin", weights_only=True)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_llama_config_overrides():
    """The config builder keeps Orpheus's vocabulary and rope while letting callers resize the model."""
    cfg = tiny_llama_config(num_hidden_layers=4)
    assert cfg.num_hidden_layers == 4 and cfg.vocab_size == fmt.VOCAB_SIZE
    assert cfg.max_position_embeddings >= 4096
