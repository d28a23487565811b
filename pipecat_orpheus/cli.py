"""`pipecat-orpheus`: speak text to a WAV file, serve the WebSocket API, or build the tiny test model.

Argument parsing, progress and timing only; the work is done by the modules it calls. Typed
user errors (bad configuration, weights that cannot be loaded) print one line on stderr and
exit with code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import wave
from pathlib import Path

import numpy as np

from pipecat_orpheus.errors import ConfigError, EngineBusy, ModelLoadError, OrpheusError

USER_ERROR_EXIT = 2  # like argparse's own usage errors


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipecat-orpheus", description="Orpheus TTS for Pipecat voice agents.")
    sub = parser.add_subparsers(dest="command", required=True)

    speak = sub.add_parser("speak", help="synthesize text to a 24 kHz mono 16-bit WAV file")
    speak.add_argument("text", nargs="?", default=None, help="text to speak; omitted or '-' reads stdin")
    speak.add_argument("-o", "--output", default="speech.wav", help="WAV file to write (default: speech.wav)")
    speak.add_argument("--voice", default=None, help="voice name (default: voices.default, e.g. tara)")
    _add_model_args(speak)
    speak.add_argument("--seed", type=int, default=None, help="seed for sampling and codec noise (reproducible)")
    speak.add_argument("--temperature", type=float, default=None, help="sampling temperature (0 = greedy)")
    speak.add_argument("--max-tokens", type=int, default=None, help="audio tokens per piece of text (82 = 1 s)")
    speak.add_argument(
        "--backend",
        choices=("batched", "reference"),
        default=None,
        help="batched engine or the one-at-a-time reference path (default: engine.backend, batched)",
    )

    serve = sub.add_parser("serve", help="run the WebSocket TTS server (PROTOCOL.md)")
    _add_model_args(serve)
    serve.add_argument("--host", default=None, help="address to listen on (default: server.host)")
    serve.add_argument("--port", type=int, default=None, help="port (default: server.port; 0 = any free port)")
    serve.add_argument("--api-key-env", default=None, help="environment variable holding comma-separated API keys")
    serve.add_argument("--workers", type=int, default=None, help="server processes around one engine core")

    tiny = sub.add_parser("make-tiny-model", help="write a tiny random Orpheus-format model (noise, not speech)")
    tiny.add_argument("dir", type=Path, help="directory to write llm/ and snac/ into")
    return parser


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML configuration file (default: orpheus_config.yaml)")
    p.add_argument("--model", default=None, help="LLM: hub id or local directory (default: model.llm)")
    p.add_argument("--codec", default=None, help="SNAC codec: hub id or local directory (default: model.codec)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default: model.device)")


def _model_overrides(args: argparse.Namespace) -> dict[str, object]:
    return {"model.llm": args.model, "model.codec": args.codec, "model.device": args.device}


def _read_text(arg: str | None) -> str:
    text = sys.stdin.read() if arg in (None, "-") else arg
    if not text.strip():
        raise ConfigError("text", "nothing to speak: pass the text as an argument or on stdin")
    return text


def write_wav(path: Path, pcm: np.ndarray) -> None:
    """Write float32 PCM as a 24 kHz mono 16-bit WAV file."""
    from pipecat_orpheus.format import SAMPLE_RATE
    from pipecat_orpheus.pcm import float_to_pcm16_bytes

    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)  # 16-bit
        wav.setframerate(SAMPLE_RATE)
        wav.writeframes(float_to_pcm16_bytes(pcm))


async def _stream_to_array(synth, text: str, voice: str | None, sampling) -> tuple[np.ndarray, float | None, float]:
    """All audio of one request, the time to its first chunk and the total time (seconds)."""
    start = time.perf_counter()
    stream = synth.submit(text, voice=voice, sampling=sampling)
    first: float | None = None
    chunks = []
    async for chunk in stream:
        if first is None:
            first = time.perf_counter() - start
        chunks.append(chunk)
    audio = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    return audio, first, time.perf_counter() - start


def _speak(args: argparse.Namespace) -> None:
    from pipecat_orpheus.config import load_config
    from pipecat_orpheus.engine.request import SamplingParams
    from pipecat_orpheus.format import SAMPLE_RATE
    from pipecat_orpheus.speech import load_synthesizer

    text = _read_text(args.text)
    overrides = {**_model_overrides(args), "engine.backend": args.backend, "sampling.seed": args.seed}
    config = load_config(args.config, overrides=overrides)
    sampling = SamplingParams.from_config(config.sampling, temperature=args.temperature, max_tokens=args.max_tokens)
    print(f"Loading {config.model.llm} and {config.model.codec} ({config.engine.backend} backend)...", file=sys.stderr)
    t0 = time.perf_counter()
    synth = load_synthesizer(config)
    print(f"Loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    try:
        audio, first, total = asyncio.run(_stream_to_array(synth, text, args.voice, sampling))
    finally:
        synth.close()
    write_wav(Path(args.output), audio)
    seconds = len(audio) / SAMPLE_RATE
    first_text = f"{first * 1000:.0f} ms" if first is not None else "n/a (no audio)"
    rtf = f"{total / seconds:.2f}" if seconds else "n/a"
    print(f"Wrote {args.output}: {seconds:.2f} s of audio")
    print(f"Time to first audio: {first_text}; total {total:.2f} s; real-time factor {rtf} (below 1 is faster)")


def _serve(args: argparse.Namespace) -> None:
    from pipecat_orpheus.config import load_config

    overrides = {
        **_model_overrides(args),
        "server.host": args.host,
        "server.port": args.port,
        "server.api_key_env": args.api_key_env,
        "server.workers": args.workers,
    }
    config = load_config(args.config, overrides=overrides)
    from pipecat_orpheus.wire import server

    server.run(config)


def _make_tiny_model(args: argparse.Namespace) -> None:
    from pipecat_orpheus.testing import make_tiny_model

    make_tiny_model(args.dir)
    print(f"Wrote a tiny random Orpheus-format model to {args.dir}/llm and {args.dir}/snac (noise, not speech)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `pipecat-orpheus` console script; returns the exit code."""
    args = _build_parser().parse_args(argv)
    commands = {"speak": _speak, "serve": _serve, "make-tiny-model": _make_tiny_model}
    try:
        commands[args.command](args)
    except (ConfigError, ModelLoadError, EngineBusy) as e:
        print(f"pipecat-orpheus: error: {e}", file=sys.stderr)
        return USER_ERROR_EXIT
    except OrpheusError as e:
        print(f"pipecat-orpheus: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130  # 128 + SIGINT, the shell convention
    return 0


if __name__ == "__main__":
    sys.exit(main())
