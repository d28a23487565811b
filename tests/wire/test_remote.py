"""remote.py: a server as a Synthesizer, against the real server on loopback (tiny real-format model)."""

import asyncio

import numpy as np
import pytest

from pipecat_orpheus.engine.request import SamplingParams
from pipecat_orpheus.errors import EngineClosed, ProtocolError
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


async def _read(stream) -> np.ndarray:
    chunks = [chunk async for chunk in stream]
    await stream.aclose()
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
