"""Shared fixtures: the tiny real-format Orpheus model, built once per test session."""

from pathlib import Path

import pytest
import torch

from pipecat_orpheus.loader import load_llm, load_snac
from pipecat_orpheus.testing import make_tiny_model


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
