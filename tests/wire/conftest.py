"""Fixtures of the wire tests: the tiny model on the reference path, behind one shared synthesizer."""

import pytest

from pipecat_orpheus.config import load_config
from pipecat_orpheus.speech import load_synthesizer
from tests.helpers import overrides


@pytest.fixture(scope="module")
def config(tiny_model_dir):
    return load_config(overrides=overrides(tiny_model_dir))


@pytest.fixture(scope="module")
def synth(config):
    return load_synthesizer(config)
