"""`pipecat-orpheus eval` end to end on the tiny model: the report, the WAVs, the HTML page and `--vs`."""

from __future__ import annotations

import json
import wave

import pytest

from pipecat_orpheus.cli import main
from pipecat_orpheus.eval.report import METRICS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_eval_writes_the_report_page_and_wavs_of_both_configurations(tiny_model_dir, tmp_path, capsys):
    """Two sentences under the batched engine and, with --vs, the reference path: noise scores WER ~1, all reported."""
    out = tmp_path / "report"
    argv = ["eval", "--model", str(tiny_model_dir / "llm"), "--codec", str(tiny_model_dir / "snac"), "--device", "cpu"]
    argv += ["--asr", "pocketsphinx", "--sentences", "harvard01", "tag", "--limit", "2", "-o", str(out)]
    argv += ["--set", "sampling.max_tokens=70", "--vs", "engine.backend=reference"]
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert printed.count(" utterances, ") == 2 and "B vs A: " in printed and "index.html" in printed

    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["sides"]] == ["A", "B"]
    assert report["sides"][1]["overrides"] == {"sampling.max_tokens": 70, "engine.backend": "reference"}
    assert report["asr"]["backend"] == "pocketsphinx"
    rows = report["utterances"]
    assert sorted((r["side"], r["id"]) for r in rows) == [
        ("A", "harvard01"),
        ("A", "tag01"),
        ("B", "harvard01"),
        ("B", "tag01"),
    ]
    assert {r["seed"] for r in rows if r["id"] == "harvard01"} == {report["bounds"]["seed"]}  # same seed both sides
    for r in rows:
        with wave.open(str(out / r["wav"])) as w:
            assert (w.getframerate(), w.getnchannels(), w.getnframes()) == (24000, 1, 10 * 2048)
        assert r["wer"] >= 0.9 and "wer" in r["flags"]  # the tiny model's noise is not speech
        assert r["stream_db"] is not None and r["first_audio_s"] > 0 and r["rtf"] > 0
        assert isinstance(r["differs"], list)
    reference = [r for r in rows if r["side"] == "B"]  # the reference path pushes frames with offline timing
    assert all(r["stream_db"] >= 40 and r["early_frames"] == 0 for r in reference)
    assert report["sides"][0]["summary"]["utterances"] == 2

    page = (out / "index.html").read_text()
    assert page.count("<svg") == len(METRICS) and page.count("<audio") == len(rows)
    assert "not measured" not in page.split("word error rate", 1)[1].split("</svg>", 1)[0]
    assert "pipecat-orpheus eval" in page and 'class="num bad"' in page


def test_eval_refuses_unknown_sentences_voices_and_malformed_overrides(tiny_model_dir, tmp_path, capsys):
    """A sentence, voice, --vs pair, limit or device list it cannot use is a one-line error before anything loads."""
    base = ["eval", "--model", str(tiny_model_dir / "llm"), "--asr", "pocketsphinx", "-o", str(tmp_path)]
    assert main([*base, "--sentences", "nope"]) == 2
    assert "--sentences" in capsys.readouterr().err
    assert main([*base, "--vs", "engine.kv_cache_dtype"]) == 2
    assert "--vs" in capsys.readouterr().err
    assert main([*base, "--voices", "nobody"]) == 2
    assert "--voices" in capsys.readouterr().err
    assert main([*base, "--limit", "0"]) == 2
    assert "--limit" in capsys.readouterr().err
    assert main([*base, "--set", "engine.devices=[cpu, cpu]"]) == 2  # one engine in this process: one device
    assert "engine.devices" in capsys.readouterr().err
