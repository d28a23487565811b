"""Shared fixtures: the tiny real-format Orpheus model (built once per session), its config and synthesizer, the bot."""

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch

from pipecat_orpheus.config import Config
from pipecat_orpheus.loader import load_llm, load_snac
from pipecat_orpheus.speech import Synthesizer, load_synthesizer
from pipecat_orpheus.testing import make_tiny_model
from tests.helpers import load_bot, tiny_config


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding `llm/` (tiny Llama + tokenizer) and `snac/` (tiny SNAC), noise not speech."""
    root = tmp_path_factory.mktemp("tiny")
    make_tiny_model(root)
    return root


@pytest.fixture(scope="session")
def tiny_models(tiny_model_dir: Path) -> tuple:
    """(llm, tokenizer, snac) of the tiny model, loaded once through the real loader on the CPU in float32."""
    llm, tokenizer = load_llm(str(tiny_model_dir / "llm"), dtype=torch.float32, device="cpu")
    return llm, tokenizer, load_snac(str(tiny_model_dir / "snac"), device="cpu")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for the module: the tiny models' kernels are too small to split, much faster under load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def config(tiny_model_dir: Path) -> Config:
    """Config of the tiny model, reference backend."""
    return tiny_config(tiny_model_dir)


@pytest.fixture(scope="module")
def synth(config: Config) -> Synthesizer:
    """The process-wide shared synthesizer both modes end up on (loaded here once)."""
    return load_synthesizer(config)


@pytest.fixture(scope="module")
def bot() -> ModuleType:
    """The example bot module."""
    return load_bot()


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    """A tiny random Whisper in faster-whisper's CTranslate2 format (noise, made offline); None without the extra."""
    if importlib.util.find_spec("faster_whisper") is None:
        return None
    from ctranslate2.converters import TransformersConverter
    from tokenizers import Tokenizer, models
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    root = tmp_path_factory.mktemp("whisper")
    dims = {"d_model": 16, "encoder_layers": 1, "decoder_layers": 1, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32}
    heads = {"encoder_attention_heads": 2, "decoder_attention_heads": 2}
    # 51864 tokens: the English-only Whisper vocabulary, so the model reports language "en".
    WhisperForConditionalGeneration(WhisperConfig(vocab_size=51864, **dims, **heads)).save_pretrained(root / "hf")
    TransformersConverter(str(root / "hf")).convert(str(root / "ct2"))
    # faster-whisper fetches a tokenizer from the hub unless the model directory has one. English-only
    # Whisper's ids: 50256 words, <|endoftext|>, the task and language tokens, then the timestamps;
    # CTranslate2 finds the prompt's tokens by name in its own vocabulary.json, so both list them.
    words = 50256
    specials = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", *(f"<|lang{i}|>" for i in range(98))]
    specials += ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>"]
    specials += ["<|notimestamps|>"]
    stamps = [f"<|{i * 0.02:.2f}|>" for i in range(51864 - words - len(specials))]
    vocab = [f"w{i}" for i in range(words)] + specials + stamps
    tokenizer = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<|endoftext|>"))
    tokenizer.save(str(root / "ct2/tokenizer.json"))
    (root / "ct2/vocabulary.json").write_text(json.dumps(vocab))
    return root / "ct2"
