"""The eval's report: `report.json` (every figure), the WAVs beside it, and `index.html`, readable from disk.

The page holds the summary of each configuration side by side, a plot per metric and the table
of every utterance with its audio; measures past their bounds are red, and with `--vs` the
utterances whose figures that matter differ between the two configurations are yellow.
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path

from pipecat_orpheus.eval.plots import COLOURS, metric_svg

# (row key, column, plot title, bounds: keys of the `eval` section, or a number) of each per-utterance metric
METRICS: tuple[tuple[str, str, str, tuple[str | float, ...]], ...] = (
    ("wer", "WER", "word error rate", ("max_wer",)),
    ("cer", "CER", "character error rate", ()),
    ("lead_silence_s", "lead s", "leading silence (s)", ("max_edge_silence_s",)),
    ("trail_silence_s", "trail s", "trailing silence (s)", ("max_edge_silence_s",)),
    ("clipped_share", "clipped", "clipped samples (share)", ("max_clipped_share",)),
    (
        "loudness_dbfs",
        "dBFS",
        "speech level (dBFS, RMS of non-silent 10 ms)",
        ("min_loudness_dbfs", "max_loudness_dbfs"),
    ),
    ("pace_ratio", "pace", "seconds per letter / the voice's median", ("min_pace_ratio", "max_pace_ratio")),
    ("repeated_share", "repeats", "frames in repeated runs (share)", ("max_repeated_share",)),
    ("stream_db", "stream dB", "streamed vs one offline decode (dB)", ("min_stream_db",)),
    ("early_frames", "early", "frames sent before their lookahead (for their playback deadline)", ()),
    ("first_audio_s", "first s", "first audio (s)", ()),
    ("rtf", "RTF", "real-time factor (below 1: faster than real time)", (1.0,)),
)

# (summary key, label) in the order of the summary table
SUMMARY = (
    ("utterances", "utterances"),
    ("flagged", "utterances flagged"),
    ("mean_wer", "mean WER"),
    ("mean_cer", "mean CER"),
    ("median_lead_silence_s", "median leading silence (s)"),
    ("median_trail_silence_s", "median trailing silence (s)"),
    ("median_loudness_dbfs", "median speech level (dBFS)"),
    ("max_repeated_share", "largest repeated share"),
    ("min_stream_db", "worst streamed vs offline (dB)"),
    ("median_first_audio_s", "median first audio (s)"),
    ("p95_first_audio_s", "p95 first audio (s)"),
    ("median_rtf", "median real-time factor"),
    ("guard", "integrity guard verdicts"),
)

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; font-size: 13px; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ddd; padding: 3px 6px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.bad { background: #f8d0d0; } tr.differs td { background: #fff3c4; } tr.differs td.bad { background: #f3b8a0; }
.plot { display: block; margin: 0.4em 0; } audio { height: 28px; width: 180px; } code { background: #f4f4f4; }
"""


def bound_values(bounds: dict, spec: tuple[str | float, ...]) -> list[float]:
    """The numbers a metric's bound spec names (the pace ratio's lower bound is the inverse of its upper one)."""
    out = []
    for item in spec:
        if item == "min_pace_ratio":
            out.append(1 / bounds["max_pace_ratio"])
        else:
            out.append(float(bounds[item]) if isinstance(item, str) else item)
    return out


def _cell(value: object) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    if isinstance(value, dict):
        return escape(", ".join(f"{k}: {v}" for k, v in value.items()))
    return escape(str(value))


def _summary_table(report: dict) -> str:
    sides = report["sides"]
    head = "".join(f'<th style="color:{COLOURS[i % 2]}">{escape(s["name"])}</th>' for i, s in enumerate(sides))
    changed = "".join(
        f"<p><b>{escape(s['name'])}</b>: "
        + (escape(", ".join(f"{k}={v}" for k, v in s["overrides"].items())) or "the configuration as loaded")
        + "</p>"
        for s in sides
    )
    rows = []
    for key, label in SUMMARY:
        values = [s["summary"][key] for s in sides]
        differs = len(sides) == 2 and _summary_differs(key, values, report["bounds"])
        cls = ' class="differs"' if differs else ""
        cells = "".join(f'<td class="num">{_cell(v)}</td>' for v in values)
        rows.append(f"<tr{cls}><th>{escape(label)}</th>{cells}</tr>")
    return f"{changed}<table><tr><th></th>{head}</tr>{''.join(rows)}</table>"


def _summary_differs(key: str, values: list, bounds: dict) -> bool:
    """Whether a summary figure differs in a way that matters: flags, mean WER, streaming past its bound."""
    a, b = values
    if a is None or b is None:
        return False
    if key == "flagged":
        return a != b
    if key == "mean_wer":
        return abs(a - b) >= bounds["wer_difference"]
    if key == "min_stream_db":
        return (a < bounds["min_stream_db"]) != (b < bounds["min_stream_db"])
    return False


def _utterance_table(report: dict) -> str:
    keys = [key for key, _, _, _ in METRICS]
    columns = (
        "side",
        "voice",
        "sentence",
        "text",
        "heard",
        *(c for _, c, _, _ in METRICS),
        "audio s",
        "guard",
        "audio",
    )
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    rows = []
    for r in _in_table_order(report["utterances"]):
        flags = set(r["flags"])
        cls = ' class="differs"' if r.get("differs") else ""
        cells = [
            _cell(r["side"]),
            _cell(r["voice"]),
            _cell(r["id"]),
            _cell(r["text"]),
            _cell(r["transcript"]),
        ]
        tds = "".join(f"<td>{c}</td>" for c in cells)
        tds += "".join(f'<td class="num{" bad" if k in flags else ""}">{_cell(r[k])}</td>' for k in keys)
        tds += f'<td class="num{" bad" if "audio_s" in flags else ""}">{_cell(r["audio_s"])}</td>'
        tds += f'<td class="{"bad" if "guard" in flags else ""}">{_cell(r["guard"])}</td>'
        tds += f'<td><audio controls preload="none" src="{escape(r["wav"])}"></audio></td>'
        rows.append(f"<tr{cls}>{tds}</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _in_table_order(rows: list[dict]) -> list[dict]:
    """Utterances grouped by voice and sentence, the sides of one utterance next to each other."""
    order = {(r["voice"], r["id"]): i for i, r in enumerate(rows) if r["side"] == "A"}
    return sorted(rows, key=lambda r: (order.get((r["voice"], r["id"]), 0), r["side"]))


def _plots(report: dict) -> str:
    rows = report["utterances"]
    sides = [s["name"] for s in report["sides"]]
    labels = [f"{r['voice']} {r['id']}" for r in rows if r["side"] == sides[0]]
    out = []
    for key, _, label, spec in METRICS:
        series = {name: [r[key] for r in rows if r["side"] == name] for name in sides}
        out.append(metric_svg(label, labels, series, bound_values(report["bounds"], spec)))
    return "".join(out)


def render_html(report: dict) -> str:
    """The page of `report`: self-contained (inline CSS and SVG), the WAVs linked relative to it."""
    asr = report["asr"]
    guard = report["guard"]
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>pipecat-orpheus eval</title>"
        f"<style>{_STYLE}</style></head><body><h1>pipecat-orpheus eval</h1>"
        f"<p><code>{escape(report['command'])}</code></p>"
        f"<p>ASR: <b>{escape(asr['backend'])}</b> ({escape(asr['model'])}). Integrity guard: {escape(guard)}.</p>"
        "<h2>Summary</h2>" + _summary_table(report) + "<p>Red: past its bound (the <code>eval</code> section, "
        "see report.json). Yellow: with <code>--vs</code>, a figure that matters differs between the two "
        "configurations.</p><h2>Per metric</h2>" + _plots(report) + "<h2>Every utterance</h2>"
        "<p>Sorted by voice and sentence; hover a dot in a plot for its utterance.</p>"
        + _utterance_table(report)
        + "</body></html>"
    )


def write_report(out_dir: Path, report: dict) -> None:
    """Write `report.json` and `index.html` into `out_dir` (the WAVs are already there)."""
    (out_dir / "report.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    (out_dir / "index.html").write_text(render_html(report))
