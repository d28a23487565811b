"""Reliability bench: the server under hostile input, auth attacks, floods, faults and a churn soak.

One in-process server (the engine `load_synthesizer` picks, `--backend` to change it) with an API
key, small ping and buffer bounds. Through every phase a few well-behaved clients speak one
utterance after another on persistent connections; each must get every sample (seeded sampling:
the expected length is measured once, alone) and its time to first audio (TTFA) is recorded.

fuzz    hostile frames from seeded random generators over real sockets (bad msgpack, non-maps,
        unknown types, wrong field types, huge and nested values, invalid UTF-8, text frames,
        frames past both size limits, valid messages in invalid orders);
auth    missing/wrong/empty/overlong/duplicated keys in header, bearer and query (401 each),
        right keys accepted, and the key never in the logs;
floods  connections past the limit, Text/Speak/Marker floods, slow readers, silent peers and
        half-open handshakes, cancel storms, rapid connect/disconnect;
faults  a request that fails for real (prompt too long for a slot), clients killed with SIGKILL
        mid-utterance, SIGTERM of a real `pipecat-orpheus serve` mid-utterance (drain), a server
        restart under an `OrpheusClient`, the KV-cache-does-not-fit message;
soak    churn at full concurrency (connect, speak, read/cancel/abort, disconnect).
baseline (first) the good clients alone, the reference for their TTFA under abuse.

After each phase: engine slots back to 0, no asyncio task left over, /healthz 200.
Each phase is a module bench_reliability_<phase>.py; what they share is bench_reliability_common.py.

python bench/bench_reliability.py --soak-s 600          # -> bench/results/reliability.json
python bench/bench_reliability.py --soak-s 20 --fuzz-frames 2000 --auth-attempts 300 --out /tmp/rel.json
(it re-runs itself with MALLOC_ENV set unless --default-malloc: see MALLOC_ENV)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import sys
import tempfile
from pathlib import Path

from bench_reliability_auth import run_auth
from bench_reliability_common import GOOD_TEXT, KEY, Bench
from bench_reliability_faults import run_faults
from bench_reliability_floods import run_floods
from bench_reliability_fuzz import run_fuzz
from bench_reliability_soak import run_soak
from loguru import logger

from pipecat_orpheus.config import load_config
from pipecat_orpheus.speech import load_synthesizer
from pipecat_orpheus.testing import make_tiny_model, tiny_model_overrides
from pipecat_orpheus.wire.server import OrpheusServer

# glibc's dynamic thresholds: each time a large block is freed it raises the mmap threshold (up to
# 32 MiB) and the heap-top trim threshold to twice that, so after a peak of concurrent requests up to
# 64 MiB per arena stays freed but resident (a one-time RSS step, not a leak: bench/README.md,
# Reliability). Fixing the mmap threshold at that 32 MiB ceiling keeps large blocks on the heap (no
# mmap per step) while the trim threshold stays at 128 KiB. README.md advises the same for CPU serving.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432"}


async def main(args) -> dict:
    model_dir = Path(args.model_dir) if args.model_dir else Path(tempfile.mkdtemp(prefix="bench_rel_"))
    if not args.model_dir:
        make_tiny_model(model_dir)
    overrides = {
        **tiny_model_overrides(model_dir),
        "engine.backend": args.backend,
        "engine.max_slots": args.slots,
        "engine.max_queue": 4 * args.slots,
        "engine.max_tokens_per_slot": 256,  # POISON's prompt (~460 tokens) does not fit: a real per-request fault
        "engine.max_chars_per_piece": 160,  # while every ASCII piece (<= ~175 tokens) + 70 audio tokens does
        "sampling.max_tokens": 70,  # 10 frames (0.85 s) per piece
        "sampling.seed": 7,  # every request of a text gets the same tokens: lengths are known
        "server.ping_interval_s": 1,
        "server.ping_timeout_s": 2,
        "server.close_timeout_s": 2,
        "limits.max_connections": 64,
        "limits.max_unsent_audio_s": 2,
    }
    cfg = load_config(overrides=overrides)
    synth = await asyncio.to_thread(load_synthesizer, cfg)
    solo = synth.submit(GOOD_TEXT)
    expected = len(await solo.read_all())
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)  # a slow reader's backlog reaches the server
    server = OrpheusServer(cfg, synth, sock=listener, api_keys=[KEY])
    await server.start()
    bench = Bench(server, synth, expected, args.good)
    leaks = {"lines": 0}

    def sink(message) -> None:
        leaks["lines"] += KEY in str(message) or KEY in str(message.record["exception"] or "")

    logger.remove()
    logger.add(sys.stderr, level="ERROR", format="{time:HH:mm:ss} {level} {name}: {message}")
    logger.add(sink, level="DEBUG")

    def on_unhandled(loop, context) -> None:
        bench.unhandled += 1
        loop.default_exception_handler(context)

    asyncio.get_running_loop().set_exception_handler(on_unhandled)
    phases = {}
    try:
        phases["baseline"] = await bench.phase("baseline", lambda: asyncio.sleep(args.baseline_s))  # no abuse
        phases["fuzz"] = await bench.phase("fuzz", lambda: run_fuzz(bench, cfg.limits, args.fuzz_frames, args.seed))
        phases["auth"] = await bench.phase("auth", lambda: run_auth(bench, args.auth_attempts))
        phases["floods"] = await bench.phase("floods", lambda: run_floods(bench, cfg, args.scale))
        phases["faults"] = await bench.phase("faults", lambda: run_faults(bench, cfg, model_dir, args.scale))
        soak = await bench.phase("soak", lambda: run_soak(bench, args.soak_s, args.slots, args.seed))
        phases["soak"] = soak
    finally:
        await server.shutdown(grace_s=1)
        synth.close()
    phases["auth"]["key_in_log_lines"] = leaks["lines"]
    if leaks["lines"]:
        phases["auth"]["failures"] += 1
    return {
        "frames_fuzzed": phases["fuzz"]["frames_fuzzed"],
        "auth_attempts": phases["auth"]["auth_attempts"],
        "failures": sum(ph["failures"] for ph in phases.values()),
        "data_lost": sum(ph["data_lost"] for ph in phases.values()),
        "rss_growth_pct": soak["soak_rss_growth_pct"],
        "soak_s": args.soak_s,
        "categories": phases,
        "setup": {
            "backend": cfg.engine.backend,
            "model": "tiny random Orpheus-format model (testing.make_tiny_model)"
            if not args.model_dir
            else args.model_dir,
            "engine_slots": args.slots,
            "good_clients": args.good,
            "expected_samples_per_good_utterance": expected,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), {platform.python_version()}",
            "command": " ".join(sys.argv),
            "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV},
        },
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--soak-s", type=float, default=600, help="length of the churn soak (seconds)")
    parser.add_argument("--fuzz-frames", type=int, default=20000, help="hostile frames sent")
    parser.add_argument("--auth-attempts", type=int, default=2000, help="handshakes with bad and good keys")
    parser.add_argument("--scale", type=int, default=4, help="multiplier of flood and fault rounds")
    parser.add_argument("--slots", type=int, default=16, help="engine.max_slots; also the soak's concurrency")
    parser.add_argument("--good", type=int, default=4, help="well-behaved clients running through every phase")
    parser.add_argument("--backend", default=load_config().engine.backend, choices=("batched", "reference"))
    parser.add_argument("--model-dir", default=None, help="a directory with llm/ and snac/ (default: a tiny model)")
    parser.add_argument("--baseline-s", type=float, default=20, help="good clients alone, for reference TTFA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/reliability.json")
    parser.add_argument("--default-malloc", action="store_true", help=f"run without {', '.join(MALLOC_ENV)}")
    args = parser.parse_args()
    if not args.default_malloc and any(k not in os.environ for k in MALLOC_ENV):  # glibc reads them at start
        os.execve(sys.executable, [sys.executable, *sys.argv], {**MALLOC_ENV, **os.environ})
    result = asyncio.run(main(args))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("categories", "setup")}))
    print(f"wrote {args.out}")
