"""`bench.service.pipelines` runs end to end on the CPU: service pipelines in one process, as conversations."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_pipelines_bench_runs_conversations_through_the_service(tmp_path) -> None:
    """Two pipelines, tiny model, engine in this process: every utterance is heard at full length, one is interrupted.

    Conversation 0's first draw (seed 2000) is below the interrupt fraction of 0.5 and
    conversation 1's (seed 2001) is above it, so there is at least one interrupted and one played
    utterance. The engine runs in the bench's process (`--no-core-process`): a core process would
    add its start (torch import, model load) to a test that checks the bench, not the core.
    """
    out = tmp_path / "pipelines.json"
    command = [
        sys.executable, "-m", "bench.service.pipelines", "--tiny", "--device", "cpu", "--no-core-process",
        "--levels", "2", "--duration-s", "2", "--warmup-s", "0", "--interrupt-fraction", "0.5",
        "--audio-tokens", "140", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["speech"] == "engine in the bot process" and result["model"] == "tiny"
    (level,) = result["levels"]
    outcomes = level["outcomes"]
    assert set(outcomes) <= {"done", "interrupted"}, level["errors"]
    assert outcomes.get("done", 0) >= 1 and outcomes.get("interrupted", 0) >= 1
    assert level["conversations_heard"] == 2 and level["ttfa"]["n"] == level["utterances"]
    assert level["full_length"] == f"{outcomes['done']}/{outcomes['done']}"
    assert level["interrupt_stop"]["n"] == level["interrupt_reach"]["n"] == outcomes["interrupted"]
    assert level["engine"]["steps"] > 0 and level["engine"]["decode_tok_s"] > 0
    assert level["bot"]["loop_thread_cpu_s_per_s"] > 0 and level["bot"]["loop_lag"]["n"] > 0
    assert "ttfa p50/p95/p99" in done.stdout  # the table
