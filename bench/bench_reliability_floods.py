"""Reliability bench, floods phase: what one client may cost the server, pushed past every limit.

Connections past limits.max_connections, Text/Speak/Marker floods, slow readers, silent peers and
half-open handshakes, cancel storms, rapid connect/disconnect, a ping flood from a peer that never
reads, a shutdown with such peers attached, and odd request targets.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time

from bench_reliability_common import (
    AUTH,
    KEY,
    LONG_TEXT,
    UPGRADE,
    Bench,
    client_frame,
    deaf_peer,
    error_logs,
    flood_pings,
    guarded,
    http_status,
    pack,
    rss_mib,
)
from websockets.asyncio.client import connect

from pipecat_orpheus.wire import protocol as p
from pipecat_orpheus.wire.server import OrpheusServer


async def connection_flood(bench: Bench, n: int) -> dict:
    async def one():
        try:
            ws = await connect(bench.url, additional_headers=AUTH, compression=None)
        except OSError as e:
            return f"refused: {e}"
        first = p.decode_server(await ws.recv())
        return ws, first

    got = await asyncio.gather(*(one() for _ in range(n)))
    ready = [g[0] for g in got if isinstance(g, tuple) and isinstance(g[1], p.Ready)]
    busy = sum(isinstance(g, tuple) and isinstance(g[1], p.Error) and g[1].code == "busy" for g in got)
    if len(ready) + busy != n:
        bench.fail(f"connection flood: {len(ready)} ready + {busy} busy of {n}")
    await asyncio.gather(*(ws.close() for ws in ready))
    for g in got:
        if isinstance(g, tuple) and not isinstance(g[1], p.Ready):
            await g[0].close()
    return {"ready": len(ready), "busy": busy}


async def text_flood(bench: Bench, frames: int) -> dict:
    counts: dict[str, int] = {}
    async with connect(bench.url, additional_headers=AUTH, compression=None) as ws:
        await ws.recv()

        async def drain():
            async for data in ws:
                m = p.decode_server(data)
                if isinstance(m, p.Error):
                    limit = m.message.split("limits.")[-1].split()[0] if "limits." in m.message else m.code
                    counts[limit] = counts.get(limit, 0) + 1

        reader = asyncio.create_task(drain())
        for i in range(frames):
            kind = i % 4
            if kind == 0:
                await ws.send(pack(type="Text", text="word " * 40))
            elif kind == 1:
                await ws.send(pack(type="Speak", text=LONG_TEXT[:400], id=i))
            elif kind == 2:
                await ws.send(pack(type="Marker", id=i))
            else:
                await ws.send("more words without an end " * 5)
        await ws.send(pack(type="Cancel"))
        await ws.send(pack(type="Eos"))  # the server closes (1000) once every reply has been sent
        await asyncio.wait_for(reader, 60)
    if ws.close_code != 1000:
        bench.fail(f"text flood: closed with {ws.close_code} {ws.close_reason}")
    return counts


async def slow_readers(bench: Bench, port: int, n: int) -> float:
    """`n` clients that speak and never read; seconds until the server has closed all of them."""
    before, conns = set(bench.server._streams), []
    t0 = time.perf_counter()
    for _ in range(n):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        ws = await connect(bench.url, sock=sock, additional_headers=AUTH, max_queue=1, compression=None)
        for i in range(8):
            await ws.send(pack(type="Speak", text=LONG_TEXT[:3000], id=i))
        conns.append(ws)
    ours = set(bench.server._streams) - before
    try:
        async with asyncio.timeout(120):
            while ours & bench.server._streams:
                await asyncio.sleep(0.05)
    except TimeoutError:
        bench.fail("slow readers not closed within 120 s")
    for ws in conns:
        ws.transport.abort()  # it reads nothing, so it would notice the server's close only by its own ping
    return time.perf_counter() - t0


async def silent_peer(port: int, handshake: bool) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.perf_counter()
    if handshake:
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            + f"kyutai-api-key: {KEY}\r\n".encode()
            + b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
    else:
        writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\n")  # and never the rest
    async with asyncio.timeout(60):
        while await reader.read(65536):  # Ready and pings we never answer, then EOF
            pass
    writer.close()
    return time.perf_counter() - t0


async def cancel_storm(bench: Bench, rounds: int, cancels: int) -> int:
    answered = 0
    async with connect(bench.url, additional_headers=AUTH, compression=None) as ws:
        await ws.recv()
        for r in range(rounds):
            await ws.send(pack(type="Speak", text=LONG_TEXT[:600], id=r))
            for _ in range(cancels):
                await ws.send(pack(type="Cancel", id=r if r % 2 else None))
            seen = 0
            while seen < cancels:
                m = p.decode_server(await ws.recv())
                seen += isinstance(m, p.Cancelled)
            answered += seen
    return answered


async def rapid(bench: Bench, cycles: int) -> None:
    for i in range(cycles):
        ws = await connect(bench.url, additional_headers=AUTH, compression=None)
        if i % 2:
            await ws.recv()
            await ws.send(pack(type="Speak", text="Quick one.", id=i))
        ws.transport.abort()


async def ping_flood(bench: Bench, mib: int, open_first: bool) -> dict:
    """A peer floods pings and reads nothing: how much it sent before the drop, the pong backlog, RSS.

    `open_first`: once its stream is open; else right after the upgrade request (websockets parses
    frames, and answers pings, before it has sent the 101). The backlog is sampled between 64 KiB
    chunks: the drop empties it, so the largest one is in the server's warning.
    """
    peak = 0

    def ours():  # the flooder's stream (the good clients come and go alongside)
        return [s for s in bench.server._streams if s.ws.remote_address[1] == sock.getsockname()[1]]

    def probe():
        nonlocal peak
        peak = max([peak, *(s.ws.transport.get_write_buffer_size() for s in ours())])

    with deaf_peer(bench.server.port) as sock:
        if open_first:
            async with asyncio.timeout(30):
                while not ours():
                    await asyncio.sleep(0.05)
        rss0, t0 = rss_mib(), time.perf_counter()
        sent = await flood_pings(sock, mib * 2**20, probe)
        try:
            async with asyncio.timeout(30):
                while ours():
                    await asyncio.sleep(0.05)
        except TimeoutError:
            bench.fail(f"ping flood: the peer was not dropped within 30 s of {sent / 2**20:.0f} MiB of pings")
        dropped_after = time.perf_counter() - t0
    if peak > 2**20:
        bench.fail(f"ping flood: {peak} bytes of pongs buffered for a peer that never reads")
    return {
        "sent_mib": round(sent / 2**20, 2),
        "peak_write_buffer_kib": round(peak / 1024, 1),
        "rss_growth_mib": round(rss_mib() - rss0, 1),
        "dropped_after_s": round(dropped_after, 2),
    }


async def unread_shutdown(bench: Bench, cfg) -> dict:
    """A second server on the same engine, shut down with a deaf listener (write side blocked) and a deaf pinger.

    server.ping_timeout_s is set past the run, so only shutdown's own bounds (grace + close timeout) may end them.
    """
    server_cfg = dataclasses.replace(cfg.server, ping_timeout_s=600, shutdown_grace_s=1)
    limits = dataclasses.replace(cfg.limits, max_unsent_audio_s=3600, max_write_buffer_bytes=4096)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)  # the unread audio backs up into the server
    server = OrpheusServer(
        dataclasses.replace(cfg, server=server_cfg, limits=limits), bench.synth, sock=listener, api_keys=[KEY]
    )
    await server.start()
    with deaf_peer(server.port) as audio, deaf_peer(server.port) as pinger:
        for i in range(4):
            audio.sendall(client_frame(0x2, pack(type="Speak", text=LONG_TEXT[:600], id=i)))
        async with asyncio.timeout(60):
            while not any(s.ws.paused for s in server._streams):  # the listener's write side is blocked
                await asyncio.sleep(0.05)
        await flood_pings(pinger, 16 * 2**20)
        await asyncio.sleep(3 * server_cfg.ping_interval_s)  # keepalive pings go out into the blocked write side
        t0 = time.perf_counter()
        bound = server_cfg.shutdown_grace_s + server_cfg.close_timeout_s
        try:
            async with asyncio.timeout(bound + 30):
                await server.shutdown()
        except TimeoutError:
            bench.fail(f"unread shutdown: still not stopped {bound + 30} s after shutdown()")
        took = time.perf_counter() - t0
    if took > bound + 5:
        bench.fail(f"unread shutdown: {took:.1f} s, bound {bound} s")
    return {"shutdown_s": round(took, 2), "grace_plus_close_s": bound}


ODD_TARGETS = [  # each must get a 4xx: never a stream, a probe's answer, a 500 or an ERROR log line
    "//[/healthz",
    "//x/ws",
    "//x/metrics",
    "//x/healthz",
    "/healthz?x",
    "/metrics?x",
    "http://h/healthz",
    "http://h/ws",
    "/%2Fhealthz",
    "%2Fws",
    "/ws%2F",
    "/ws/",
    "/healthz#x",
    "*",
    "/" + "a" * 10_000,
]


async def odd_targets(bench: Bench) -> dict:
    statuses: dict[str, int] = {}
    upgrade = [tuple(line.split(": ", 1)) for line in UPGRADE.split("\r\n") if line] + [("kyutai-api-key", KEY)]
    with error_logs() as errors:
        for target in ODD_TARGETS:
            status = await http_status(bench.server.port, target, upgrade)
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            if status is None or not 400 <= status < 500:
                bench.fail(f"odd target {target[:40]!r}: {status}")
    if errors:
        bench.fail(f"odd targets: {len(errors)} ERROR log lines, e.g. {errors[0][:200]}")
    return {"targets": len(ODD_TARGETS), "statuses": statuses, "error_log_lines": len(errors)}


async def run_floods(bench: Bench, cfg, scale: int) -> dict:
    port, out = bench.server.port, {}
    out["connection_flood"] = await guarded(
        bench, "connection flood", connection_flood(bench, cfg.limits.max_connections + 50)
    )
    floods = [await guarded(bench, "text flood", text_flood(bench, 500 * scale)) for _ in range(4)]
    floods = [f for f in floods if f is not None]
    out["text_flood_errors"] = {k: sum(f.get(k, 0) for f in floods) for k in set().union(*floods)}
    slow = await guarded(bench, "slow readers", slow_readers(bench, port, 4))
    out["slow_readers_closed_after_s"] = round(slow, 2) if slow is not None else None
    silent = await guarded(bench, "silent", asyncio.gather(*(silent_peer(port, True) for _ in range(8))))
    half_open = await guarded(bench, "half-open", asyncio.gather(*(silent_peer(port, False) for _ in range(8))))
    out["silent_peer_dropped_after_s"] = round(max(silent), 2) if silent else None
    out["half_open_dropped_after_s"] = round(max(half_open), 2) if half_open else None
    storms = await guarded(bench, "cancels", asyncio.gather(*(cancel_storm(bench, 5 * scale, 50) for _ in range(4))))
    out["cancels_answered"] = sum(storms or [])
    await guarded(bench, "rapid", asyncio.gather(*(rapid(bench, 50 * scale) for _ in range(8))))
    out["rapid_connects"] = 8 * 50 * scale
    for when, open_first in (("open", True), ("handshake", False)):
        flood = await guarded(bench, f"ping flood ({when})", ping_flood(bench, 64 * scale, open_first))
        out[f"ping_flood_{when}"] = flood
    out["unread_shutdown"] = await guarded(bench, "unread shutdown", unread_shutdown(bench, cfg))
    out["odd_targets"] = await guarded(bench, "odd targets", odd_targets(bench))
    return out
