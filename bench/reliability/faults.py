"""Failures that come from outside the protocol.

A request that fails for real (its prompt fits no slot), clients killed with SIGKILL
mid-utterance, SIGTERM of a real `pipecat-orpheus serve` mid-utterance (drain), a server restart
under an `OrpheusClient`, the KV-cache-does-not-fit message.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from bench.reliability.common import (
    AUTH,
    GOOD_TEXT,
    KEY,
    LONG_TEXT,
    POISON,
    Bench,
    Findings,
    free_port,
    guarded,
    http_status,
    idle,
    pack,
    serve_process,
    until,
    utterance,
)
from pipecat_orpheus.config import load_config
from pipecat_orpheus.engine.runner import check_kv_fits
from pipecat_orpheus.errors import ModelLoadError
from pipecat_orpheus.wire import protocol as p
from pipecat_orpheus.wire.client import OrpheusClient
from pipecat_orpheus.wire.server import OrpheusServer

KILLED_CLIENT = Path(__file__).resolve().parent / "killed_client.py"  # speaks, says "audio", waits to die


async def poison(bench: Bench) -> int:
    """A request that fails for real fails alone: Error{bad_request} naming the key, then its stream speaks on.

    1 if all of that held, else 0 (and a failure).
    """
    async with connect(bench.url, additional_headers=AUTH, compression=None) as ws:
        await ws.recv()
        await ws.send(pack(type="Speak", text=POISON, id="bad"))
        error = p.decode_server(await ws.recv())
        if not (
            isinstance(error, p.Error)
            and (error.code, error.id) == ("bad_request", "bad")
            and "engine.max_tokens_per_slot" in error.message
        ):
            bench.fail(f"poison: {error}, not Error{{bad_request}} naming engine.max_tokens_per_slot")
            return 0
        samples, _ = await utterance(ws, "ok")
    if samples != bench.expected:
        bench.data_lost += 1
        bench.fail(f"poison: the next utterance got {samples} samples, expected {bench.expected}")
        return 0
    return 1


async def killed_client(bench: Bench, text: str = LONG_TEXT, engine_alone: bool = False) -> dict:
    """A client process killed with SIGKILL mid-utterance: how soon the server drops its stream (and slot).

    `engine_alone`: nothing else speaks on the engine, so the time until it holds no request is
    the time until the killed client's slot is free (with good clients alongside it is not measured).
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(KILLED_CLIENT), bench.url, text, KEY, stdout=subprocess.PIPE
    )
    try:
        assert (await asyncio.wait_for(proc.stdout.readline(), 60)).strip() == b"audio"
        streams, active = bench.server.open_streams, bench.synth.active_requests
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        await until(lambda: bench.server.open_streams < streams, 30)
        dropped = time.perf_counter() - t0
        freed = None
        if engine_alone:
            await idle(bench.server, bench.synth, 30)
            freed = time.perf_counter() - t0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return {"active_at_kill": active, "stream_dropped_after_s": round(dropped, 3), "slot_freed_after_s": freed}


async def sigterm_drain(findings: Findings, overrides: dict, text: str = LONG_TEXT[:500]) -> dict:
    """SIGTERM to `pipecat-orpheus serve` mid-utterance: /healthz 503 and new streams refused, Done, 1001, exit 0.

    `overrides` must give the utterance time to be still speaking at the signal (and grace to finish).
    """
    port = free_port()
    async with serve_process(overrides, port) as proc:
        async with connect(f"ws://127.0.0.1:{port}/ws", additional_headers=AUTH) as ws:
            await ws.recv()
            await ws.send(pack(type="Speak", text=text, id="u"))
            got = [p.decode_server(await ws.recv())]
            t0 = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            healthz_503 = None
            async with asyncio.timeout(10):
                while await http_status(port, "/healthz") != 503:
                    await asyncio.sleep(0.02)
                healthz_503 = round(time.perf_counter() - t0, 3)
            try:
                await connect(f"ws://127.0.0.1:{port}/ws", additional_headers=AUTH)
                refused = False
            except (InvalidStatus, OSError):
                refused = True  # 503 while draining
            try:
                async for data in ws:
                    got.append(p.decode_server(data))
            except ConnectionClosed:
                pass
        rc = await asyncio.wait_for(proc.wait(), 60)
    out = {
        "first_message_audio": isinstance(next(m for m in got if not isinstance(m, p.Word)), p.Audio),  # words lead
        "healthz_503_after_s": healthz_503,
        "new_stream_refused": refused,
        "done_before_close": isinstance(got[-1], p.Done),
        "close_code": ws.close_code,
        "exit_code": rc,
        "drain_s": round(time.perf_counter() - t0, 2),
    }
    if not (out["first_message_audio"] and refused and out["done_before_close"] and ws.close_code == 1001 and rc == 0):
        findings.fail(f"sigterm: {out}")
    return out


async def restart_under_client(bench: Bench, cfg, rounds: int) -> dict:
    """A remote client's utterance cut by a server restart raises ConnectionError; the next one reconnects."""
    second = OrpheusServer(cfg, bench.synth, host="127.0.0.1", port=0, api_keys=[KEY])
    await second.start()
    port, cut, recovered = second.port, 0, 0
    client = OrpheusClient(f"ws://127.0.0.1:{port}", api_key=KEY, backoff_s=0.05)
    try:
        for _ in range(rounds):
            speech = await client.speak(LONG_TEXT[:600])
            await anext(speech)
            await second.shutdown(grace_s=0)
            try:
                await speech.read_all()
            except ConnectionError:
                cut += 1
            second = OrpheusServer(cfg, bench.synth, host="127.0.0.1", port=port, api_keys=[KEY])
            await second.start()
            recovered += len(await (await client.speak(GOOD_TEXT)).read_all()) == bench.expected
    finally:
        await client.close()
        await second.shutdown()
    if cut != rounds or recovered != rounds:
        bench.fail(f"restart: {cut} cut, {recovered} recovered whole of {rounds}")
    return {"restarts": rounds, "utterances_cut_with_error": cut, "next_utterance_whole": recovered}


def oom_message() -> dict:
    """The keys the KV-cache-does-not-fit error names (it must name all three)."""
    try:
        check_kv_fits(80 * 2**30, 40 * 2**30, load_config().engine)  # an 80 GB card with other work on it
    except ModelLoadError as e:
        keys = ("engine.max_slots", "engine.max_tokens_per_slot", "engine.gpu_memory_fraction")
        return {"names_keys": [k for k in keys if k in str(e)]}
    return {"names_keys": []}


async def run_faults(bench: Bench, cfg, overrides: dict, scale: int) -> dict:
    poisoned = await guarded(bench, "poison", asyncio.gather(*(poison(bench) for _ in range(4 * scale))))
    out = {"poison_failed_alone": sum(poisoned or [])}
    killed = [await guarded(bench, "killed client", killed_client(bench)) for _ in range(3)]
    out["killed_client_dropped_after_s"] = max((k["stream_dropped_after_s"] for k in killed if k), default=None)
    out["restart"] = await guarded(bench, "restart", restart_under_client(bench, cfg, 3 * scale))
    drain = {**overrides, "engine.max_slots": 4, "engine.max_tokens_per_slot": 512}
    out["sigterm"] = s = await guarded(bench, "sigterm", sigterm_drain(bench, drain))
    if s and not s["done_before_close"]:
        bench.data_lost += 1
    out["oom"] = oom_message()
    if len(out["oom"]["names_keys"]) != 3:
        bench.fail(f"oom message: {out['oom']}")
    return out
