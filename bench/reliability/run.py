"""Reliability bench: the server under hostile input, auth attacks, floods, text attacks, faults and a soak.

One in-process server (the engine `load_synthesizer` picks, `--backend` to change it) with an API
key, small ping and buffer bounds. Through every phase a few well-behaved clients speak one
utterance after another on persistent connections; each must get every sample (seeded sampling:
the expected length is measured once, alone) and its time to first audio (TTFA) is recorded.

baseline      (first) the good clients alone, the reference for their TTFA under abuse;
fuzz          hostile frames from hypothesis strategies over real sockets, RFC 6455 violations,
              odd request targets (fuzz.py);
auth          missing/wrong/empty/overlong/duplicated keys in header, bearer and query (auth.py);
floods        connections past the limit, Text/Speak/Marker floods, slow readers, silent peers,
              half-open handshakes, cancel storms, churn, ping floods, shutdowns with deaf peers (floods.py);
text_attacks  a bystander's chunk gaps and /healthz under the texts that once stalled the event
              loop, against a baseline of its own, on a `pipecat-orpheus serve` subprocess (text_attacks.py);
faults        a request that fails, clients killed with SIGKILL, SIGTERM of a real server mid-utterance,
              a server restart under an `OrpheusClient`, the KV-cache message (faults.py);
soak          churn at full concurrency (soak.py).

After each phase: engine slots back to 0, no asyncio task left over, /healthz 200 (common.py).
tests/test_reliability_*.py and tests/test_fuzz.py run the same scenarios, short.

python3 -m bench.reliability.run --soak-s 600          # -> bench/results/reliability.json
python3 -m bench.reliability.run --soak-s 20 --fuzz-frames 2000 --auth-attempts 300 --scale 1 --out /tmp/rel.json
(it re-runs itself with MALLOC_ENV set unless --default-malloc: see MALLOC_ENV)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from loguru import logger

from bench.reliability.auth import run_auth
from bench.reliability.common import GOOD_TEXT, KEY, Bench, Findings, guarded, small_send_buffer_listener
from bench.reliability.faults import run_faults
from bench.reliability.floods import run_floods
from bench.reliability.fuzz import run_fuzz
from bench.reliability.soak import run_soak
from bench.reliability.text_attacks import run_text_attacks
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


PHASES = ("baseline", "fuzz", "auth", "floods", "text_attacks", "faults", "soak")


async def text_attacks(overrides: dict, seconds: float) -> dict:
    """The text-attack section: on a server process of its own, so without the good clients (they would be noise)."""
    print(f"[{time.strftime('%H:%M:%S')}] text_attacks ...", flush=True)
    findings = Findings()
    result = await guarded(findings, "text attacks", run_text_attacks(findings, overrides, seconds)) or {}
    section = {"failures": len(findings.failures), "data_lost": result.pop("data_lost", 0), **result}
    section["failure_samples"] = findings.failures[:10]
    print(f"    {json.dumps(section)}", flush=True)
    return section


async def main(args) -> dict:
    model_dir = Path(args.model_dir) if args.model_dir else Path(tempfile.mkdtemp(prefix="bench_rel_"))
    if not args.model_dir:
        make_tiny_model(model_dir)
    overrides = {
        **tiny_model_overrides(model_dir),
        "engine.backend": args.backend,
        "engine.max_slots": args.slots,
        "engine.max_queue": 4 * args.slots,
        "engine.max_tokens_per_slot": 256,  # POISON's prompt (~610 tokens) does not fit: a real per-request fault
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
    listener = small_send_buffer_listener()  # a slow reader's backlog reaches the server
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
    runs = {
        "baseline": lambda: bench.phase("baseline", lambda: asyncio.sleep(args.baseline_s)),  # no abuse
        "fuzz": lambda: bench.phase("fuzz", lambda: run_fuzz(bench, cfg.limits, args.fuzz_frames, args.seed)),
        "auth": lambda: bench.phase("auth", lambda: run_auth(bench, args.auth_attempts)),
        "floods": lambda: bench.phase("floods", lambda: run_floods(bench, cfg, overrides, args.scale)),
        "text_attacks": lambda: text_attacks(overrides, args.text_attack_s),
        "faults": lambda: bench.phase("faults", lambda: run_faults(bench, cfg, overrides, args.scale)),
        "soak": lambda: bench.phase("soak", lambda: run_soak(bench, args.soak_s, args.slots, args.seed)),
    }
    phases = {}
    try:
        for name in PHASES:
            if name in args.phases:
                phases[name] = await runs[name]()
    finally:
        await server.shutdown(grace_s=1)
        synth.close()
    if "auth" in phases:
        phases["auth"]["key_in_log_lines_all_phases"] = leaks["lines"]
        phases["auth"]["failures"] += bool(leaks["lines"])
    return {
        "frames_fuzzed": phases.get("fuzz", {}).get("frames_fuzzed"),
        "auth_attempts": phases.get("auth", {}).get("auth_attempts"),
        "failures": sum(ph["failures"] for ph in phases.values()),
        "data_lost": sum(ph["data_lost"] for ph in phases.values()),
        "rss_growth_pct": phases.get("soak", {}).get("soak_rss_growth_pct"),
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
            "command": " ".join(["python3 -m", __spec__.name, *sys.argv[1:]]),
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
    parser.add_argument(
        "--text-attack-s", type=float, default=20, help="text attacks: seconds of each of alone, control, attack"
    )
    parser.add_argument("--baseline-s", type=float, default=20, help="good clients alone, for reference TTFA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES), help="run only these, in order")
    parser.add_argument("--out", default="bench/results/reliability.json")
    parser.add_argument("--default-malloc", action="store_true", help=f"run without {', '.join(MALLOC_ENV)}")
    args = parser.parse_args()
    if not args.default_malloc and any(k not in os.environ for k in MALLOC_ENV):  # glibc reads them at start
        os.execve(sys.executable, [sys.executable, "-m", __spec__.name, *sys.argv[1:]], {**MALLOC_ENV, **os.environ})
    result = asyncio.run(main(args))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("categories", "setup")}))
    print(f"wrote {args.out}")
