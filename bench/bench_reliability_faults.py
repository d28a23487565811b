"""Reliability bench, faults phase: failures that come from outside the protocol.

A request that fails for real (prompt too long for a slot), clients killed with SIGKILL
mid-utterance, SIGTERM of a real `pipecat-orpheus serve` mid-utterance (drain), a server restart
under an `OrpheusClient`, the KV-cache-does-not-fit message.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from bench_reliability_common import AUTH, KEY, LONG_TEXT, POISON, Bench, guarded, http_status, pack
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from pipecat_orpheus.config import load_config
from pipecat_orpheus.engine.runner import check_kv_fits
from pipecat_orpheus.errors import ModelLoadError
from pipecat_orpheus.wire import protocol as p
from pipecat_orpheus.wire.client import OrpheusClient
from pipecat_orpheus.wire.server import OrpheusServer

KILLED_CLIENT = Path(__file__).resolve().parent.parent / "tests" / "killed_client.py"  # speaks, waits to die


async def killed_client(bench: Bench) -> float:
    """A client process killed with SIGKILL mid-utterance; seconds until the server has dropped its stream."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(KILLED_CLIENT), bench.url, LONG_TEXT, KEY, stdout=subprocess.PIPE
    )
    assert (await asyncio.wait_for(proc.stdout.readline(), 60)).strip() == b"audio"
    streams = bench.server.open_streams
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    async with asyncio.timeout(30):
        while bench.server.open_streams >= streams:
            await asyncio.sleep(0.01)
    return time.perf_counter() - t0


async def poison(bench: Bench) -> int:
    """A request that fails for real fails alone: Error{internal} naming the key, then the stream goes on."""
    async with connect(bench.url, additional_headers=AUTH, compression=None) as ws:
        await ws.recv()
        await ws.send(pack(type="Speak", text=POISON, id="bad"))
        await ws.send(pack(type="Speak", text="Still fine.", id="ok"))
        got = []
        while not (got and isinstance(got[-1], p.Done)):
            got.append(p.decode_server(await ws.recv()))
    errors = [m for m in got if isinstance(m, p.Error)]
    if not (errors and errors[0].id == "bad" and "engine.max_tokens_per_slot" in errors[0].message):
        bench.fail(f"poison: {errors}")
    return len(errors)


async def sigterm_drain(model_dir: Path, backend: str) -> dict:
    """`pipecat-orpheus serve` in a subprocess, SIGTERM mid-utterance: the utterance finishes, then 1001."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, ORPHEUS_ENGINE_BACKEND=backend, ORPHEUS_SAMPLING_MAX_TOKENS="70")
    env.update(ORPHEUS_ENGINE_MAX_SLOTS="4", ORPHEUS_ENGINE_MAX_TOKENS_PER_SLOT="512", ORPHEUS_API_KEYS=KEY)
    cmd = [sys.executable, "-m", "pipecat_orpheus.cli", "serve", "--model", str(model_dir / "llm")]
    cmd += ["--codec", str(model_dir / "snac"), "--device", "cpu", "--port", str(port)]
    proc = await asyncio.create_subprocess_exec(*cmd, env=env, stderr=subprocess.DEVNULL)
    async with asyncio.timeout(180):
        while True:
            try:
                if await http_status(port, "/healthz") == 200:
                    break
            except OSError:
                pass
            await asyncio.sleep(0.2)
    async with connect(f"ws://127.0.0.1:{port}/ws", additional_headers=AUTH) as ws:
        await ws.recv()
        await ws.send(pack(type="Speak", text=LONG_TEXT[:500], id="u"))
        got = [p.decode_server(await ws.recv())]
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        try:
            async for data in ws:
                got.append(p.decode_server(data))
        except ConnectionClosed:
            pass
    rc = await asyncio.wait_for(proc.wait(), 60)
    return {
        "done_before_close": any(isinstance(m, p.Done) for m in got),
        "close_code": ws.close_code,
        "exit_code": rc,
        "drain_s": round(time.perf_counter() - t0, 2),
    }


async def restart_under_client(bench: Bench, cfg, rounds: int) -> dict:
    """A remote client's utterance cut by a server restart raises ConnectionError; the next one reconnects."""
    second = OrpheusServer(cfg, bench.synth, host="127.0.0.1", port=0, api_keys=[KEY])
    await second.start()
    port, cut, recovered = second.port, 0, 0
    client = OrpheusClient(f"ws://127.0.0.1:{port}", api_key=KEY, backoff_s=0.05)
    for _ in range(rounds):
        utterance = await client.speak(LONG_TEXT[:600])
        await anext(utterance)
        await second.shutdown(grace_s=0)
        try:
            await utterance.read_all()
        except ConnectionError:
            cut += 1
        second = OrpheusServer(cfg, bench.synth, host="127.0.0.1", port=port, api_keys=[KEY])
        await second.start()
        recovered += len(await (await client.speak("Back again.")).read_all()) > 0
    await client.close()
    await second.shutdown()
    if cut != rounds or recovered != rounds:
        bench.fail(f"restart: {cut} cut, {recovered} recovered of {rounds}")
    return {"restarts": rounds, "utterances_cut_with_error": cut, "next_utterance_ok": recovered}


def oom_message() -> dict:
    try:
        check_kv_fits(80 * 2**30, 40 * 2**30, load_config().engine)  # an H100 with other work on it
    except ModelLoadError as e:
        keys = [
            k for k in ("engine.max_slots", "engine.max_tokens_per_slot", "engine.gpu_memory_fraction") if k in str(e)
        ]
        return {"names_keys": keys}
    return {"names_keys": []}


async def run_faults(bench: Bench, cfg, model_dir: Path, scale: int) -> dict:
    poisoned = await guarded(bench, "poison", asyncio.gather(*(poison(bench) for _ in range(4 * scale))))
    out = {"poison_errors": sum(poisoned or [])}
    killed = [await guarded(bench, "killed client", killed_client(bench)) for _ in range(3)]
    out["killed_client_dropped_after_s"] = round(max((k for k in killed if k is not None), default=-1), 3)
    out["restart"] = await guarded(bench, "restart", restart_under_client(bench, cfg, 3 * scale))
    out["sigterm"] = s = await guarded(bench, "sigterm", sigterm_drain(model_dir, cfg.engine.backend))
    if s and not (s["done_before_close"] and s["close_code"] == 1001 and s["exit_code"] == 0):
        bench.data_lost += not s["done_before_close"]
        bench.fail(f"sigterm: {s}")
    out["oom"] = oom_message()
    if len(out["oom"]["names_keys"]) != 3:
        bench.fail(f"oom message: {out['oom']}")
    return out
