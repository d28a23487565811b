import io
import os
import subprocess
import sys
import wave

import pytest

from pipecat_orpheus.cli import main

CLI = [sys.executable, "-m", "pipecat_orpheus.cli"]


def _run(args, tmp_path, stdin=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(CLI + args, cwd=tmp_path, env=env, input=stdin, capture_output=True, text=True, timeout=240)


def test_make_tiny_model_then_speak_writes_wav(tmp_path):
    """The README flow: make-tiny-model, then speak text from stdin offline -> a valid 24 kHz mono 16-bit WAV."""
    made = _run(["make-tiny-model", "tiny"], tmp_path)
    assert made.returncode == 0, made.stderr
    assert "noise, not speech" in made.stdout
    spoken = _run(
        ["speak", "--model", "tiny/llm", "--codec", "tiny/snac", "-o", "hi.wav", "--seed", "1", "--max-tokens", "70"],
        tmp_path,
        stdin="Hi there <laugh>.",
    )
    assert spoken.returncode == 0, spoken.stderr
    assert "Time to first audio" in spoken.stdout and "real-time factor" in spoken.stdout
    with wave.open(str(tmp_path / "hi.wav")) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 24000)
        assert wav.getnframes() > 0 and wav.getnframes() % 2048 == 0


def test_speak_argument_text_voice_and_reproducible(tmp_path, tiny_model_dir):
    """Text as an argument with a voice and seed; the same seed writes the same file twice."""
    args = ["speak", "Hello there.", "--voice", "leo", "--seed", "5", "--max-tokens", "35", "--device", "cpu"]
    args += ["--model", str(tiny_model_dir / "llm"), "--codec", str(tiny_model_dir / "snac")]
    for name in ("a.wav", "b.wav"):
        done = _run([*args, "-o", name], tmp_path)
        assert done.returncode == 0, done.stderr
    assert (tmp_path / "a.wav").read_bytes() == (tmp_path / "b.wav").read_bytes()


def _one_line_error(capsys, code):
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("pipecat-orpheus: error")]
    assert len(lines) == 1 and "Traceback" not in err
    return lines[0]


def test_missing_model_is_one_line_exit_2(tmp_path, capsys):
    """A model path that does not exist prints one error line and exits with 2."""
    code = main(["speak", "Hi.", "--model", str(tmp_path / "nope"), "-o", str(tmp_path / "x.wav")])
    assert "not a directory" in _one_line_error(capsys, code)
    assert not (tmp_path / "x.wav").exists()


def test_bad_config_is_one_line_exit_2(tmp_path, capsys):
    """A missing config file or an out-of-range flag names the key, exit code 2."""
    assert "--config" in _one_line_error(capsys, main(["speak", "Hi.", "--config", str(tmp_path / "none.yaml")]))
    assert "server.port" in _one_line_error(capsys, main(["serve", "--port", "70000"]))


def test_cuda_without_cuda_is_one_line_exit_2(capsys, tiny_model_dir, monkeypatch):
    """--device cuda on a machine without CUDA says to use cpu, exit code 2."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    code = main(["speak", "Hi.", "--device", "cuda", "--model", str(tiny_model_dir / "llm")])
    assert "device: cpu" in _one_line_error(capsys, code)


def test_empty_stdin_is_an_error(capsys, monkeypatch):
    """speak with nothing on stdin refuses clearly."""
    monkeypatch.setattr("sys.stdin", io.StringIO("  \n"))
    assert "nothing to speak" in _one_line_error(capsys, main(["speak"]))


def test_usage_errors_exit_2():
    """Unknown commands and bad backends are argparse usage errors (exit 2)."""
    with pytest.raises(SystemExit) as info:
        main(["sing"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["speak", "Hi.", "--backend", "vllm"])
    assert info.value.code == 2
