import io
import wave

import pytest

from pipecat_orpheus.cli import main


def _check_wav(path, frames=None):
    with wave.open(str(path)) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 24000)
        assert wav.getnframes() > 0 and wav.getnframes() % 2048 == 0
        if frames is not None:
            assert wav.getnframes() == frames * 2048


def test_make_tiny_model_then_speak_writes_wav(tmp_path, monkeypatch, capsys):
    """The README flow, offline: make-tiny-model, then speak text from stdin -> a valid 24 kHz mono 16-bit WAV."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    assert main(["make-tiny-model", "tiny"]) == 0
    assert "noise, not speech" in capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi there <laugh>."))
    args = ["speak", "--model", "tiny/llm", "--codec", "tiny/snac", "-o", "hi.wav", "--seed", "1", "--max-tokens", "70"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Time to first audio" in out and "real-time factor" in out
    _check_wav(tmp_path / "hi.wav")


def test_speak_argument_text_with_voice_and_config(tmp_path, tiny_model_dir, capsys):
    """Text as an argument with a voice and a --config file, greedy on the CPU, writes whole frames."""
    config = tmp_path / "c.yaml"
    config.write_text("engine:\n  max_chars_per_piece: 100\nsampling:\n  temperature: 0\n")
    args = ["speak", "Hello there.", "--voice", "leo", "--max-tokens", "35", "--device", "cpu", "--config", str(config)]
    args += [
        "--model",
        str(tiny_model_dir / "llm"),
        "--codec",
        str(tiny_model_dir / "snac"),
        "-o",
        str(tmp_path / "a.wav"),
    ]
    assert main(args) == 0, capsys.readouterr().err
    _check_wav(tmp_path / "a.wav", frames=5)  # greedy on the tiny model never picks END_OF_SPEECH: 35 tokens


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
