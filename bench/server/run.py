"""Benchmark of the WebSocket server (pipecat_orpheus/wire/server.py) over loopback.

cpu  Connections per second and server memory per idle connection, with the tiny model and
     the server in a subprocess (its RSS is read from /proc). Runs anywhere.
gpu  What the server adds to the engine: time to first audio (TTFA), gaps between audio
     chunks and time to last audio, at 1, 32 and 128 concurrent streams. Each level runs
     twice with the same texts and seeds: straight on the engine (`submit`, in this process)
     and through the server (clients in a separate process, Kyutai float32 format). Added
     latency = through-server percentile minus engine percentile.
     Target: +<= 10 ms p95 TTFA at 128 streams; an idle stream costs < 200 KiB.

python3 -m bench.server.run cpu                   # writes bench/results/server_cpu.json
python3 -m bench.server.run gpu                   # the configured model (orpheus_config.yaml)
python3 -m bench.server.run gpu --random-weights  # real-size Orpheus with random weights (no download)
python3 -m bench.server.run gpu --tiny --levels 1 4 --device cpu   # CPU check of the script
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import yaml

from pipecat_orpheus.config import load_config
from pipecat_orpheus.format import SAMPLE_RATE

TEXTS = [
    "Hello there, how can I help you today?",
    "The weather looks lovely this afternoon.",
    "Let me check that for you right away.",
    "Your order will arrive on Tuesday morning.",
]
SAME_BURST_S = 0.001  # Audio messages closer than this came from one engine chunk


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summary(values: list[float]) -> dict:
    ms = [v * 1000 for v in values]
    return {"n": len(ms), "p50_ms": pct(ms, 50), "p95_ms": pct(ms, 95), "mean_ms": statistics.fmean(ms) if ms else None}


def diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- cpu: connections/s and memory per connection ---------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def wait_healthy(port: int, timeout: float = 120) -> None:
    async with asyncio.timeout(timeout):
        while True:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                ok = (await reader.read()).startswith(b"HTTP/1.1 200")
                writer.close()
                if ok:
                    return
            except OSError:
                pass
            await asyncio.sleep(0.1)


async def open_ready(url: str):
    from websockets.asyncio.client import connect

    ws = await connect(url, compression=None)
    first = msgpack.unpackb(await ws.recv())
    assert first["type"] == "Ready", first
    return ws


async def cpu_bench(args) -> dict:
    from pipecat_orpheus.testing import make_tiny_model, tiny_model_overrides

    tmp = Path(tempfile.mkdtemp(prefix="bench_server_"))
    make_tiny_model(tmp)
    port = free_port()
    overrides = {
        "engine.backend": "reference",
        **tiny_model_overrides(tmp),
        "sampling.max_tokens": 14,
        "server.port": port,
        "limits.max_connections": args.connections + 16,
    }
    code = (
        "from pipecat_orpheus.config import load_config; from pipecat_orpheus.wire.server import run; "
        f"run(load_config(overrides={overrides!r}))"
    )
    log = open(tmp / "server.log", "w")
    env = dict(os.environ, LOGURU_LEVEL="WARNING")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=log, env=env)
    url = f"ws://127.0.0.1:{port}/api/tts_streaming"
    try:
        await wait_healthy(port)
        # Warm up: imports, allocator arenas, one synthesis through the whole path.
        ws = await open_ready(url)
        await ws.send(msgpack.packb({"type": "Speak", "text": "Warm up.", "id": 0}))
        while msgpack.unpackb(await ws.recv())["type"] != "Done":
            pass
        await ws.close()
        for _ in range(3):
            batch = await asyncio.gather(*(open_ready(url) for _ in range(50)))
            await asyncio.gather(*(w.close() for w in batch))
        await asyncio.sleep(0.5)

        # Sequential handshakes: connect, Ready, close.
        start = time.perf_counter()
        for _ in range(args.sequential):
            ws = await open_ready(url)
            await ws.close()
        sequential_per_s = args.sequential / (time.perf_counter() - start)

        # Memory: RSS as idle streams accumulate, and the slope per stream.
        points, open_ws = [(0, rss_kib(proc.pid))], []
        step = args.connections // 4
        sem = asyncio.Semaphore(args.concurrency)

        async def one(sem: asyncio.Semaphore):
            async with sem:
                return await open_ready(url)

        start = time.perf_counter()
        while len(open_ws) < args.connections:
            open_ws += await asyncio.gather(*(one(sem) for _ in range(step)))
            await asyncio.sleep(0.5)
            points.append((len(open_ws), rss_kib(proc.pid)))
        concurrent_per_s = len(open_ws) / (time.perf_counter() - start - 0.5 * (len(points) - 1))
        n = [x for x, _ in points]
        r = [y for _, y in points]
        mean_n, mean_r = statistics.fmean(n), statistics.fmean(r)
        slope = sum((a - mean_n) * (b - mean_r) for a, b in zip(n, r, strict=True)) / sum((a - mean_n) ** 2 for a in n)
        await asyncio.gather(*(w.close() for w in open_ws))
        await asyncio.sleep(0.5)
        after_close = rss_kib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    return {
        "what": "server in a subprocess (tiny model, reference backend); client in the bench process; loopback",
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "handshakes_per_s_sequential": round(sequential_per_s, 1),
        "handshakes_per_s_concurrent": round(concurrent_per_s, 1),
        "concurrency": args.concurrency,
        "rss_kib_by_open_streams": points,
        "kib_per_idle_stream": round(slope, 1),
        "rss_kib_after_closing_all": after_close,
        "target_kib_per_idle_stream": 200,
    }


# -- gpu: added latency over the engine -------------------------------------------------------------


def chunk_times(events: list[tuple[float, int]], sent: float) -> dict:
    """TTFA, gaps and time to last audio from (arrival time, samples) events of one utterance."""
    merged: list[float] = []
    for t, _ in events:
        if not merged or t - merged[-1] > SAME_BURST_S:
            merged.append(t)
    return {
        "ttfa": merged[0] - sent if merged else None,
        "gaps": [b - a for a, b in zip(merged, merged[1:], strict=False)],
        "ttla": merged[-1] - sent if merged else None,
        "samples": sum(n for _, n in events),
    }


async def engine_level(synth, sampling, n: int, rounds: int) -> list[dict]:
    loop = asyncio.get_running_loop()

    async def one(i: int) -> dict:
        sent = loop.time()
        events = []
        async for chunk in synth.submit(TEXTS[i % len(TEXTS)], sampling=sampling):
            events.append((loop.time(), len(chunk)))
        return chunk_times(events, sent)

    out = []
    for _ in range(rounds):
        out += await asyncio.gather(*(one(i) for i in range(n)))
    return out


def client_process(url: str, n: int, rounds: int, pipe) -> None:
    """Runs in its own process: n streams, `rounds` Speak each at the same moment, per-utterance times."""

    async def main() -> list[dict]:
        from websockets.asyncio.client import connect

        streams = [await connect(url + "?format=PcmMessagePack", compression=None) for _ in range(n)]
        for ws in streams:
            assert msgpack.unpackb(await ws.recv())["type"] == "Ready"
        loop = asyncio.get_running_loop()

        async def one(ws, i: int, r: int) -> dict:
            sent = loop.time()
            await ws.send(msgpack.packb({"type": "Speak", "text": TEXTS[i % len(TEXTS)], "id": r}))
            events = []
            while True:
                m = msgpack.unpackb(await ws.recv())
                if m["type"] == "Audio":
                    events.append((loop.time(), len(m["pcm"])))
                elif m["type"] in ("Done", "Error"):
                    return chunk_times(events, sent)

        out = []
        for r in range(rounds):
            out += await asyncio.gather(*(one(ws, i, r) for i, ws in enumerate(streams)))
        for ws in streams:
            await ws.close()
        return out

    pipe.send(asyncio.run(main()))


async def server_level(url: str, n: int, rounds: int) -> list[dict]:
    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(target=client_process, args=(url, n, rounds, child))
    proc.start()
    result = await asyncio.to_thread(parent.recv)
    await asyncio.to_thread(proc.join)
    return result


def level_stats(rows: list[dict]) -> dict:
    return {
        "ttfa": summary([r["ttfa"] for r in rows if r["ttfa"] is not None]),
        "gap": summary([g for r in rows for g in r["gaps"]]),
        "ttla": summary([r["ttla"] for r in rows if r["ttla"] is not None]),
        "audio_s_per_utterance": statistics.fmean(r["samples"] for r in rows) / SAMPLE_RATE,
    }


def random_weight_engine(config, device: str):
    """The batched engine on a real-size Orpheus 3B and SNAC with random bf16 weights, built in memory."""
    import torch

    from bench.common import build  # the same random model as the engine benchmark
    from pipecat_orpheus.codec import SnacCodec
    from pipecat_orpheus.engine.engine import OrpheusEngine
    from pipecat_orpheus.speech import speech_for

    llm, tokenizer, snac = build(False, torch.device(device), torch.bfloat16)
    engine = OrpheusEngine(llm, tokenizer, SnacCodec(snac, config.codec, torch.device(device)), config=config.engine)
    engine.warm_up()
    return speech_for(engine, config)  # the text front a server's synthesizer is


async def gpu_bench(args) -> dict:
    from pipecat_orpheus.engine.request import SamplingParams
    from pipecat_orpheus.speech import load_synthesizer
    from pipecat_orpheus.wire.server import serve

    overrides = {
        "model.device": args.device,
        "sampling.seed": 0,
        "sampling.max_tokens": 410,  # ~5 s of audio: random weights rarely stop on their own
        "limits.max_connections": max(args.levels) + 8,
    }
    if args.tiny:
        from pipecat_orpheus.testing import make_tiny_model

        root = Path(tempfile.mkdtemp(prefix="bench_server_"))
        make_tiny_model(root)
        overrides.update({"model.llm": str(root / "llm"), "model.codec": str(root / "snac")})
    overrides.update({k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)})
    config = load_config(args.config, overrides=overrides)
    if args.random_weights:
        synth = await asyncio.to_thread(random_weight_engine, config, args.device)
    else:
        synth = await asyncio.to_thread(load_synthesizer, config)
    sampling = SamplingParams.from_config(config.sampling)
    await engine_level(synth, sampling, min(8, max(args.levels)), 1)  # warm-up (graphs, allocator)
    levels = {}
    async with serve(config, synth, port=0, api_keys=[]) as server:
        for n in args.levels:
            engine = level_stats(await engine_level(synth, sampling, n, args.rounds))
            through = level_stats(await server_level(server.url, n, args.rounds))
            added = {
                k: {q: diff(through[k][q], engine[k][q]) for q in ("p50_ms", "p95_ms")} for k in ("ttfa", "gap", "ttla")
            }
            levels[str(n)] = {"engine": engine, "server": through, "added": added}
            print(
                f"{n:4d} streams: TTFA p95 engine {engine['ttfa']['p95_ms']:.1f} ms, server "
                f"{through['ttfa']['p95_ms']:.1f} ms (+{added['ttfa']['p95_ms']:.1f});"
                f" gap p95 +{added['gap']['p95_ms']:.1f} ms;"
                f" last audio p95 +{added['ttla']['p95_ms']:.1f} ms",
                flush=True,
            )
    synth.close()
    import torch

    device = (
        torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else platform.processor()
    )
    return {
        "what": "engine submit() in-process vs the same requests through the server (clients in another process)",
        "device": device,
        "backend": config.engine.backend,
        "model": "tiny" if args.tiny else ("real-size random weights" if args.random_weights else config.model.llm),
        "rounds": args.rounds,
        "levels": levels,
        "target": "server adds <= 10 ms p95 TTFA at 128 streams",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="part", required=True)
    cpu = sub.add_parser("cpu", help="connections/s and memory per idle connection (tiny model)")
    cpu.add_argument("--connections", type=int, default=500)
    cpu.add_argument("--concurrency", type=int, default=32)
    cpu.add_argument("--sequential", type=int, default=200)
    cpu.add_argument("--out", default="bench/results/server_cpu.json")
    gpu = sub.add_parser("gpu", help="added latency over the engine at several concurrency levels")
    gpu.add_argument("--config", default=None, help="YAML config (default: orpheus_config.yaml)")
    gpu.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. engine.backend=reference")
    gpu.add_argument("--levels", type=int, nargs="+", default=[1, 32, 128])
    gpu.add_argument("--rounds", type=int, default=3)
    gpu.add_argument("--device", default="cuda")
    gpu.add_argument("--tiny", action="store_true", help="the tiny test model (script check only)")
    gpu.add_argument("--random-weights", action="store_true", help="real-size model with random weights")
    gpu.add_argument("--out", default="bench/results/server_gpu.json")
    args = ap.parse_args()
    result = asyncio.run(cpu_bench(args) if args.part == "cpu" else gpu_bench(args))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
