"""Table and plot of a `bench.engine.run` result; run alone to redraw the PNG from the JSON.

python3 -m bench.engine.report bench/results/engine_h100.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

SAMPLE_RATE = 24000  # format.SAMPLE_RATE (this file runs without the package too, to redraw a plot)
TOKENS_PER_SECOND = 7 * SAMPLE_RATE / 2048  # format.TOKENS_PER_SECOND: one 7-token frame per 2048 samples


def level_stats(streams: list[tuple], wall_s: float) -> dict:
    """Per-level figures from each stream's (submit time, chunk arrival times, chunk sizes, engine marks).

    A chunk is late (an underrun) if it arrives after the audio before it has finished playing,
    playback starting when the first chunk arrives.
    """
    ttfb, gaps, rtf, underruns, late_ms = [], [], [], 0, []
    late_first_s = 0  # late chunks within the first second of their stream's audio
    for t0, arr, sizes, _ in streams:
        ttfb.append((arr[0] - t0) * 1e3)
        gaps.extend(np.diff(arr) * 1e3)
        offset_s = np.concatenate([[0], np.cumsum(sizes)[:-1]]) / SAMPLE_RATE  # each chunk's place in the audio
        late = arr - (arr[0] + offset_s)  # arrival minus when it is due, playback starting at the first chunk
        underruns += int((late[1:] > 0).sum())
        late_first_s += int(((late > 0) & (offset_s < 1.0))[1:].sum())
        late_ms.append(float(late.max()) * 1e3)
        rtf.append(sizes.sum() / SAMPLE_RATE / (arr[-1] - t0))
    token_ms, frame_ms = [m[0] for *_, m in streams], [m[1] for *_, m in streams]
    return {
        "streams": len(streams),
        "audio_s_per_stream": float(np.median([s.sum() for _, _, s, _ in streams]) / SAMPLE_RATE),
        "ttfb_ms_p50": float(np.percentile(ttfb, 50)),
        "ttfb_ms_p95": float(np.percentile(ttfb, 95)),
        "first_token_ms_p50": float(np.percentile(token_ms, 50)),
        "first_token_ms_p95": float(np.percentile(token_ms, 95)),
        "first_frame_ms_p50": float(np.percentile(frame_ms, 50)),
        "first_frame_ms_p95": float(np.percentile(frame_ms, 95)),
        "gap_ms_p50": float(np.percentile(gaps, 50)) if gaps else 0.0,
        "gap_ms_p99": float(np.percentile(gaps, 99)) if gaps else 0.0,
        "rtf_median": float(np.median(rtf)),
        "rtf_min": float(np.min(rtf)),
        "underruns": underruns,
        "underruns_in_first_s": late_first_s,
        "streams_with_underrun": sum(1 for m in late_ms if m > 0),
        "worst_lateness_ms": float(max(late_ms)),
        "wall_s": wall_s,
    }


def headline_levels(result: dict) -> list[dict]:
    """The levels of the first `engine.admission` policy swept (all of them in a run that swept one)."""
    first = result.get("admission", [None])[0]
    return [lv for lv in result["levels"] if lv.get("admission", first) == first]


def admission_table(result: dict) -> str:
    """Each policy's levels side by side: first audio, first token, late chunks, predicted real-time streams."""
    policies = result.get("admission", [])
    lines = [
        "admission: " + ", ".join(f"{p} {result['by_admission'][p]} real-time streams" for p in policies),
        f"{'policy':>7} {'streams':>7} {'ttfb p50':>9} {'ttfb p95':>9} {'tok1 p95':>9} {'late':>6} "
        f"{'late streams':>12} {'worst ms':>9} {'predicted':>9}",
    ]
    for lv in sorted(result["levels"], key=lambda lv: (lv["streams"], lv.get("admission", ""))):
        lines.append(
            f"{lv.get('admission', ''):>7} {lv['streams']:>7} {lv['ttfb_ms_p50']:>9.1f} {lv['ttfb_ms_p95']:>9.1f} "
            f"{lv['first_token_ms_p95']:>9.1f} {lv['underruns']:>6} {lv['streams_with_underrun']:>12} "
            f"{lv['worst_lateness_ms']:>9.1f} {lv.get('predicted_capacity', ''):>9}"
        )
    return "\n".join(lines)


def summarize_admission(result: dict) -> None:
    """Add each `engine.admission` policy's real-time streams (its largest level with no late chunk) to `result`."""
    result["by_admission"] = {
        p: max([lv["streams"] for lv in result["levels"] if lv.get("admission") == p and lv["underruns"] == 0] or [0])
        for p in result.get("admission", [])
    }


def summarize(result: dict) -> None:
    """Add the headline figures and the ratios to the baselines and the floor to `result`."""
    summarize_admission(result)
    levels = headline_levels(result)
    ok = [lv["streams"] for lv in levels if lv["underruns"] == 0]
    by = {lv["streams"]: lv for lv in levels}
    single = by.get(1, {})
    lone = ([single["ttfb_ms_p50"]] if single else []) + result.get("ttfb_probe_1", {}).get("ttfb_ms", [])
    base = result["baselines"]
    result.update({
        "max_realtime_streams": max(ok) if ok else 0,
        "ttfb_ms_p50_1": float(np.median(lone)) if lone else None,  # level 1 and the lone-request probe
        "ttfb_ms_p95_128": by.get(128, {}).get("ttfb_ms_p95"),
        "single_stream_rtf": single.get("rtf_median"),
        "engine_tok_s_bs64": by.get(64, {}).get("tok_s"),
        "baseline_static_tok_s_bs64": base.get("baseline_static_tok_s_bs64"),
        "baseline_eager_tok_s_bs1": base.get("baseline_eager_tok_s_bs1"),
    })  # fmt: skip
    for buffer_ms in (100, 250):  # the same, for a player that buffers this much before it starts
        fits = [lv["streams"] for lv in levels if lv["worst_lateness_ms"] <= buffer_ms]
        result[f"max_realtime_streams_{buffer_ms}ms_buffer"] = max(fits) if fits else 0
    ratios = {}
    if result["engine_tok_s_bs64"] and result["baseline_static_tok_s_bs64"]:
        ratios["engine_vs_static_bs64"] = result["engine_tok_s_bs64"] / result["baseline_static_tok_s_bs64"]
        ratios["engine_vs_eager_bs64"] = result["engine_tok_s_bs64"] / base["baseline_eager_tok_s_bs64"]
    if single and result["baseline_eager_tok_s_bs1"]:
        single_tok_s = single["rtf_median"] * TOKENS_PER_SECOND
        ratios["engine_vs_eager_bs1"] = single_tok_s / result["baseline_eager_tok_s_bs1"]
        ratios["engine_vs_static_bs1"] = single_tok_s / base["baseline_static_tok_s_bs1"]
        ratios["single_stream_vs_floor"] = single_tok_s / result["floor"]["single_stream_floor_tok_s"]
    result["ratios"] = ratios


def summary_table(result: dict) -> str:
    lines = [
        f"device {result['device']}  |  max real-time streams: {result['max_realtime_streams']}  |  "
        f"first audio p50, 1 stream: {result.get('ttfb_ms_p50_1') or float('nan'):.1f} ms  |  "
        f"one stream: {result.get('single_stream_rtf') or float('nan'):.2f}x real time",
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

    lv = headline_levels(result)
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
