"""Exhaustion: connection, message and ping floods, slow and deaf readers, silent peers, cancel storms, the bounds."""

import asyncio
import signal
import socket
import time

import pytest
from websockets.asyncio.client import connect

from pipecat_orpheus.config import LimitsConfig, VoiceConfig
from pipecat_orpheus.wire import protocol as p
from pipecat_orpheus.wire.server import serve
from pipecat_orpheus.wire.session import Abort, Session
from tests.helpers import messages, pack, until, with_
from tests.reliability_helpers import (  # noqa: F401 (fixtures)
    KEY,
    LONG,
    TEXT,
    UPGRADE,
    client_frame,
    config,
    deaf_peer,
    error_logs,
    expected,
    flood_pings,
    free_port,
    good_client,
    idle,
    serve_process,
    synth,
    utterance,
)


async def test_connection_flood_gets_busy_and_the_server_goes_on(config, synth):
    """Past limits.max_connections every extra client gets Error{busy} and 1013; the admitted ones still speak."""
    async with serve(with_(config, limits={"max_connections": 4}), synth, port=0, api_keys=[]) as server:

        async def one():
            ws = await connect(server.url)
            return ws, p.decode_server(await ws.recv())

        got = await asyncio.gather(*(one() for _ in range(20)))
        ready = [ws for ws, m in got if m == p.Ready()]
        busy = [ws for ws, m in got if isinstance(m, p.Error) and m.code == "busy"]
        assert len(ready) == 4 and len(busy) == 16
        for ws in busy:
            assert (await messages(ws))[1] == 1013
        assert [(await utterance(ws, 1))[0] > 0 for ws in ready] == [True] * 4
        await asyncio.gather(*(ws.close() for ws in ready))
        await idle(server, synth)


async def test_floods_slow_and_silent_peers_do_not_starve_a_good_client(config, synth, expected):
    """Floods, slow readers, silent peers, cancel storms and churn at once: a good client still gets all its audio."""
    cfg = with_(
        config,
        server={"ping_interval_s": 0.2, "ping_timeout_s": 0.5, "close_timeout_s": 0.5},
        limits={"max_unsent_audio_s": 0.3},
    )
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)  # a slow reader's backlog reaches the server
    async with serve(cfg, synth, sock=listener, api_keys=[KEY]) as server:
        auth = {"kyutai-api-key": KEY}

        async def flooder():
            async with connect(server.url, additional_headers=auth) as ws:
                await ws.recv()
                for i in range(300):
                    await ws.send([pack(type="Text", text="word " * 50), pack(type="Speak", text=LONG, id=i)][i % 2])
                    await ws.send(pack(type="Marker", id=i))
                await ws.send(pack(type="Cancel"))
                await ws.send(pack(type="Eos"))
                got, code = await messages(ws)
            limits = {m.message.split("limits.")[1].split()[0] for m in got if isinstance(m, p.Error)}
            assert code == 1000 and limits == {"max_buffered_chars", "max_queued_utterances"}

        async def slow_reader():
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", server.port))
            sock.setblocking(False)
            ws = await connect(server.url, sock=sock, additional_headers=auth, max_queue=1)
            for i in range(8):
                await ws.send(pack(type="Speak", text=LONG, id=i))
            return ws

        async def silent_peer():
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(f"GET /ws HTTP/1.1\r\nHost: x\r\n{UPGRADE}kyutai-api-key: {KEY}\r\n\r\n".encode())
            t0 = time.monotonic()
            while await reader.read(65536):  # Ready, then pings never answered, then EOF
                pass
            writer.close()
            return time.monotonic() - t0

        async def cancel_storm():
            async with connect(server.url, additional_headers=auth) as ws:
                await ws.recv()
                await ws.send(pack(type="Speak", text=LONG, id="c"))
                for _ in range(200):
                    await ws.send(pack(type="Cancel", id="c"))
                got = [p.decode_server(await ws.recv())]
                while sum(isinstance(m, p.Cancelled) for m in got) < 200:
                    got.append(p.decode_server(await ws.recv()))
                first = got.index(p.Cancelled("c"))
                assert not [m for m in got[first:] if isinstance(m, (p.Audio, p.Done))]

        async def churn():
            for i in range(40):
                ws = await connect(server.url, additional_headers=auth)
                if i % 2:
                    await ws.recv()
                    await ws.send(pack(type="Speak", text=TEXT, id=i))
                ws.transport.abort()

        slow = await asyncio.gather(*(slow_reader() for _ in range(2)))
        results = await asyncio.gather(
            good_client(server.url, 4),
            *(flooder() for _ in range(2)),
            *(silent_peer() for _ in range(3)),
            *(cancel_storm() for _ in range(2)),
            churn(),
        )
        assert results[0] == [expected] * 4  # every sample of every utterance
        assert all(0.3 < t < 5 for t in results[3:6])  # silent peers dropped after the ping timeout
        await until(lambda: server.open_streams == 0, 30)  # slow readers too, closed at the buffer bound
        for ws in slow:
            ws.transport.abort()
        await idle(server, synth)


def test_unread_replies_are_bounded():
    """Unread replies past limits.max_unsent_messages close the client; waiting Markers are capped too."""
    session = Session(
        limits=LimitsConfig(max_unsent_messages=50, max_queued_utterances=3),
        voices=VoiceConfig(),
        voice="tara",
        max_chars_per_piece=100,
    )
    session.start()
    session.receive(p.Speak("A long one.", id="a"))
    for i in range(5):
        session.receive(p.Marker(i))
    errors = [o.message for o in session.outbox if isinstance(o.message, p.Error)]
    assert len(errors) == 2 and all("limits.max_queued_utterances" in e.message for e in errors)
    for _ in range(100):
        session.receive(p.Cancel("zz"))
    assert session.closed and len(session.outbox) == 1 and "limits.max_unsent_messages" in session.pop().message
    assert any(isinstance(a, Abort) for a in session.take_actions())


async def test_websocket_buffers_and_handshake_timeout_come_from_config(config, synth):
    """limits.max_incoming_messages, max_write_buffer_bytes and handshake_timeout_s reach each real connection."""
    limits = {"max_incoming_messages": 3, "max_write_buffer_bytes": 4096, "handshake_timeout_s": 0.3}
    async with serve(with_(config, limits=limits), synth, port=0, api_keys=[]) as server:
        async with connect(server.url) as ws:
            assert p.decode_server(await ws.recv()) == p.Ready()
            (stream,) = server._streams
            assert stream.ws.recv_messages.high == 3  # websockets stops reading the socket past 3 queued frames
            assert stream.ws.transport.get_write_buffer_limits()[1] == 4096  # (low, high): a send waits past it
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\n")  # and never the rest of the handshake
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(5):
                assert await reader.read() == b""
        except ConnectionResetError:
            pass
        writer.close()
        assert time.monotonic() - t0 < 2  # websockets' default would keep it 10 s


def small_send_buffer_listener() -> socket.socket:
    """A listener whose accepted sockets have a small kernel send buffer (Linux autotunes loopback's to MiBs).

    What a peer does not read then piles up in the server's own write buffer, where a test can see it.
    """
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    return listener


@pytest.mark.parametrize("open_first", [True, False], ids=["open", "handshake"])
async def test_ping_flood_from_a_peer_that_never_reads_is_dropped(config, synth, expected, open_first):
    """A peer that floods pings and reads nothing is dropped at once, the server's write buffer bounded.

    websockets answers each ping with a pong that never waits for the peer to read: without the
    bound, 64 MiB of pings left ~60 MiB of pongs buffered and the connection open for good. It does
    so during the handshake too (frames are parsed right after the request), where the pongs went
    out before the 101 and the handshake then waited in drain() until limits.handshake_timeout_s.
    Here server.ping_timeout_s is the default 30 s, so the drop is the bound's, not the keepalive's.
    """
    flood = 64 * 2**20
    cfg = with_(config, limits={"handshake_timeout_s": 60})  # longer than the test: the drop is the bound's
    async with serve(cfg, synth, sock=small_send_buffer_listener(), api_keys=[]) as server:
        peak = 0

        def probe():
            nonlocal peak
            peak = max([peak, *(s.ws.transport.get_write_buffer_size() for s in server._streams)])

        with error_logs() as errors, deaf_peer(server.port) as sock:  # reset on the way out if still open
            if open_first:
                await until(lambda: server.open_streams == 1, 10)
            t0 = time.monotonic()
            sent = await flood_pings(sock, flood, probe)
            await until(lambda: server.open_streams == 0, 10)
            dropped_after = time.monotonic() - t0
        assert sent < flood // 4  # the server reset it long before the end
        # limits.max_write_buffer_bytes (32 KiB) of data + as much in pongs + the pongs of one read (<= 256 KiB)
        assert peak < 2**20
        assert dropped_after < 10 < config.server.ping_timeout_s
        assert not errors
        assert await good_client(server.url, 1) == [expected]
        await idle(server, synth)


async def test_shutdown_does_not_wait_on_a_peer_that_never_reads(config, synth):
    """Shutdown closes a stream whose unread audio blocks the write side within server.close_timeout_s.

    Its close frame can never drain: websockets' own close() waited in drain() for it with no
    timeout, and so did a keepalive ping sent into the blocked write side (which would otherwise
    have aborted the connection at the close deadline): shutdown hung for as long as the peer stayed.
    """
    ping_interval = 0.5
    cfg = with_(
        config,
        # only shutdown's own bound may end it (server.ping_timeout_s is longer than the test)
        server={"ping_interval_s": ping_interval, "ping_timeout_s": 600, "close_timeout_s": 1},
        sampling={"max_tokens": 300},
        limits={"max_unsent_audio_s": 3600, "max_write_buffer_bytes": 4096},
    )
    async with serve(cfg, synth, sock=small_send_buffer_listener(), api_keys=[]) as server:
        with error_logs() as errors, deaf_peer(server.port) as sock:
            for i in range(4):
                sock.sendall(client_frame(0x2, pack(type="Speak", text=TEXT, id=i)))
            await until(lambda: server.open_streams == 1, 10)
            (stream,) = server._streams
            await until(lambda: stream.ws.paused, 60)  # the server's write side is blocked
            await asyncio.sleep(3 * ping_interval)  # a keepalive ping now waits in drain() too
            t0 = time.monotonic()
            async with asyncio.timeout(30):
                await server.shutdown(grace_s=0.5)
            took = time.monotonic() - t0
    assert took < 0.5 + cfg.server.close_timeout_s + 5  # grace + close timeout + slack for a busy machine
    assert not errors
    await until(lambda: synth.active_requests == 0 and synth.queued_requests == 0, 10)


async def test_sigterm_with_peers_that_never_read_attached(tiny_model_dir):
    """SIGTERM of `pipecat-orpheus serve` with a deaf ping flooder and a deaf listener ends within grace + close.

    Before the write bound, the flooder's unread pongs blocked the server's close in drain() and
    the process had to be killed; now it is dropped when its replies pass the bound, and the
    listener is closed (aborted) server.close_timeout_s after the grace period.
    """
    port, grace, close, ping_interval = free_port(), 2, 2, 1
    env = {
        "ORPHEUS_SERVER_PING_INTERVAL_S": str(ping_interval),  # keepalive pings that a blocked write side stalls
        "ORPHEUS_SERVER_PING_TIMEOUT_S": "600",  # longer than the test: only the shutdown bounds may end them
        "ORPHEUS_SERVER_SHUTDOWN_GRACE_S": str(grace),
        "ORPHEUS_SERVER_CLOSE_TIMEOUT_S": str(close),
        "ORPHEUS_LIMITS_MAX_UNSENT_AUDIO_S": "3600",
    }
    async with serve_process(tiny_model_dir, port, **env) as proc:
        with deaf_peer(port) as listener, deaf_peer(port) as flooder:
            listener.sendall(client_frame(0x2, pack(type="Speak", text=LONG, id="u")))
            await flood_pings(flooder, 16 * 2**20)
            await asyncio.sleep(3 * ping_interval)  # a keepalive ping goes out behind the unread pongs
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 60) == 0
            took = time.monotonic() - t0
    assert took < grace + close + 10  # + the engine's own shutdown, with slack for a busy machine
