"""`bench.server.load` runs end to end on the CPU: the server, client processes, burst and churn, both formats."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_load_bench_runs_burst_and_churn_through_the_server(tmp_path) -> None:
    """Two streams per run, tiny model: every utterance is heard, one churn utterance is cancelled and timed.

    Conversation 0's first draw (seed 2000) is below the cancel fraction of 0.5 and conversation
    1's (seed 2001) is above it, so churn has at least one cancelled and one played utterance.
    """
    out = tmp_path / "load.json"
    command = [
        sys.executable, "-m", "bench.server.load", "--tiny", "--device", "cpu", "--no-core-process", "--levels", "2",
        "--mode", "burst", "churn", "--duration-s", "2", "--client-procs", "2", "--cancel-fraction", "0.5",
        "--audio-tokens", "35", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["speech"] == "engine in the server process" and result["model"] == "tiny"
    runs = {(r["mode"], r["format"]): r for r in result["runs"]}
    assert set(runs) == {(m, f) for m in ("burst", "churn") for f in ("PcmMessagePack", "Pcm16MessagePack")}
    for run in runs.values():
        assert run["outcomes"].get("error", 0) == 0, run["errors"]
        assert run["conversations_heard"] == 2 and run["ttfa"]["n"] >= 2
        assert run["server"]["ttfa"]["n"] == run["ttfa"]["n"]  # the server counted the same first audios
        assert run["engine"]["steps"] > 0
    for fmt in ("PcmMessagePack", "Pcm16MessagePack"):
        burst, churn = runs["burst", fmt], runs["churn", fmt]
        assert burst["outcomes"] == {"done": 2} and burst["connect"]["n"] == 2
        assert abs(burst["audio_s_per_utterance"] - result["settings"]["audio_s_per_utterance"]) < 1e-3  # full length
        assert churn["outcomes"].get("cancelled", 0) >= 1 and churn["outcomes"].get("done", 0) >= 1
        assert churn["cancel_rtt"]["n"] == churn["outcomes"]["cancelled"]
    assert "ttfa p50/p95/p99" in done.stdout  # the table
