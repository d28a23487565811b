"""Exhaustion: connection and message floods, slow readers, silent peers, cancel storms, the websockets bounds."""

import asyncio
import socket
import time

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
    config,
    expected,
    good_client,
    idle,
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
