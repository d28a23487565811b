"""client.py against the real server on loopback, with the tiny real-format model behind it."""

import asyncio
import socket

import numpy as np
import pytest

from pipecat_orpheus.errors import AuthError, EngineBusy, ProtocolError
from pipecat_orpheus.format import SAMPLES_PER_FRAME
from pipecat_orpheus.wire.client import OrpheusClient, _stream_url
from pipecat_orpheus.wire.server import serve
from tests.helpers import LONG_TEXT, until, with_


def test_url_gets_path_and_query():
    """http(s) becomes ws(s), the default path is added, and format/voice go in the query."""
    assert _stream_url("https://x.modal.run", voice="leo", format="PcmMessagePack") == (
        "wss://x.modal.run/api/tts_streaming?format=PcmMessagePack&voice=leo"
    )
    assert _stream_url("ws://h:1/ws", voice=None, format="Pcm16MessagePack") == "ws://h:1/ws?format=Pcm16MessagePack"
    with pytest.raises(ValueError, match="ws://"):
        _stream_url("ftp://h", voice=None, format="PcmMessagePack")


@pytest.mark.parametrize("fmt", ["Pcm16MessagePack", "PcmMessagePack"])
async def test_speak_streams_audio_and_words(config, synth, fmt):
    """speak() yields float32 audio until Done, with the utterance's word timings."""
    async with serve(config, synth, port=0) as server, OrpheusClient(server.url, format=fmt) as client:
        first = await client.speak("Hello there.", voice="leo")
        second = await client.speak("Again.", id="two")
        a, b = await first.read_all(), await second.read_all()
        assert a.dtype == np.float32 and len(a) % SAMPLES_PER_FRAME == 0 and len(b) > 0
        assert [w for w, _ in first.word_times()] == ["Hello", "there."] and first.word_times()[0][1] == 0.0
        assert second.start_s == pytest.approx(len(a) / 24000) and second.id == "two"
        await client.marker()  # returns once everything before it has been sent


async def test_ready_and_per_utterance_sampling(config, synth):
    """`ready` holds the server's voices and sampling; speak(sampling=) is that utterance's own."""
    async with serve(config, synth, port=0) as server, OrpheusClient(server.url) as client:
        assert client.ready.voices == list(config.voices.available) and client.ready.default_voice == "tara"
        assert client.ready.sampling["max_tokens"] == config.sampling.max_tokens
        one_frame = await client.speak("Hi.", sampling={"max_tokens": 7, "temperature": 0.9})
        assert len(await one_frame.read_all()) == SAMPLES_PER_FRAME


async def test_cancel_ends_the_utterance(config, synth):
    """cancel(id) waits for Cancelled and ends that utterance's iteration with cancelled=True."""
    async with serve(config, synth, port=0) as server, OrpheusClient(server.url) as client:
        long = await client.speak(LONG_TEXT)
        await anext(long)
        await client.cancel(long.id)
        rest = await long.read_all()
        assert long.cancelled and len(rest) < SAMPLES_PER_FRAME * 20
        after = await client.speak("Next.")
        assert len(await after.read_all()) > 0
        await until(lambda: synth.active_requests == 0)


async def test_bad_utterance_raises_protocol_error(config, synth):
    """A server Error for one utterance (unknown voice) raises from its iterator; the connection goes on."""
    async with serve(config, synth, port=0) as server, OrpheusClient(server.url) as client:
        bad = await client.speak("Hi.", voice="nobody")
        with pytest.raises(ProtocolError, match="unknown voice"):
            await bad.read_all()
        assert len(await (await client.speak("Hi.")).read_all()) > 0


async def test_send_text_kyutai_style(config, synth):
    """send_text()/eos() stream words; stream() ends when the server closes normally."""
    async with serve(config, synth, port=0) as server:
        client = OrpheusClient(server.url)
        for word in "Hi there. Bye".split():
            await client.send_text(word)
        await client.eos()
        stream = client.stream()
        assert len(await stream.read_all()) > 0 and [w.text for w in stream.words] == ["Hi", "there.", "Bye"]
        await client.close()


async def test_auth_error_on_401(config, synth):
    """A missing or wrong key raises AuthError at once (no retries); the right key connects."""
    async with serve(config, synth, port=0, api_keys=["k"]) as server:
        for key in (None, "wrong"):
            with pytest.raises(AuthError, match="401"):
                await OrpheusClient(server.url, api_key=key, max_retries=5, backoff_s=10).connect()
        async with OrpheusClient(server.url, api_key="k") as client:
            assert client.connected


async def test_busy_server_raises_engine_busy_then_retries(config, synth):
    """At capacity connect() raises EngineBusy; with retries it gets in once a place frees up."""
    async with serve(with_(config, limits={"max_connections": 1}), synth, port=0) as server:
        holder = OrpheusClient(server.url)
        await holder.connect()
        with pytest.raises(EngineBusy, match="max_connections"):
            await OrpheusClient(server.url, max_retries=0).connect()
        patient = OrpheusClient(server.url, max_retries=5, backoff_s=0.05)
        waiting = asyncio.create_task(patient.connect())
        await asyncio.sleep(0.1)
        await holder.close()
        await waiting
        assert patient.connected
        await patient.close()


async def test_unreachable_server_is_a_connection_error():
    """A server that is not there raises ConnectionError (an OSError) naming the URL, after the retries."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = OrpheusClient(f"ws://127.0.0.1:{port}", max_retries=2, backoff_s=0.01)
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}/api/tts_streaming") as info:
        await client.speak("Hi.")
    assert isinstance(info.value, OSError)


async def test_reconnects_between_utterances(config, synth):
    """When the server goes away mid-utterance that utterance fails; the next speak() reconnects with backoff."""
    slow = with_(config, sampling={"max_tokens": 70})
    async with serve(slow, synth, port=0) as server:
        client = OrpheusClient(server.url, max_retries=20, backoff_s=0.05, max_backoff_s=0.2)
        port = server.port
        long = await client.speak(LONG_TEXT)
        await anext(long)
        await server.shutdown(grace_s=0)
    with pytest.raises(ConnectionError, match="mid-utterance"):
        await long.read_all()
    assert not client.connected
    retry = asyncio.create_task(client.speak("Back again."))
    await asyncio.sleep(0.2)  # the server is down for a while: connect() keeps backing off
    async with serve(config, synth, port=port):
        utterance = await retry
        assert len(await utterance.read_all()) > 0
        await client.close()
