"""What the reliability tests add to the scenarios of bench/reliability: the short config and its fixtures.

The scenarios themselves (the attacks, the good clients, the checks) are bench/reliability's; each
test runs them short on a server of its own and asserts on what they found and measured. The
fixtures are imported by each tests/test_reliability_*.py module (`# noqa: F401`).
"""

import asyncio
from pathlib import Path

import pytest

from bench.reliability.common import GOOD_TEXT
from pipecat_orpheus.config import load_config
from pipecat_orpheus.speech import load_synthesizer
from tests.helpers import overrides


def tiny_overrides(model_dir: Path) -> dict:
    """The server tests' overrides with the batched engine, seeded sampling and room for the fault tests."""
    return overrides(
        model_dir,
        **{
            "engine.backend": "batched",
            "engine.max_slots": 8,
            "engine.max_queue": 32,
            "engine.max_tokens_per_slot": 512,
            "engine.max_chars_per_piece": 160,
            "sampling.max_tokens": 28,  # 4 frames per piece: quick on CPU
            "sampling.seed": 7,  # the same text always gives the same tokens: the expected length is known
            "server.shutdown_grace_s": 5,
        },
    )


@pytest.fixture(scope="module")
def config(tiny_model_dir):
    return load_config(overrides=tiny_overrides(tiny_model_dir))


@pytest.fixture(scope="module")
def synth(config):
    engine = load_synthesizer(config)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def expected(synth):
    """Samples of one utterance of GOOD_TEXT, spoken alone."""

    async def speak():
        return len(await synth.submit(GOOD_TEXT).read_all())

    return asyncio.run(speak())
