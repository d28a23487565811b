"""What counts as a problem: each measure of an utterance against its bound in the `eval` section.

One place for the bounds, so the terminal summary, the JSON and the HTML page flag the same
things. A measure that could not be taken (None) flags nothing.
"""

from __future__ import annotations

from collections.abc import Mapping

from pipecat_orpheus.config import EvalConfig

NOT_REPORTED = "not reported"  # the integrity guard's verdict from an engine that reports none
GUARD_OK = ("end_of_speech", NOT_REPORTED)  # the guard's stop reasons that mean the model ended by itself


def utterance_flags(m: Mapping[str, object], cfg: EvalConfig) -> list[str]:
    """The names of the measures of `m` (an utterance's row of the report) that are past their bounds."""

    def past(key: str, bound: float, above: bool = True) -> bool:
        value = m.get(key)
        return value is not None and (value > bound if above else value < bound)

    flags = {
        "audio_s": m.get("audio_s") == 0,  # no audio at all
        "wer": past("wer", cfg.max_wer),
        "lead_silence_s": past("lead_silence_s", cfg.max_edge_silence_s),
        "trail_silence_s": past("trail_silence_s", cfg.max_edge_silence_s),
        "clipped_share": past("clipped_share", cfg.max_clipped_share),
        "loudness_dbfs": past("loudness_dbfs", cfg.max_loudness_dbfs)
        or past("loudness_dbfs", cfg.min_loudness_dbfs, above=False),
        "pace_ratio": past("pace_ratio", cfg.max_pace_ratio) or past("pace_ratio", 1 / cfg.max_pace_ratio, above=False),
        "repeated_share": past("repeated_share", cfg.max_repeated_share),
        "stream_db": past("stream_db", cfg.min_stream_db, above=False),
        "guard": m.get("guard") not in GUARD_OK,
    }
    return [name for name, bad in flags.items() if bad]


def differences(a: Mapping[str, object], b: Mapping[str, object], cfg: EvalConfig) -> list[str]:
    """The measures that matter and differ between the same utterance under two configurations."""
    out = set(a["flags"]) ^ set(b["flags"])  # type: ignore[arg-type]
    wer_a, wer_b = a.get("wer"), b.get("wer")
    if isinstance(wer_a, float) and isinstance(wer_b, float) and abs(wer_a - wer_b) >= cfg.wer_difference:
        out.add("wer")
    return sorted(out)
