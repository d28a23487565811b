"""Figures of one `bench.server.load` run from its per-utterance records, and the printed table."""

from __future__ import annotations

import statistics
from collections import Counter


def pct(values: list[float], q: float) -> float | None:
    """The nearest-rank `q`th percentile, None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def ms_summary(values: list[float]) -> dict:
    ms = [v * 1e3 for v in values]
    r = lambda x: None if x is None else round(x, 2)  # noqa: E731
    return {"n": len(ms), **{f"p{q}_ms": r(pct(ms, q)) for q in (50, 95, 99)}, "max_ms": r(max(ms, default=None))}


def summarize(records: list[dict], *, level: int, mode: str, fmt: str, wall_s: float) -> dict:
    """What one run's utterances say: outcomes, TTFA, lateness, cancel round trips, audio."""
    outcomes = Counter(r["outcome"] for r in records)
    errors = Counter(r["error"] for r in records if r["outcome"] == "error")
    heard = [r for r in records if r.get("ttfa_s") is not None]
    late_convs = {r["conv"] for r in records if r.get("late_chunks")}
    audio_s = sum(r.get("audio_s", 0.0) for r in records)
    return {
        "level": level,
        "mode": mode,
        "format": fmt,
        "wall_s": round(wall_s, 2),
        "utterances": len(records),
        "outcomes": dict(outcomes),
        "errors": dict(errors.most_common(5)),
        "conversations_heard": len({r["conv"] for r in heard}),
        "ttfa": ms_summary([r["ttfa_s"] for r in heard]),
        "connect": ms_summary([r["connect_s"] for r in records if r.get("connect_s") is not None]),
        "ttla": ms_summary([r["ttla_s"] for r in records if r["outcome"] == "done" and r.get("ttla_s") is not None]),
        "chunks": sum(r.get("chunks", 0) for r in records),
        "late_chunks": sum(r.get("late_chunks", 0) for r in records),
        "streams_with_late": len(late_convs),
        "worst_late_ms": round(max((r.get("worst_late_s", 0.0) for r in records), default=0.0) * 1e3, 2),
        "cancel_rtt": ms_summary([r["cancel_rtt_s"] for r in records if r.get("cancel_rtt_s") is not None]),
        "audio_s_per_utterance": round(statistics.fmean(r["audio_s"] for r in heard), 3) if heard else None,
        "audio_s_per_s": round(audio_s / wall_s, 2),
    }


def _f(x, digits: int = 0) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table(runs: list[dict], *, header: bool = True) -> str:
    """One line per run: the figures at a glance (ms)."""
    cols = (
        f"{'level':>5} {'mode':<5} {'format':<16} {'utt':>5} {'err':>4} {'ttfa p50/p95/p99':>18} "
        f"{'late str':>9} {'late ch':>8} {'worst':>7} {'cancel p50/p99':>15} {'srv ttfa p95':>12} {'step':>6}"
    )
    lines = [cols] if header else []
    for r in runs:
        t, c, eng = r["ttfa"], r["cancel_rtt"], r.get("engine") or {}
        srv = (r.get("server") or {}).get("ttfa", {})
        lines.append(
            f"{r['level']:>5} {r['mode']:<5} {r['format']:<16} {r['utterances']:>5} "
            f"{r['outcomes'].get('error', 0):>4} "
            f"{_f(t['p50_ms']) + '/' + _f(t['p95_ms']) + '/' + _f(t['p99_ms']):>18} "
            f"{str(r['streams_with_late']) + '/' + str(r['level']):>9} {r['late_chunks']:>8} "
            f"{_f(r['worst_late_ms']):>7} "
            f"{_f(c['p50_ms']) + '/' + _f(c['p99_ms']):>15} {_f(srv.get('p95_ms')):>12} "
            f"{_f(eng.get('mean_step_ms'), 1):>6}"
        )
    return "\n".join(lines)
