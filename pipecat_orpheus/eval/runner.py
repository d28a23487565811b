"""`pipecat-orpheus eval`: the sentence set through the real engine, heard by an ASR, measured, written up.

Each configuration ("A", and "B" with `--vs`) loads the engine the shipped way (`speech.open_backend`
and `speech.speech_for`, as `load_synthesizer` does) and speaks every sentence in every voice,
one utterance at a time, sentence k always with seed `eval.seed + k`: both sides get the same
sentences and seeds. The engine runs in this process (`engine.core_process` false) so that
`streaming.CodecTap` can read the codes it generated. Then the ASR listens to every utterance,
the signal and streaming checks run, and `report` writes the JSON, the WAVs and the HTML page.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import yaml
from loguru import logger

from pipecat_orpheus.codec import SnacCodec
from pipecat_orpheus.config import Config, load_config
from pipecat_orpheus.engine.request import SamplingParams
from pipecat_orpheus.errors import ConfigError, InvalidRequest
from pipecat_orpheus.eval.asr import Transcriber, load_transcriber, score, to_asr_rate
from pipecat_orpheus.eval.flags import NOT_REPORTED, differences, utterance_flags
from pipecat_orpheus.eval.report import write_report
from pipecat_orpheus.eval.sentences import SENTENCES, Sentence
from pipecat_orpheus.eval.signal_checks import check_signal, pace_ratios
from pipecat_orpheus.eval.streaming import CodecTap, Codes, real_time_factor, stream_fidelity_db
from pipecat_orpheus.pcm import write_wav
from pipecat_orpheus.progress import progress
from pipecat_orpheus.speech import SpeechStream, Spoken, open_backend, speak, speech_for

IN_PROCESS = {"engine.core_process": False}  # the codec tap reads the codes in this process


@dataclass(frozen=True, slots=True)
class Side:
    """One configuration under test: its name in the report, what the command line changed, the result."""

    name: str
    overrides: dict[str, object]
    config: Config


@dataclass(slots=True)
class _Take:
    """One utterance as spoken, before anyone listened."""

    voice: str
    sentence: Sentence
    seed: int
    spoken: Spoken
    codes: Codes | None


def parse_assignments(pairs: Sequence[str], flag: str) -> dict[str, object]:
    """`section.key=value` strings as config overrides (values read as YAML: 8, fp8, true, null)."""
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or "." not in key:
            raise ConfigError(flag, f"{pair!r} is not section.key=value (e.g. engine.kv_cache_dtype=fp8)")
        out[key.strip()] = yaml.safe_load(value)
    return out


def plan_sides(
    config_path: str | None, base: Mapping[str, object], changes: Mapping[str, object], vs: Mapping[str, object]
) -> list[Side]:
    """Side A (the configuration with `changes`) and, when `vs` is given, side B (A with `vs` on top)."""
    sides = [Side("A", dict(changes), _in_process(config_path, {**base, **changes}))]
    if vs:
        merged = {**changes, **vs}
        sides.append(Side("B", merged, _in_process(config_path, {**base, **merged})))
    return sides


def _in_process(config_path: str | None, overrides: Mapping[str, object]) -> Config:
    """The configuration with its engine in this process, on its one device (`engine.devices` or `model.device`)."""
    devices = load_config(config_path, overrides=overrides).engine.devices
    if devices is not None and len(devices) > 1:
        raise ConfigError(
            "engine.devices",
            "the eval runs one engine, in its own process: name one device (--set engine.devices=[cuda:0])",
        )
    device = {"model.device": devices[0]} if devices else {}
    return load_config(config_path, overrides={**overrides, **device, **IN_PROCESS})


def guard_verdict(stream: SpeechStream) -> str:
    """The integrity guard's verdict on an ended utterance: why the engine stopped it.

    The one place the eval reads it: the stream's `stop_reason` (end_of_speech, max_tokens,
    duration, loop), or "not reported" from an engine that has no guard.
    """
    return getattr(stream, "stop_reason", None) or NOT_REPORTED


def _speak_all(side: Side, voices: Sequence[str], sentences: Sequence[Sentence]) -> tuple[list[_Take], SnacCodec]:
    """Every sentence in every voice under `side`, one at a time; the takes and the (closed) backend's codec."""
    logger.info(f"eval {side.name}: loading {side.config.model.llm} ({side.config.engine.backend} backend)")
    backend = open_backend(side.config)
    takes = []
    try:
        speech = speech_for(backend, side.config)
        tap = CodecTap(backend.codec)
        items = [(voice, sentence) for voice in voices for sentence in sentences]
        with asyncio.Runner() as loop:
            for voice, sentence in progress(items, f"eval {side.name}: speaking", "utterance"):
                seed = side.config.eval.seed + SENTENCES.index(sentence)
                sampling = SamplingParams.from_config(side.config.sampling, seed=seed)
                spoken = loop.run(speak(speech, sentence.text, voice=voice, sampling=sampling))
                takes.append(_Take(voice, sentence, seed, spoken, tap.take()))
    finally:
        backend.close()  # the offline decodes below then have the codec to themselves
    return takes, backend.codec


def _measure(side: Side, takes: list[_Take], codec: SnacCodec, out_dir: Path) -> list[dict]:
    """The report rows of one side's takes, without what the ASR adds; writes each take's WAV."""
    cfg = side.config.eval
    rows = []
    for take in progress(takes, f"eval {side.name}: measuring", "utterance"):
        audio = take.spoken.audio
        wav = Path("wav") / side.name / take.voice / f"{take.sentence.id}.wav"
        (out_dir / wav).parent.mkdir(parents=True, exist_ok=True)
        write_wav(out_dir / wav, audio)
        frames = take.codes.frames if take.codes is not None else None
        checks = check_signal(
            audio, take.sentence.text, frames, silence_dbfs=cfg.silence_dbfs, loop_frames=cfg.loop_frames
        )
        rows.append(
            {
                "side": side.name,
                "voice": take.voice,
                "id": take.sentence.id,
                "kind": take.sentence.kind,
                "text": take.sentence.text,
                "seed": take.seed,
                "wav": wav.as_posix(),
                **asdict(checks),
                "first_audio_s": take.spoken.first_audio_s,
                "rtf": real_time_factor(take.spoken.total_s, audio),
                "stream_db": stream_fidelity_db(codec, audio, take.codes),
                "early_frames": take.codes.early_frames if take.codes is not None else None,
                "guard": guard_verdict(take.spoken.stream),
            }
        )
    for voice in dict.fromkeys(r["voice"] for r in rows):
        mine = [r for r in rows if r["voice"] == voice]
        for row, ratio in zip(mine, pace_ratios([r["seconds_per_letter"] for r in mine]), strict=True):
            row["pace_ratio"] = ratio
    return rows


def _listen(rows: list[dict], audio: list[np.ndarray], transcriber: Transcriber) -> None:
    """Transcribe each utterance and add its transcript, WER and CER to its row."""
    by_id = {s.id: s for s in SENTENCES}
    for row, pcm in progress(list(zip(rows, audio, strict=True)), f"eval: listening ({transcriber.name})", "utterance"):
        transcript = transcriber.transcribe(to_asr_rate(pcm)) if len(pcm) else ""
        result = score(by_id[row["id"]], transcript)
        row.update(transcript=transcript, reference=result.reference, wer=result.wer, cer=result.cer)


def _median(values: list) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def summarize(rows: list[dict]) -> dict:
    """One side's figures: means of the error rates, medians of the rest, worst streaming dB, flagged count."""
    wer = [r["wer"] for r in rows]
    first = sorted(r["first_audio_s"] for r in rows if r["first_audio_s"] is not None)
    return {
        "utterances": len(rows),
        "flagged": sum(bool(r["flags"]) for r in rows),
        "mean_wer": float(np.mean(wer)) if wer else None,
        "mean_cer": float(np.mean([r["cer"] for r in rows])) if rows else None,
        "median_first_audio_s": _median(first),
        "p95_first_audio_s": first[min(len(first) - 1, int(0.95 * len(first)))] if first else None,
        "median_rtf": _median([r["rtf"] for r in rows]),
        "min_stream_db": min((r["stream_db"] for r in rows if r["stream_db"] is not None), default=None),
        "median_lead_silence_s": _median([r["lead_silence_s"] for r in rows]),
        "median_trail_silence_s": _median([r["trail_silence_s"] for r in rows]),
        "median_loudness_dbfs": _median([r["loudness_dbfs"] for r in rows]),
        "max_repeated_share": max((r["repeated_share"] for r in rows if r["repeated_share"] is not None), default=None),
        "guard": dict(sorted({g: sum(r["guard"] == g for r in rows) for g in {r["guard"] for r in rows}}.items())),
    }


def run_eval(
    sides: Sequence[Side],
    *,
    voices: Sequence[str] | None,
    sentences: Sequence[Sentence],
    out_dir: Path,
    command: str,
) -> dict:
    """Speak, listen, measure and write the report of every side into `out_dir`; returns the report."""
    base = sides[0].config
    voices = list(voices or [base.voices.default])
    for side in sides:
        for voice in voices:
            try:
                side.config.voices.check(voice)
            except InvalidRequest as e:
                raise ConfigError("--voices", str(e)) from e
    transcriber = load_transcriber(base.eval)  # first: a missing ASR fails before minutes of speech
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    audio: list[np.ndarray] = []
    for side in sides:
        takes, codec = _speak_all(side, voices, sentences)
        rows += _measure(side, takes, codec, out_dir)
        audio += [t.spoken.audio for t in takes]
        del takes, codec
        gc.collect()  # the engine's weights and KV cache go before the next side loads its own
        _empty_cuda_cache()
    _listen(rows, audio, transcriber)
    cfg = {s.name: s.config.eval for s in sides}
    for row in rows:
        row["flags"] = utterance_flags(row, cfg[row["side"]])
    if len(sides) == 2:
        side_a = {(r["voice"], r["id"]): r for r in rows if r["side"] == "A"}
        for b in (r for r in rows if r["side"] == "B"):
            a = side_a[(b["voice"], b["id"])]
            a["differs"] = b["differs"] = differences(a, b, base.eval)
    reported = any(r["guard"] != NOT_REPORTED for r in rows)
    report = {
        "command": command,
        "asr": {"backend": transcriber.name, "model": transcriber.model},
        "guard": "each utterance's stop reason, as the engine reported it" if reported else NOT_REPORTED,
        "bounds": asdict(base.eval),
        "sides": [
            {"name": s.name, "overrides": s.overrides, "summary": summarize([r for r in rows if r["side"] == s.name])}
            for s in sides
        ],
        "utterances": rows,
    }
    write_report(out_dir, report)
    return report


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
