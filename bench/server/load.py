"""The server under load, the way users meet it: `pipecat-orpheus serve` and many WebSocket clients, in processes.

This process starts a real `pipecat-orpheus serve` (its configuration as `ORPHEUS_*` variables:
the shipped orpheus_config.yaml, the model, `--set`; `--workers N` server processes, engine
cores on `engine.devices`) and `--client-procs` processes of `bench.server.load_client`, each
running its share of the streams on one event loop and printing a JSON line per utterance. Per
level, mode and format:

burst  N streams arrive within 1 s (evenly spread): each connects, speaks one sentence of
       ~`--prompt-tokens` prompt tokens (Kyutai `Text` words then `Eos`, or `Speak` with
       `--burst-protocol speak`) and reads its audio to the end.
churn  N conversations for `--duration-s`: `Speak`, read to `Done`, wait until the audio has
       played, pause 0.3-2 s, speak again. `--cancel-fraction` of utterances send `Cancel{id}`
       part-way; the round trip to `Cancelled` is timed.

Figures: time to first audio (send -> first `Audio`) p50/p95/p99; late chunks (an `Audio` that
arrives after the audio before it has finished playing, playback starting at the first one),
the streams that had one and the worst lateness; the cancel round trip; and the server's own
`/metrics` over the run (its TTFA histogram, pieces, errors, each engine core's counters).
Every utterance is `--audio-tokens` long (`sampling.min_tokens`: random weights stop at random).

python3 -m bench.server.load --random-weights --out $OUT/server_load.json      # GPU, real-size random model
python3 -m bench.server.load --tiny --device cpu --levels 2 4 --mode burst churn --duration-s 5 \
    --client-procs 2 --out /tmp/load.json                                      # CPU check of the machinery
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.server import scrape
from bench.server.report import summarize, table
from pipecat_orpheus.config import Config, load_config
from pipecat_orpheus.wire.server import STREAM_PATHS

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 120.0  # the client processes started
CORE_RESTART_TIMEOUT_S = 900.0  # a killed engine core back (its model loaded again)
SERVE_TIMEOUT_S = 900.0  # `serve` started -> /healthz 200 (loading, CUDA graphs, compiles on a cold GPU)
START_MARGIN_S = 0.5  # from `go` to T0: every process has read it before the first arrival
FORMATS = ("PcmMessagePack", "Pcm16MessagePack")
SETTINGS = (
    "levels", "mode", "formats", "client_procs", "burst_protocol", "spread_s", "duration_s", "pause_s",
    "cancel_fraction", "audio_tokens", "workers", "kill_core_after_s", "set",
)  # fmt: skip
# Words for the texts: no sentence ends inside, so the server's sentence splitter keeps one piece each.
WORDS = (
    "your table for four is booked at seven and the car will pick you up from the hotel lobby at half past six "
    "so bring a jacket because the terrace gets cold after sunset and the chef has a tasting menu tonight "
    "with fresh fish from the harbour a mushroom risotto and a lemon tart that people travel across town for"
).split()


def bench_overrides(args, **extra) -> dict:
    """The config keys a load bench sets: its model, full-length utterances, `extra`, then `--set`."""
    overrides = {
        "model.device": args.device,
        "sampling.max_tokens": args.audio_tokens,
        "sampling.min_tokens": args.audio_tokens,  # random weights would stop at random
        "engine.core_process": args.core_process,  # None: as the configuration says (shipped: true)
        **extra,
    }
    if args.tiny or args.random_weights:  # written in the real on-disk format: the engine core loads them itself
        from bench.model_files import write_random_models

        root = Path(args.model_dir or tempfile.mkdtemp(prefix="bench_models_"))
        overrides.update(write_random_models(root, tiny=args.tiny, device=args.device))
        if args.random_weights:
            overrides["model.dtype"] = "bfloat16"
    overrides.update({k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)})
    return overrides


def bench_config(args, **extra) -> Config:
    """The configuration a load bench runs with (`bench_overrides` over `--config`)."""
    return load_config(args.config, overrides=bench_overrides(args, **extra))


def make_texts(tokenizer, voice: str, prompt_tokens: int, count: int) -> tuple[list[str], list[int]]:
    """`count` different sentences, each the first whose prompt reaches `prompt_tokens`, and their prompt lengths."""
    from pipecat_orpheus.format import build_prompt

    texts, lengths = [], []
    for i in range(count):
        words, k = [], (i * 7) % len(WORDS)
        while True:
            words.append(WORDS[(k + len(words)) % len(WORDS)])
            text = " ".join(words).capitalize() + "."
            n = len(build_prompt(tokenizer, text, voice))
            if n >= prompt_tokens or len(words) > 200:
                break
        texts.append(text)
        lengths.append(n)
    return texts, lengths


COUNTERS = ("steps", "busy_s", "decode_tokens", "prefill_tokens", "codec_windows")  # `EngineStats` fields


def engine_delta(before: list[dict], after: list[dict], wall_s: float) -> dict | None:
    """The engine cores' work over a run (each core's counters before and after; none for the reference path).

    A core restarted during the run counts from zero again: its figures are then those since the restart.
    """
    if not before or len(before) != len(after):
        return None
    restarted = [a["steps"] < b["steps"] for b, a in zip(before, after, strict=True)]
    per_core = [
        {k: a[k] - (0 if new else b[k]) for k in COUNTERS} for b, a, new in zip(before, after, restarted, strict=True)
    ]
    d = {k: sum(core[k] for core in per_core) for k in COUNTERS}
    return {
        "steps": d["steps"],
        "mean_step_ms": round(d["busy_s"] / max(d["steps"], 1) * 1e3, 3),
        "busy_fraction": round(d["busy_s"] / wall_s / len(per_core), 3),  # of each core, on average
        "decode_tok_s": round(d["decode_tokens"] / wall_s, 1),
        "prefill_tokens": d["prefill_tokens"],
        "codec_windows": d["codec_windows"],
        "decode_tokens_by_core": [core["decode_tokens"] for core in per_core],
    }


def make_job(args, url: str, level: int, mode: str, fmt: str, texts: list[str], expected_samples: int) -> dict:
    streams = [
        {"conv": i, "offset_s": args.spread_s * i / level, "seed": 1000 * level + i,
         "texts": [texts[(i + 5 * k) % len(texts)] for k in range(8)]}
        for i in range(level)
    ]  # fmt: skip
    return {
        "url": url,
        "mode": mode,
        "format": fmt,
        "protocol": args.burst_protocol,
        "duration_s": args.duration_s,
        "cancel_fraction": args.cancel_fraction,
        "pause_s": args.pause_s,
        "expected_samples": expected_samples,
        "streams": streams,
    }


async def run_clients(job: dict, procs: int) -> tuple[list[dict], float, float]:
    """Split `job`'s streams over `procs` client processes, start them together; their records, T0, end."""
    shares = [dict(job, streams=job["streams"][p::procs]) for p in range(min(procs, len(job["streams"])))]
    logs = [tempfile.TemporaryFile() for _ in shares]  # each child's stderr, quoted when it fails
    children = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.server.load_client", cwd=ROOT,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
        )
        for log in logs
    ]  # fmt: skip
    records: list[dict] = []

    def failed(what: str, child) -> RuntimeError:
        log = logs[children.index(child)]
        log.seek(0)
        tail = log.read().decode(errors="replace")[-2000:]
        return RuntimeError(f"a client process {what}; its stderr:\n{tail}")

    async def ready(child, share) -> None:
        child.stdin.write((json.dumps(share) + "\n").encode())
        await child.stdin.drain()
        line = await child.stdout.readline()
        if not line or "ready" not in json.loads(line):
            if not line:  # it ended: its exit status says how
                await child.wait()
            raise failed(f"did not start (it printed {line!r}, exit {child.returncode})", child)

    async def collect(child) -> None:
        while line := await child.stdout.readline():
            record = json.loads(line)
            if record.get("end"):
                break
            records.append(record)
        if await child.wait():
            raise failed(f"exited with {child.returncode}", child)

    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            await asyncio.gather(*(ready(c, s) for c, s in zip(children, shares, strict=True)))
        t0 = time.monotonic() + START_MARGIN_S
        for child in children:
            child.stdin.write(f"go {t0!r}\n".encode())
            await child.stdin.drain()
        await asyncio.gather(*(collect(c) for c in children))
    finally:
        for child in children:
            if child.returncode is None:
                child.kill()
                await child.wait()
        for log in logs:
            log.close()
    return records, t0, time.monotonic()


async def kill_a_core(port: int, server_pid: int, after_s: float) -> dict:
    """SIGKILL the first engine core about `after_s` into a run (from its clients' start); /healthz and the restart."""
    from bench.serving import engine_cores, healthy

    await asyncio.sleep(START_MARGIN_S + after_s)
    victim = engine_cores(server_pid)[0]
    os.kill(victim, signal.SIGKILL)
    killed, down = time.monotonic(), None
    figure = {"killed_pid": victim, "killed": killed}
    while time.monotonic() - killed < CORE_RESTART_TIMEOUT_S:
        up = await healthy(port)
        if not up and down is None:
            down = time.monotonic()
        elif up and down is not None:
            back = time.monotonic()
            return figure | {"healthz_503_after_s": round(down - killed, 3), "back_after_s": round(back - killed, 3)}
        await asyncio.sleep(0.05)
    return figure | {"back_after_s": None}


async def run_level(args, port: int, server_pid: int, level: int, mode: str, fmt: str, texts, expected: int) -> dict:
    job = make_job(args, f"ws://127.0.0.1:{port}{STREAM_PATHS[0]}", level, mode, fmt, texts, expected)
    before = await scrape.scrape(port)
    after_s = args.kill_core_after_s
    kill = asyncio.create_task(kill_a_core(port, server_pid, after_s)) if after_s is not None else None
    async with scrape.Peaks(port) as peaks:
        records, t0, end = await run_clients(job, args.client_procs)
    wall = end - t0
    after = await scrape.scrape(port)
    figures = summarize(records, level=level, mode=mode, fmt=fmt, wall_s=wall)
    figures["server"] = scrape.delta(before, after) | {"peaks": peaks.peaks}
    figures["engine"] = engine_delta(scrape.engine_counters(before), scrape.engine_counters(after), wall)
    if kill is not None:
        figures["core_kill"] = await kill
        figures["core_kill"]["killed_at_s"] = round(figures["core_kill"].pop("killed") - t0, 3)
    return figures


def device_name(args) -> str:
    if args.device != "cpu":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} ({__import__('os').cpu_count()} cores)"


async def bench(args) -> dict:
    from bench.common import command_line
    from bench.serving import free_port, serve_process
    from pipecat_orpheus.format import SAMPLE_RATE
    from pipecat_orpheus.loader import load_tokenizer

    extra = {"limits.max_connections": max(args.levels) + 16, "server.workers": args.workers}
    overrides = bench_overrides(args, **extra)
    config = load_config(args.config, overrides=overrides)  # checked here before a server starts on it
    texts, prompt_lengths = make_texts(load_tokenizer(config.model.llm), config.voices.default, args.prompt_tokens, 64)
    expected_samples = args.audio_tokens // 7 * 2048  # whole SNAC frames
    runs = []
    port = free_port()
    environment = {"ORPHEUS_API_KEYS": "", "LOGURU_LEVEL": args.log_level}  # no auth on loopback; quiet logs
    served = serve_process(overrides, port, config_path=args.config, ready_timeout_s=SERVE_TIMEOUT_S, **environment)
    started = time.monotonic()
    async with served as server:
        ready_s = time.monotonic() - started  # process start -> /healthz 200: load, graphs, compiles
        # Not recorded: first connections, allocator, and the engine's first cancels and mixed
        # joins (a first churn run on an H200 stalled once for ~0.8 s; later ones did not).
        warm, warm_args = min(8, max(args.levels)), argparse.Namespace(**vars(args))
        warm_args.duration_s, warm_args.cancel_fraction = min(3.0, args.duration_s), 0.5
        warm_args.kill_core_after_s = None
        for mode in ("burst", "churn"):
            await run_level(warm_args, port, server.pid, warm, mode, FORMATS[0], texts, expected_samples)
        for level in args.levels:
            for mode in args.mode:
                for fmt in args.formats:
                    runs.append(await run_level(args, port, server.pid, level, mode, fmt, texts, expected_samples))
                    print(table(runs[-1:], header=len(runs) == 1), flush=True)
    print("\n" + table(runs), flush=True)
    devices = config.engine.devices or (config.model.device,)
    return {
        "what": "the server under load: `pipecat-orpheus serve` and clients in other processes over loopback",
        "command": command_line(),
        "device": device_name(args),
        "speech": (
            f"{len(devices)} engine core process(es) on {', '.join(devices)}"
            if config.engine.core_process
            else "engine in the server process"
        ),
        "workers": config.server.workers,
        "serve_ready_s": round(ready_s, 1),
        "model": "tiny" if args.tiny else ("real-size random weights" if args.random_weights else config.model.llm),
        "settings": {k: getattr(args, k) for k in SETTINGS}
        | {
            "audio_s_per_utterance": expected_samples / SAMPLE_RATE,
            "prompt_tokens": {"target": args.prompt_tokens, "min": min(prompt_lengths), "max": max(prompt_lengths)},
            "example_text": texts[0],
        },
        "config": dataclasses.asdict(config),
        "definitions": {
            "ttfa": "client side: first Text (kyutai) or Speak sent -> first Audio arrives",
            "connect": "burst: connect -> Ready, before the text is sent",
            "late_chunk": "an Audio message arriving after first-arrival + duration of the audio before it",
            "cancel_rtt": "Cancel sent -> Cancelled arrives (churn)",
            "server": "deltas of the server's /metrics over the run (quantiles interpolated in its buckets)",
        },
        "runs": runs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", type=int, nargs="+", default=[64, 128, 256], help="streams (conversations) per run")
    ap.add_argument("--mode", nargs="+", choices=("burst", "churn"), default=["burst", "churn"])
    ap.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    ap.add_argument("--client-procs", type=int, default=8, help="client processes the streams are spread over")
    ap.add_argument("--burst-protocol", choices=("kyutai", "speak"), default="kyutai")
    ap.add_argument("--spread-s", type=float, default=1.0, help="arrivals (burst) and starts (churn) spread over this")
    ap.add_argument("--duration-s", type=float, default=30.0, help="churn: how long conversations keep speaking")
    ap.add_argument("--pause-s", type=float, nargs=2, default=[0.3, 2.0], help="churn: pause range after playback")
    ap.add_argument("--cancel-fraction", type=float, default=0.1, help="churn: utterances cancelled part-way")
    ap.add_argument("--prompt-tokens", type=int, default=50, help="prompt length of each utterance (tokens)")
    ap.add_argument("--audio-tokens", type=int, default=None, help="audio tokens per utterance (420 = 5.1 s; tiny: 70)")
    ap.add_argument("--config", default=None, help="YAML config (default: orpheus_config.yaml)")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. engine.max_slots=320")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the tiny test model (checks the machinery, on the CPU)")
    ap.add_argument("--random-weights", action="store_true", help="real-size random Orpheus, on disk")
    ap.add_argument("--model-dir", default=None, help="where --random-weights/--tiny write the models (kept for reuse)")
    ap.add_argument(
        "--core-process", action=argparse.BooleanOptionalAction, help="the engine in a core process (default: config)"
    )
    ap.add_argument("--kill-core-after-s", type=float, default=None, help="SIGKILL core 0 so far into each run")
    ap.add_argument("--workers", type=int, default=None, help="server processes (server.workers; default: config)")
    ap.add_argument("--log-level", default="WARNING", help="the server's log level (loguru)")
    ap.add_argument("--out", default="bench/results/server_load.json")
    args = ap.parse_args()
    from loguru import logger

    logger.remove()  # the server logs every stream at DEBUG: thousands of lines per level
    logger.add(sys.stderr, level=args.log_level)
    if args.audio_tokens is None:
        args.audio_tokens = 70 if args.tiny else 420
    result = asyncio.run(bench(args))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
