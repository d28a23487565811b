"""The engine bench's admission switch, on the tiny model: both policies swept on one engine, side by side."""

import argparse

from bench.engine.report import admission_table, summarize_admission
from bench.engine.run import run_level
from pipecat_orpheus.speech import speech_for
from tests.engine.test_engine import make_config, make_engine


async def test_the_engine_bench_sweeps_each_admission_policy_on_one_engine(tiny_models, tiny_model_dir):
    """A level per policy runs on the same engine with that policy, and the table shows both with their figures."""
    config = make_config(tiny_model_dir, **{"engine.max_tokens_per_slot": 128})
    engine = make_engine(tiny_models, config)
    args = argparse.Namespace(stream_tokens=21, stagger_s=0.05, device="cpu")
    levels = []
    try:
        for policy in ("slack", "fixed"):
            engine.admission.policy = policy
            levels.append({"admission": policy} | await run_level(speech_for(engine, config), 2, args))
    finally:
        engine.close()
    result = {"admission": ["slack", "fixed"], "levels": levels}
    summarize_admission(result)
    assert set(result["by_admission"]) == {"slack", "fixed"}
    assert all(lv["streams"] == 2 and lv["ttfb_ms_p95"] > 0 for lv in levels)
    table = admission_table(result).splitlines()
    assert table[0].startswith("admission: slack") and [line.split()[0] for line in table[2:]] == ["fixed", "slack"]
