"""Figures of one `bench.service.pipelines` level from its per-utterance records, and the printed table."""

from __future__ import annotations

from collections import Counter

from bench.server.report import ms_summary


def summarize(records: list[dict], level: int, wall_s: float) -> dict:
    """What one level's utterances say: outcomes, TTFA, lateness, interruption stop times."""
    heard = [r for r in records if r["ttfa_s"] is not None]
    done = [r for r in records if r["outcome"] == "done"]
    return {
        "level": level,
        "wall_s": round(wall_s, 2),
        "utterances": len(records),
        "outcomes": dict(Counter(r["outcome"] for r in records)),
        "errors": dict(Counter(r["error"] for r in records if r["error"]).most_common(5)),
        "conversations_heard": len({r["conv"] for r in heard}),
        "ttfa": ms_summary([r["ttfa_s"] for r in heard]),
        "ttla": ms_summary([r["ttla_s"] for r in done if r["ttla_s"] is not None]),
        "stopped_after_last_audio": ms_summary([r["stopped_s"] - r["ttla_s"] for r in done if r["stopped_s"]]),
        "full_length": f"{sum(r['full_length'] for r in done)}/{len(done)}",
        "frames": sum(r["frames"] for r in records),
        "late_chunks": sum(r["late_chunks"] for r in records),
        "conversations_with_late": len({r["conv"] for r in records if r["late_chunks"]}),
        "worst_late_ms": round(max((r["worst_late_s"] for r in records), default=0.0) * 1e3, 2),
        "interrupt_stop": ms_summary([r["interrupt_stop_s"] for r in records if r["interrupt_stop_s"] is not None]),
        "interrupt_reach": ms_summary([r["interrupt_reach_s"] for r in records if r["interrupt_reach_s"] is not None]),
        "audio_s_per_s": round(sum(r["audio_s"] for r in records) / wall_s, 2),
    }


def table(levels: list[dict], *, header: bool = True) -> str:
    """One line per level: the figures at a glance (ms)."""
    f = lambda x, d=0: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
    cols = (
        f"{'level':>5} {'utt':>5} {'err':>4} {'intr':>4} {'ttfa p50/p95/p99':>18} {'late conv':>10} {'late ch':>8} "
        f"{'worst':>7} {'stop p50/p99':>13} {'step':>6} {'tok/s':>8} {'loop cpu':>8} {'proc cpu':>8} {'lag p99':>7}"
    )
    lines = [cols] if header else []
    for r in levels:
        t, s, eng, bot = r["ttfa"], r["interrupt_stop"], r["engine"] or {}, r["bot"]
        bad = sum(v for k, v in r["outcomes"].items() if k not in ("done", "interrupted"))
        lines.append(
            f"{r['level']:>5} {r['utterances']:>5} {bad:>4} {r['outcomes'].get('interrupted', 0):>4} "
            f"{f(t['p50_ms']) + '/' + f(t['p95_ms']) + '/' + f(t['p99_ms']):>18} "
            f"{str(r['conversations_with_late']) + '/' + str(r['level']):>10} {r['late_chunks']:>8} "
            f"{f(r['worst_late_ms']):>7} {f(s['p50_ms']) + '/' + f(s['p99_ms']):>13} "
            f"{f(eng.get('mean_step_ms'), 1):>6} {f(eng.get('decode_tok_s')):>8} "
            f"{f(bot['loop_thread_cpu_s_per_s'], 2):>8} {f(bot['process_cpu_s_per_s'], 2):>8} "
            f"{f(bot['loop_lag']['p99_ms'], 1):>7}"
        )
    return "\n".join(lines)
