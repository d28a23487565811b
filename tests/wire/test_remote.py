"""remote.py: a server as a Synthesizer, against the real server on loopback (tiny real-format model)."""

import asyncio
import socket

import numpy as np
import pytest

from pipecat_orpheus.engine.request import SamplingParams
from pipecat_orpheus.errors import EngineClosed, ProtocolError
from pipecat_orpheus.format import SAMPLES_PER_FRAME
from pipecat_orpheus.wire.client import OrpheusClient
from pipecat_orpheus.wire.remote import RemoteSynthesizer
from pipecat_orpheus.wire.server import serve
from tests.helpers import LONG_TEXT, until, with_


async def test_streams_like_the_local_synthesizer(config, synth):
    """submit() yields float32 24 kHz chunks of the same seeded audio the shared synthesizer makes."""
    seeded = with_(config, sampling={"seed": 7})
    async with serve(seeded, synth, port=0) as server:
        remote = RemoteSynthesizer(OrpheusClient(server.url, format="PcmMessagePack"))
        try:
            heard = await _read(remote.submit("Hello there.", voice="leo"))
            sampling = SamplingParams.from_config(seeded.sampling)
            local = await synth.submit("Hello there.", voice="leo", sampling=sampling).read_all()
            assert heard.dtype == np.float32 and np.array_equal(heard, local)
            assert remote.active_requests == 0
        finally:
            await remote.aclose()


async def test_cancel_mid_stream_frees_the_server_keeps_the_connection(config, synth):
    """cancel() ends iteration at once; the server frees the request while the connection stays open."""
    async with serve(config, synth, port=0) as server:
        remote = RemoteSynthesizer(OrpheusClient(server.url))
        try:
            stream = remote.submit(LONG_TEXT)
            await anext(stream)
            stream.cancel()
            with pytest.raises(StopAsyncIteration):
                await anext(stream)
            assert stream.cancelled and remote.active_requests == 0
            await until(lambda: synth.active_requests == 0)
            assert server.open_streams == 1 and remote.client.connected
            assert len(await _read(remote.submit("Next."))) > 0
        finally:
            await remote.aclose()


async def test_cancel_before_reading_sends_nothing(config, synth):
    """A stream cancelled before its first read never reaches the server."""
    async with serve(config, synth, port=0) as server:
        remote = RemoteSynthesizer(OrpheusClient(server.url))
        try:
            await remote.connect()
            stream = remote.submit(LONG_TEXT)
            stream.cancel()
            assert len(await _read(stream)) == 0
            await asyncio.sleep(0.2)
            assert synth.active_requests == 0 and synth.queued_requests == 0
        finally:
            await remote.aclose()


async def test_refusal_raises_and_closed_refuses(config, synth):
    """A server Error for the utterance raises from the stream; a closed synthesizer refuses at submit."""
    async with serve(config, synth, port=0) as server:
        remote = RemoteSynthesizer(OrpheusClient(server.url))
        with pytest.raises(ProtocolError, match="unknown voice"):
            await _read(remote.submit("Hi.", voice="nobody"))
        await remote.aclose()
        with pytest.raises(EngineClosed):
            remote.submit("Hi.")


async def test_sampling_is_sent_with_the_utterance(config, synth):
    """submit(sampling=) reaches the server as the utterance's own: max_tokens 7 is one frame of audio."""
    async with serve(config, synth, port=0) as server:
        remote = RemoteSynthesizer(OrpheusClient(server.url))
        try:
            heard = await _read(remote.submit("Hello there.", sampling=SamplingParams(max_tokens=7)))
            assert len(heard) == SAMPLES_PER_FRAME
        finally:
            await remote.aclose()


async def test_connection_is_kept_open_with_events(config, synth):
    """start() connects; a server restart is seen (disconnected), outlived (reconnected) and speaks again."""
    events = []

    async def on_event(name, detail):
        events.append(name)

    async with serve(config, synth, host="127.0.0.1", port=0) as server:
        port = server.port
        remote = RemoteSynthesizer(OrpheusClient(server.url, backoff_s=0.05, max_backoff_s=0.2), on_event=on_event)
        await remote.start()
        assert events == ["connected"] and remote.client.ready.voices
    try:
        await until(lambda: "disconnected" in events)
        with pytest.raises(ConnectionError):  # the server is away: the utterance fails, and at once
            await _read(remote.submit("Anyone there?"))
        await until(lambda: "connection_error" in events[2:])
        async with serve(config, synth, host="127.0.0.1", port=port):
            await until(lambda: events.count("connected") == 2, timeout=10)
            assert len(await _read(remote.submit("Back."))) > 0
    finally:
        await remote.aclose()
    assert events[:2] == ["connected", "disconnected"] and events[-2:] == ["connected", "disconnected"]


async def test_server_down_fails_fast_without_retries(config):
    """With no server, start() and each utterance make one attempt (not the client's retries) and raise."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    errors = []

    async def on_event(name, detail):
        errors.append(detail)

    # Retries would sleep 30 s each (backoff_s): one attempt per call is what keeps this test quick.
    remote = RemoteSynthesizer(OrpheusClient(f"ws://127.0.0.1:{port}", backoff_s=30), on_event=on_event)
    try:
        with pytest.raises(ConnectionError):
            await remote.start()
        async with asyncio.timeout(10):
            for _ in range(3):
                with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}"):
                    await _read(remote.submit("Hello?"))
        assert len(errors) == 4 and all(isinstance(e, ConnectionError) for e in errors)
    finally:
        await remote.aclose()


async def _read(stream) -> np.ndarray:
    chunks = [chunk async for chunk in stream]
    await stream.aclose()
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
