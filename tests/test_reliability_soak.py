"""A short soak: churn at full concurrency leaves no engine slot, stream, asyncio task or memory behind."""

from bench.reliability.common import Bench
from bench.reliability.soak import run_soak
from pipecat_orpheus.wire.server import serve
from tests.reliability_helpers import config, expected, synth  # noqa: F401 (fixtures)


async def test_short_soak_leaves_nothing_behind(config, synth, expected):
    """20 s of churn (connect, speak, read/cancel/abort/Eos, leave) at full concurrency, a good client alongside.

    The soak fails past 5 % RSS growth after its warm-up (5 s here); the phase around it fails on
    a slot, stream or asyncio task left over, and on a good utterance that is not whole.
    """
    async with serve(config, synth, port=0, api_keys=[]) as server:
        bench = Bench(server, synth, expected, n_good=1)
        result = await bench.phase("soak", lambda: run_soak(bench, 20, config.engine.max_slots, seed=0))
    assert result["failures"] == 0, result["failure_samples"]
    assert result["leaked_tasks"] == 0 and result["data_lost"] == 0
    assert result["soak_rss_growth_pct"] < 5
    assert result["connections"] > config.engine.max_slots and result["good_utterances"] > 0
