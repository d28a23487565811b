"""Exhaustion: connection, message and ping floods, slow and deaf readers, silent peers, cancel storms, the bounds."""

import asyncio
import time

import pytest
from websockets.asyncio.client import connect

from bench.reliability.common import KEY, Bench, Findings, idle, small_send_buffer_listener, until
from bench.reliability.floods import (
    cancel_storm,
    connection_flood,
    ping_flood,
    rapid,
    sigterm_deaf_peers,
    silent_peer,
    slow_readers,
    text_flood,
    unread_shutdown,
)
from pipecat_orpheus.config import LimitsConfig, VoiceConfig
from pipecat_orpheus.wire import protocol as p
from pipecat_orpheus.wire.server import serve
from pipecat_orpheus.wire.session import Abort, Session
from tests.helpers import with_
from tests.reliability_helpers import config, expected, synth, tiny_overrides  # noqa: F401 (fixtures)


async def test_connection_flood_gets_busy_and_the_server_goes_on(config, synth, expected):
    """Past limits.max_connections every extra client gets Error{busy} and 1013; the admitted ones still speak whole."""
    async with serve(with_(config, limits={"max_connections": 4}), synth, port=0, api_keys=[KEY]) as server:
        bench = Bench(server, synth, expected)
        result = await connection_flood(bench, 20, speakers=4)
        assert not bench.failures, bench.failures
        assert result == {"ready": 4, "busy": 16, "busy_closes": {"1013": 16}, "spoke_whole": "4/4"}
        await idle(server, synth)


async def test_floods_slow_and_silent_peers_do_not_starve_a_good_client(config, synth, expected):
    """Floods, slow readers, silent peers, cancel storms and churn at once: a good client still gets all its audio."""
    cfg = with_(
        config,
        server={"ping_interval_s": 0.2, "ping_timeout_s": 0.5, "close_timeout_s": 0.5},
        limits={"max_unsent_audio_s": 0.3},
    )
    async with serve(cfg, synth, sock=small_send_buffer_listener(), api_keys=[KEY]) as server:
        bench = Bench(server, synth, expected)
        results = await asyncio.gather(
            bench.speak(4),
            *(text_flood(bench, 600) for _ in range(2)),
            slow_readers(bench, 2, timeout_s=30),  # closed at the unsent-audio bound
            *(silent_peer(server.port, handshake=True) for _ in range(3)),
            *(cancel_storm(bench, rounds=2, cancels=200) for _ in range(2)),
            rapid(bench, 40),
        )
        assert not bench.failures, bench.failures  # text floods end with 1000, no audio after a Cancelled
        assert results[0] == [expected] * 4  # every sample of every utterance
        for errors in results[1:3]:
            assert set(errors) == {"max_buffered_chars", "max_queued_utterances"}, errors
        assert all(0.3 < t < 5 for t in results[4:7])  # silent peers dropped after the ping timeout
        assert results[7:9] == [400, 400]  # every Cancel answered
        await until(lambda: server.open_streams == 0, 30)
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
            assert isinstance(p.decode_server(await ws.recv()), p.Ready)
            (stream,) = server._streams
            assert stream.ws.recv_messages.high == 3  # websockets stops reading the socket past 3 queued frames
            assert stream.ws.transport.get_write_buffer_limits()[1] == 4096  # (low, high): a send waits past it
        t0 = time.monotonic()
        await silent_peer(server.port, handshake=False)  # a request that never ends
        assert time.monotonic() - t0 < 2  # websockets' default would keep it 10 s


@pytest.mark.parametrize("open_first", [True, False], ids=["open", "handshake"])
async def test_ping_flood_from_a_peer_that_never_reads_is_dropped(config, synth, expected, open_first):
    """A peer that floods pings and reads nothing is dropped at once, the server's write buffer bounded.

    websockets answers each ping with a pong that never waits for the peer to read: without the
    bound, 64 MiB of pings left ~60 MiB of pongs buffered and the connection open for good. It does
    so during the handshake too (frames are parsed right after the request), where the pongs went
    out before the 101 and the handshake then waited in drain() until limits.handshake_timeout_s.
    Here server.ping_timeout_s is the default 30 s, so the drop is the bound's, not the keepalive's.
    """
    cfg = with_(config, limits={"handshake_timeout_s": 60})  # longer than the test: the drop is the bound's
    async with serve(cfg, synth, sock=small_send_buffer_listener(), api_keys=[KEY]) as server:
        bench = Bench(server, synth, expected)
        result = await ping_flood(bench, 64, open_first)
        assert not bench.failures, bench.failures  # the write buffer stayed under 1 MiB, no ERROR line
        assert result["sent_mib"] < 16  # the server reset it long before the end
        assert result["dropped_after_s"] < 10 < config.server.ping_timeout_s
        assert await bench.speak(1) == [expected]
        await idle(server, synth)


async def test_shutdown_does_not_wait_on_peers_that_never_read(config, synth):
    """Shutdown closes a stream whose unread audio blocks the write side, and a deaf pinger's, within grace + close.

    Its close frame can never drain: websockets' own close() waited in drain() for it with no
    timeout, and so did a keepalive ping sent into the blocked write side: shutdown hung for as
    long as the peer stayed.
    """
    cfg = with_(config, server={"ping_interval_s": 0.5, "close_timeout_s": 1}, sampling={"max_tokens": 300})
    findings = Findings()
    result = await unread_shutdown(findings, synth, cfg, grace_s=0.5)
    assert not findings.failures, findings.failures  # within grace + close + 5 s of slack, no ERROR line
    assert result["shutdown_s"] < 0.5 + 1 + 5
    await until(lambda: synth.active_requests == 0 and synth.queued_requests == 0, 10)


async def test_sigterm_with_peers_that_never_read_attached(tiny_model_dir):
    """SIGTERM of `pipecat-orpheus serve` with a deaf ping flooder and a deaf listener ends within grace + close."""
    findings = Findings()
    result = await sigterm_deaf_peers(findings, tiny_overrides(tiny_model_dir))
    assert not findings.failures, findings.failures
    assert result["exit_code"] == 0 and result["stopped_after_s"] < result["grace_plus_close_s"] + 10
