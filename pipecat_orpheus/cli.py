"""`pipecat-orpheus`: speak text to a WAV file, serve the WebSocket API, check the speech, or build the tiny test model.

Argument parsing, progress and timing only; the work is done by the modules it calls. Typed
user errors (bad configuration, weights that cannot be loaded) print one line on stderr and
exit with code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import time
from pathlib import Path

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

    ev = sub.add_parser(
        "eval", help="speak a fixed sentence set, transcribe it and measure it: a speech-quality report"
    )
    _add_model_args(ev)
    ev.add_argument(
        "-o", "--output", type=Path, default=Path("eval_report"), help="report folder (default: eval_report)"
    )
    ev.add_argument("--voices", nargs="+", default=None, help="voices to speak in (default: voices.default)")
    ev.add_argument(
        "--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides, e.g. sampling.temperature=0.4"
    )
    ev.add_argument(
        "--vs",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="a second configuration, side by side: e.g. engine.kv_cache_dtype=fp8",
    )
    ev.add_argument(
        "--asr", choices=("faster-whisper", "pocketsphinx"), default=None, help="who listens (default: eval.asr)"
    )
    ev.add_argument(
        "--sentences", nargs="+", default=None, help="sentence ids or kinds (harvard short number tag long)"
    )
    ev.add_argument("--limit", type=int, default=None, help="speak at most this many sentences")

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


def _speak(args: argparse.Namespace) -> None:
    from pipecat_orpheus.config import load_config
    from pipecat_orpheus.engine.request import SamplingParams
    from pipecat_orpheus.format import SAMPLE_RATE
    from pipecat_orpheus.pcm import write_wav
    from pipecat_orpheus.speech import load_synthesizer, speak

    text = _read_text(args.text)
    overrides = {**_model_overrides(args), "engine.backend": args.backend, "sampling.seed": args.seed}
    config = load_config(args.config, overrides=overrides)
    sampling = SamplingParams.from_config(config.sampling, temperature=args.temperature, max_tokens=args.max_tokens)
    print(f"Loading {config.model.llm} and {config.model.codec} ({config.engine.backend} backend)...", file=sys.stderr)
    t0 = time.perf_counter()
    synth = load_synthesizer(config)
    print(f"Loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    try:
        spoken = asyncio.run(speak(synth, text, voice=args.voice, sampling=sampling))
    finally:
        synth.close()
    write_wav(Path(args.output), spoken.audio)
    seconds = len(spoken.audio) / SAMPLE_RATE
    first, total = spoken.first_audio_s, spoken.total_s
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


def _eval(args: argparse.Namespace) -> None:
    from pipecat_orpheus.eval.runner import parse_assignments, plan_sides, run_eval
    from pipecat_orpheus.eval.sentences import select

    base = {**_model_overrides(args), "eval.asr": args.asr}
    sides = plan_sides(args.config, base, parse_assignments(args.set, "--set"), parse_assignments(args.vs, "--vs"))
    sentences = select(args.sentences, args.limit)
    command = shlex.join(["pipecat-orpheus", *sys.argv[1:]]) if sys.argv[1:2] == ["eval"] else "pipecat-orpheus eval"
    report = run_eval(sides, voices=args.voices, sentences=sentences, out_dir=args.output, command=command)
    for side in report["sides"]:
        s = side["summary"]
        print(
            f"{side['name']}: {s['utterances']} utterances, {s['flagged']} flagged; mean WER {_num(s['mean_wer'])}, "
            f"CER {_num(s['mean_cer'])}; first audio median {_num(s['median_first_audio_s'])} s; "
            f"real-time factor median {_num(s['median_rtf'])}; streamed vs offline worst {_num(s['min_stream_db'])} dB"
        )
    if len(report["sides"]) == 2:
        differ = [r for r in report["utterances"] if r["side"] == "B" and r["differs"]]
        what = sorted({d for r in differ for d in r["differs"]})
        print(f"B vs A: {len(differ)} utterances differ in what matters" + (f" ({', '.join(what)})" if what else ""))
    print(f"Wrote {args.output / 'index.html'} and {args.output / 'report.json'}")


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _make_tiny_model(args: argparse.Namespace) -> None:
    from pipecat_orpheus.testing import make_tiny_model

    make_tiny_model(args.dir)
    print(f"Wrote a tiny random Orpheus-format model to {args.dir}/llm and {args.dir}/snac (noise, not speech)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `pipecat-orpheus` console script; returns the exit code."""
    args = _build_parser().parse_args(argv)
    commands = {"speak": _speak, "serve": _serve, "eval": _eval, "make-tiny-model": _make_tiny_model}
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
