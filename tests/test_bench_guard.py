"""`bench.engine.guard` runs end to end on the CPU: per-step time with loop detection off and on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_guard_bench_times_steps_with_and_without_loop_detection(tmp_path) -> None:
    """One level, one round: both settings ran steps, and the check alone was timed."""
    out = tmp_path / "guard.json"
    command = [
        sys.executable, "-m", "bench.engine.guard", "--tiny", "--device", "cpu", "--streams", "3",
        "--tokens", "28", "--rounds", "1", "--check-repeats", "50", "--kv-cache-dtype", "auto", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["model"] == "tiny" and result["guard"]["loop_frames"] > 0
    assert [level["streams"] for level in result["levels"]] == [3]
    for level in result["levels"]:
        assert level["step_ms_off"] > 0 and level["step_ms_on"] > 0 and level["check_us_all_rows"] > 0
