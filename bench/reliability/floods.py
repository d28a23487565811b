"""What one client may cost the server, pushed past every limit.

Connections past limits.max_connections, Text/Speak/Marker floods, slow readers, silent peers and
half-open handshakes, cancel storms, rapid connect/disconnect, a ping flood from a peer that never
reads, and shutdowns (in process, and SIGTERM of a real `pipecat-orpheus serve`) with such peers
attached.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import socket
import time

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from bench.reliability.common import (
    AUTH,
    KEY,
    LONG_TEXT,
    Bench,
    Findings,
    client_frame,
    deaf_peer,
    error_logs,
    flood_pings,
    free_port,
    guarded,
    pack,
    rss_mib,
    serve_process,
    small_send_buffer_listener,
    utterance,
)
from pipecat_orpheus.wire import protocol as p
from pipecat_orpheus.wire.server import OrpheusServer


async def connection_flood(bench: Bench, n: int, speakers: int = 8) -> dict:
    """`n` clients at once: each gets Ready or Error{busy} then 1013; `speakers` of the admitted then speak, whole.

    (Not all of them by default: 60 utterances at once are load, and the good clients would queue behind them.)
    """

    async def one():
        try:
            ws = await connect(bench.url, additional_headers=AUTH, compression=None)
        except OSError as e:
            return f"refused: {e}"
        return ws, p.decode_server(await ws.recv())

    got = await asyncio.gather(*(one() for _ in range(n)))
    ready = [g[0] for g in got if isinstance(g, tuple) and isinstance(g[1], p.Ready)]
    busy = [g[0] for g in got if isinstance(g, tuple) and isinstance(g[1], p.Error) and g[1].code == "busy"]
    if len(ready) + len(busy) != n:
        bench.fail(f"connection flood: {len(ready)} ready + {len(busy)} busy of {n}: {got[:3]}")
    busy_closes: dict[str, int] = {}
    for ws in busy:
        try:
            async for _ in ws:
                pass
        except ConnectionClosed:
            pass
        busy_closes[str(ws.close_code)] = busy_closes.get(str(ws.close_code), 0) + 1
    if set(busy_closes) - {"1013"}:
        bench.fail(f"connection flood: the refused ones closed with {busy_closes}, not 1013")
    spoke = await asyncio.gather(*(utterance(ws, 1) for ws in ready[:speakers]))
    whole = sum(samples == bench.expected for samples, _ in spoke)
    if whole != len(spoke):
        bench.data_lost += len(spoke) - whole
        bench.fail(f"connection flood: {whole} of {len(spoke)} admitted clients got a whole utterance")
    await asyncio.gather(*(ws.close() for ws in ready))
    return {"ready": len(ready), "busy": len(busy), "busy_closes": busy_closes, "spoke_whole": f"{whole}/{len(spoke)}"}


async def text_flood(bench: Bench, frames: int) -> dict:
    """Text, Speak, Marker and text frames as fast as they go, then Cancel and Eos: the limits answer, 1000 ends it.

    The Errors it got, by the limit they name (or their code).
    """
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


async def slow_readers(bench: Bench, n: int, timeout_s: float = 120) -> float:
    """`n` clients that speak and never read; seconds until the server has closed all of them."""
    before, conns = set(bench.server._streams), []
    t0 = time.perf_counter()
    for _ in range(n):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", bench.server.port))
        sock.setblocking(False)
        ws = await connect(bench.url, sock=sock, additional_headers=AUTH, max_queue=1, compression=None)
        for i in range(8):
            await ws.send(pack(type="Speak", text=LONG_TEXT[:3000], id=i))
        conns.append(ws)
    ours = set(bench.server._streams) - before
    try:
        async with asyncio.timeout(timeout_s):
            while ours & bench.server._streams:
                await asyncio.sleep(0.05)
    except TimeoutError:
        bench.fail(f"slow readers not closed within {timeout_s} s")
    for ws in conns:
        ws.transport.abort()  # it reads nothing, so it would notice the server's close only by its own ping
    return time.perf_counter() - t0


async def silent_peer(port: int, handshake: bool) -> float:
    """A peer that completes the handshake (or stops halfway) and then says nothing; seconds until it is dropped."""
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
    try:
        async with asyncio.timeout(60):
            while await reader.read(65536):  # Ready and pings we never answer, then EOF
                pass
    except ConnectionResetError:
        pass
    writer.close()
    return time.perf_counter() - t0


async def cancel_storm(bench: Bench, rounds: int, cancels: int) -> int:
    """Speak, then `cancels` Cancels at once, each round; every Cancel answered, no audio or Done after the first.

    Odd rounds cancel by id, even ones everything. The Cancelled replies counted.
    """
    answered = 0
    async with connect(bench.url, additional_headers=AUTH, compression=None) as ws:
        await ws.recv()
        for r in range(rounds):
            await ws.send(pack(type="Speak", text=LONG_TEXT[:600], id=r))
            for _ in range(cancels):
                await ws.send(pack(type="Cancel", id=r if r % 2 else None))
            got: list = []
            while sum(isinstance(m, p.Cancelled) for m in got) < cancels:
                got.append(p.decode_server(await ws.recv()))
            first = next(i for i, m in enumerate(got) if isinstance(m, p.Cancelled))
            late = [m.type for m in got[first:] if isinstance(m, (p.Audio, p.Done)) and m.id == r]
            if late:
                bench.fail(f"cancel storm: {len(late)} {late[0]} of utterance {r} after its Cancelled")
            answered += sum(isinstance(m, p.Cancelled) for m in got)
    return answered


async def rapid(bench: Bench, cycles: int) -> None:
    """Connect and leave at once (every other time after a Speak), `cycles` times."""
    for i in range(cycles):
        ws = await connect(bench.url, additional_headers=AUTH, compression=None)
        if i % 2:
            await ws.recv()
            await ws.send(pack(type="Speak", text="Quick one.", id=i))
        ws.transport.abort()


async def ping_flood(bench: Bench, mib: int, open_first: bool) -> dict:
    """A peer floods pings and reads nothing: how much it sent before the drop, the pong backlog, RSS, ERROR lines.

    `open_first`: once its stream is open; else right after the upgrade request (websockets parses
    frames, and answers pings, before it has sent the 101). The backlog is sampled between 64 KiB
    chunks: the drop empties it, so the largest one is in the server's warning. websockets answers
    each ping with a pong that never waits for the peer to read: without a bound, 64 MiB of pings
    left ~60 MiB of pongs buffered and the connection open for good.
    """
    peak = 0

    def ours():  # the flooder's stream (good clients may come and go alongside)
        return [s for s in bench.server._streams if s.ws.remote_address[1] == sock.getsockname()[1]]

    def probe():
        nonlocal peak
        peak = max([peak, *(s.ws.transport.get_write_buffer_size() for s in ours())])

    with error_logs() as errors, deaf_peer(bench.server.port) as sock:  # reset on the way out if still open
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
    # limits.max_write_buffer_bytes of data + as much in pongs + the pongs of one read (<= 256 KiB)
    if peak > 2**20:
        bench.fail(f"ping flood: {peak} bytes of pongs buffered for a peer that never reads")
    if sent >= mib * 2**20:
        bench.fail(f"ping flood: all {mib} MiB of pings went in; the peer was never dropped")
    if errors:
        bench.fail(f"ping flood: {len(errors)} ERROR log lines, e.g. {errors[0][:200]}")
    return {
        "sent_mib": round(sent / 2**20, 2),
        "peak_write_buffer_kib": round(peak / 1024, 1),
        "rss_growth_mib": round(rss_mib() - rss0, 1),
        "dropped_after_s": round(dropped_after, 2),
        "error_log_lines": len(errors),
    }


async def unread_shutdown(findings: Findings, synth, cfg, grace_s: float = 1, text: str = LONG_TEXT[:600]) -> dict:
    """A server of its own on `synth`, shut down with a deaf listener (write side blocked) and a deaf pinger.

    The listener's close frame can never drain: websockets' own close() waited in drain() for it
    with no timeout, and so did a keepalive ping sent into the blocked write side; shutdown hung
    for as long as the peer stayed. server.ping_timeout_s is set past the run here, so only
    shutdown's own bound (`grace_s` + server.close_timeout_s, from `cfg`) may end the streams.
    """
    server_cfg = dataclasses.replace(cfg.server, ping_timeout_s=600)
    limits = dataclasses.replace(cfg.limits, max_unsent_audio_s=3600, max_write_buffer_bytes=4096)
    server = OrpheusServer(
        dataclasses.replace(cfg, server=server_cfg, limits=limits),
        synth,
        sock=small_send_buffer_listener(),  # the unread audio backs up into the server
        api_keys=[KEY],
    )
    await server.start()
    bound = grace_s + server_cfg.close_timeout_s
    with error_logs() as errors, deaf_peer(server.port) as audio, deaf_peer(server.port) as pinger:
        for i in range(4):
            audio.sendall(client_frame(0x2, pack(type="Speak", text=text, id=i)))
        async with asyncio.timeout(60):
            while not any(s.ws.paused for s in server._streams):  # the listener's write side is blocked
                await asyncio.sleep(0.05)
        await flood_pings(pinger, 16 * 2**20)
        await asyncio.sleep(3 * server_cfg.ping_interval_s)  # keepalive pings go out into the blocked write side
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(bound + 30):
                await server.shutdown(grace_s=grace_s)
        except TimeoutError:
            findings.fail(f"unread shutdown: still not stopped {bound + 30} s after shutdown()")
        took = time.perf_counter() - t0
    if took > bound + 5:  # + slack for a busy machine
        findings.fail(f"unread shutdown: {took:.1f} s, bound {bound} s")
    if errors:
        findings.fail(f"unread shutdown: {len(errors)} ERROR log lines, e.g. {errors[0][:200]}")
    return {"shutdown_s": round(took, 2), "grace_plus_close_s": bound, "error_log_lines": len(errors)}


async def sigterm_deaf_peers(findings: Findings, overrides: dict, grace_s: float = 2, close_s: float = 2) -> dict:
    """SIGTERM of `pipecat-orpheus serve` with a deaf ping flooder and a deaf listener: it ends within grace + close.

    Before the write bound, the flooder's unread pongs blocked the server's close in drain() and
    the process had to be killed; now the flooder is dropped when its replies pass the bound, and
    the listener is closed (aborted) server.close_timeout_s after the grace period.
    """
    port, ping_interval = free_port(), 1
    env = {
        "ORPHEUS_SERVER_PING_INTERVAL_S": str(ping_interval),  # keepalive pings that a blocked write side stalls
        "ORPHEUS_SERVER_PING_TIMEOUT_S": "600",  # longer than the run: only the shutdown bounds may end them
        "ORPHEUS_SERVER_SHUTDOWN_GRACE_S": str(grace_s),
        "ORPHEUS_SERVER_CLOSE_TIMEOUT_S": str(close_s),
        "ORPHEUS_LIMITS_MAX_UNSENT_AUDIO_S": "3600",
    }
    async with serve_process(overrides, port, **env) as proc:
        with deaf_peer(port) as listener, deaf_peer(port) as flooder:
            listener.sendall(client_frame(0x2, pack(type="Speak", text=LONG_TEXT[:600], id="u")))
            await flood_pings(flooder, 16 * 2**20)
            await asyncio.sleep(3 * ping_interval)  # a keepalive ping goes out behind the unread pongs
            t0 = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            rc = await asyncio.wait_for(proc.wait(), 60)
            took = time.perf_counter() - t0
    bound = grace_s + close_s
    if rc != 0 or took > bound + 10:  # + the engine's own shutdown, with slack for a busy machine
        findings.fail(f"sigterm with deaf peers: exit {rc} after {took:.1f} s, bound {bound} s")
    return {"exit_code": rc, "stopped_after_s": round(took, 2), "grace_plus_close_s": bound}


async def run_floods(bench: Bench, cfg, overrides: dict, scale: int) -> dict:
    port, out = bench.server.port, {}
    out["connection_flood"] = await guarded(
        bench, "connection flood", connection_flood(bench, cfg.limits.max_connections + 50)
    )
    floods = [await guarded(bench, "text flood", text_flood(bench, 500 * scale)) for _ in range(4)]
    floods = [f for f in floods if f is not None]
    out["text_flood_errors"] = {k: sum(f.get(k, 0) for f in floods) for k in set().union(*floods)}
    slow = await guarded(bench, "slow readers", slow_readers(bench, 4))
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
    out["unread_shutdown"] = await guarded(bench, "unread shutdown", unread_shutdown(bench, bench.synth, cfg))
    out["sigterm_deaf_peers"] = await guarded(bench, "sigterm deaf peers", sigterm_deaf_peers(bench, overrides))
    return out
