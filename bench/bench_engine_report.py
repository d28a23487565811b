"""Table and plot of a bench_engine.py result; run alone to redraw the PNG from the JSON.

python bench/bench_engine_report.py bench/results/engine_h100.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def summary_table(result: dict) -> str:
    lines = [
        f"device {result['device']}  |  max real-time streams: {result['max_realtime_streams']}",
        f"{'streams':>7} {'ttfb p50':>9} {'ttfb p95':>9} {'gap p99':>8} {'rtf med':>8} {'rtf min':>8} "
        f"{'underruns':>9} {'tok/s':>8} {'step ms':>8} {'mem GiB':>8}",
    ]
    for lv in result["levels"]:
        lines.append(
            f"{lv['streams']:>7} {lv['ttfb_ms_p50']:>9.1f} {lv['ttfb_ms_p95']:>9.1f} {lv['gap_ms_p99']:>8.1f} "
            f"{lv['rtf_median']:>8.2f} {lv['rtf_min']:>8.2f} {lv['underruns']:>9} {lv['tok_s']:>8.0f} "
            f"{lv['mean_step_ms']:>8.2f} {lv['gpu_mem_used_gib']:>8.1f}"
        )
    lines.append("step timing: " + ", ".join(
        f"bs{r['batch']} {r['step_ms']:.2f} ms (x{r['ratio_to_floor']:.2f} floor)" for r in result["step_timing"]
    ))  # fmt: skip
    lines.append("baselines: " + ", ".join(f"{k} {v:.0f}" for k, v in result["baselines"].items()))
    lines.append("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in result["ratios"].items()))
    lines.append(f"correctness: {result['correctness']}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lv = result["levels"]
    n = [x["streams"] for x in lv]
    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    ax[0, 0].plot(n, [x["ttfb_ms_p50"] for x in lv], "o-", label="p50")
    ax[0, 0].plot(n, [x["ttfb_ms_p95"] for x in lv], "s-", label="p95")
    ax[0, 0].set(title="time to first audio", xlabel="concurrent streams", ylabel="ms")
    ax[0, 0].legend()
    ax[0, 1].plot(n, [x["rtf_median"] for x in lv], "o-", label="median stream")
    ax[0, 1].plot(n, [x["rtf_min"] for x in lv], "s-", label="slowest stream")
    ax[0, 1].axhline(1.0, color="k", lw=0.8, ls="--")
    ax[0, 1].set(title="per-stream speed (x real time)", xlabel="concurrent streams", yscale="log")
    ax[0, 1].legend()
    ax[1, 0].plot(n, [x["tok_s"] for x in lv], "o-", label="engine")
    for k, v in result["baselines"].items():
        ax[1, 0].axhline(v, lw=0.8, ls=":", label=k.replace("baseline_", ""))
    ax[1, 0].set(title="tokens/s", xlabel="concurrent streams", yscale="log")
    ax[1, 0].legend(fontsize=7)
    ax[1, 1].bar([str(x) for x in n], [x["underruns"] for x in lv])
    ax[1, 1].set(
        title=f"underruns (max real-time streams: {result['max_realtime_streams']})", xlabel="concurrent streams"
    )
    fig.suptitle(f"OrpheusEngine, Orpheus-3B-shaped random weights, {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    src = Path(sys.argv[1])
    data = json.loads(src.read_text())
    plot(data, src.with_suffix(".png"))
    print(summary_table(data))
