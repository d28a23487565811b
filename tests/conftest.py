"""Shared fixtures: the tiny real-format Orpheus model, built once per test session."""

from pathlib import Path

import pytest

from pipecat_orpheus.testing import make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding `llm/` (tiny Llama + tokenizer) and `snac/` (tiny SNAC), noise not speech."""
    root = tmp_path_factory.mktemp("tiny")
    make_tiny_model(root)
    return root
