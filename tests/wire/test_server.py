"""server.py over real loopback sockets, with the tiny real-format model behind it."""

import asyncio
import base64
import os
import signal
import socket
import threading
import time

import msgpack
import numpy as np
import pytest
from loguru import logger
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from pipecat_orpheus.config import load_config
from pipecat_orpheus.errors import ConfigError
from pipecat_orpheus.format import SAMPLES_PER_FRAME
from pipecat_orpheus.pcm import MESSAGE_SAMPLES
from pipecat_orpheus.speech import open_backend, speech_for
from pipecat_orpheus.wire import protocol as p
from pipecat_orpheus.wire.server import run, serve
from tests.helpers import (
    GUARD,
    LONG_TEXT,
    forced_by_text,
    guard_scripts,
    http_get,
    messages,
    overrides,
    pack,
    until,
    with_,
)


async def test_kyutai_session(config, synth):
    """A Kyutai-style client (Voice before Ready, words one by one, Eos) gets only Kyutai messages and a 1000 close."""
    async with serve(config, synth, port=0, api_keys=[]) as server:
        url = f"{server.url}?format=PcmMessagePack&voice=unmute-prod-website%2Fp329_022.wav&cfg_alpha=1.5"
        async with connect(url, additional_headers={"kyutai-api-key": "public_token"}) as ws:
            await ws.send(pack(type="Voice", embeddings=[0.1, 0.2], shape=[1, 2]))
            ready = p.decode_server(await ws.recv())
            assert ready.voices == list(config.voices.available) and ready.default_voice == config.voices.default
            assert ready.sampling["max_tokens"] == config.sampling.max_tokens  # extension fields Kyutai ignores
            words = "Hello there. How are you today? Fine".split()
            for word in words:
                await ws.send(pack(type="Text", text=word))
            await ws.send(pack(type="Eos"))
            got, code = await messages(ws)
    assert code == 1000
    assert {m.type for m in got} == {"Audio", "Text"}
    assert [m.text for m in got if isinstance(m, p.Word)] == words
    times = [t for m in got if isinstance(m, p.Word) for t in (m.start_s, m.stop_s)]
    assert times == sorted(times) and times[0] == 0.0
    audio = [m.pcm for m in got if isinstance(m, p.Audio)]
    assert all(a.dtype == np.float32 and 0 < len(a) <= MESSAGE_SAMPLES for a in audio)
    assert sum(len(a) == MESSAGE_SAMPLES for a in audio) >= len(audio) - 3  # short only at the 3 sentence ends
    assert times[-1] <= sum(len(a) for a in audio) / 24000 + 1e-9
    assert got[0].type == "Text", "a word goes out before the audio it starts in"


async def test_text_frame_and_nul_eos(config, synth):
    """moshi-server's shortcuts work: a text frame is Text and b'\\0' is Eos."""
    async with serve(config, synth, port=0) as server, connect(server.url) as ws:
        assert isinstance(p.decode_server(await ws.recv()), p.Ready)
        await ws.send("Hi there.")
        await ws.send(b"\0")
        got, code = await messages(ws)
    assert code == 1000 and any(isinstance(m, p.Audio) for m in got)


@pytest.mark.parametrize("fmt", ["PcmMessagePack", "Pcm16MessagePack"])
async def test_speak_marker_done_in_order(config, synth, fmt):
    """Speak/Marker/Speak come back as audio a, Done a, Marker, audio b, Done b, in either format."""
    async with serve(config, synth, port=0) as server, connect(f"{server.url}?format={fmt}") as ws:
        await ws.recv()
        await ws.send(pack(type="Speak", text="First one.", id="a"))
        await ws.send(pack(type="Marker", id=1))
        await ws.send(pack(type="Speak", text="Second.", id="b", voice="leo"))
        await ws.send(pack(type="Eos"))
        raw, code = [], None
        try:
            async for data in ws:
                raw.append(msgpack.unpackb(data))
        except ConnectionClosed:
            pass
        code = ws.close_code
    assert code == 1000
    order = [(m["type"], m.get("id")) for m in raw if m["type"] != "Text"]
    squashed = [x for i, x in enumerate(order) if i == 0 or x != order[i - 1]]
    assert squashed == [("Audio", "a"), ("Done", "a"), ("Marker", 1), ("Audio", "b"), ("Done", "b")]
    pcm = [m["pcm"] for m in raw if m["type"] == "Audio"]
    if fmt == "Pcm16MessagePack":
        assert all(isinstance(x, bytes) and 0 < len(x) <= 2 * MESSAGE_SAMPLES for x in pcm)
    else:
        assert all(isinstance(x, list) and 0 < len(x) <= MESSAGE_SAMPLES for x in pcm)


async def test_speak_sampling_is_the_utterances_own(config, synth):
    """Speak.sampling applies to its utterance only (max_tokens 7: one frame); past the server's bound: bad_request."""
    async with serve(config, synth, port=0) as server, connect(server.url) as ws:
        await ws.recv()
        await ws.send(pack(type="Speak", text="Short.", id="a", sampling={"max_tokens": 7}))
        await ws.send(pack(type="Speak", text="Long.", id="b", sampling={"max_tokens": config.sampling.max_tokens + 1}))
        await ws.send(pack(type="Speak", text="Default.", id="c"))
        await ws.send(pack(type="Eos"))
        got, code = await messages(ws)
    samples = {i: sum(len(m.pcm) for m in got if isinstance(m, p.Audio) and m.id == i) for i in "abc"}
    assert samples["a"] == SAMPLES_PER_FRAME and samples["b"] == 0 and samples["c"] > 0
    (error,) = [m for m in got if isinstance(m, p.Error)]
    assert (error.id, error.code) == ("b", "bad_request") and "Speak.sampling.max_tokens" in error.message


async def test_cancel_stops_audio(config, synth):
    """Cancel{id} and Cancel{} answer Cancelled, after which no audio of the cancelled work arrives."""
    log = []

    async def recv_until(pred):
        while not pred(m := p.decode_server(await ws.recv())):
            log.append(m)
        log.append(m)

    async with serve(config, synth, port=0) as server, connect(server.url) as ws:
        await ws.recv()
        await ws.send(pack(type="Speak", text=LONG_TEXT, id="a"))
        await recv_until(lambda m: isinstance(m, p.Audio))
        await ws.send(pack(type="Cancel", id="a"))
        await ws.send(pack(type="Speak", text=LONG_TEXT, id="b"))
        await ws.send(pack(type="Speak", text="Last.", id="c"))
        await recv_until(lambda m: isinstance(m, p.Audio) and m.id == "b")
        await ws.send(pack(type="Cancel"))
        await ws.send(pack(type="Speak", text="After.", id="d"))
        await ws.send(pack(type="Eos"))
        got, code = await messages(ws)
    log += got
    assert code == 1000
    for cancelled, ids in [(p.Cancelled("a"), {"a"}), (p.Cancelled(None), {"a", "b", "c"})]:
        after = log[log.index(cancelled) + 1 :]
        assert not [m for m in after if isinstance(m, (p.Audio, p.Word, p.Done)) and m.id in ids]
    assert [m.id for m in log if isinstance(m, p.Done)] == ["d"]
    await until(lambda: synth.active_requests == 0)


@pytest.mark.parametrize("way", ["kyutai-api-key", "bearer", "auth_id"])
async def test_auth_accepted_each_way(config, synth, monkeypatch, way):
    """A configured key is accepted from the kyutai-api-key header, Authorization: Bearer, or ?auth_id=."""
    monkeypatch.setenv(config.server.api_key_env, "other-key, s3cret-key")
    headers = {"kyutai-api-key": {"kyutai-api-key": "s3cret-key"}, "bearer": {"Authorization": "Bearer s3cret-key"}}
    async with serve(config, synth, port=0) as server:
        url = server.url + ("?auth_id=s3cret-key" if way == "auth_id" else "")
        async with connect(url, additional_headers=headers.get(way)) as ws:
            assert isinstance(p.decode_server(await ws.recv()), p.Ready)


async def test_auth_refused_before_upgrade_and_key_not_logged(config, synth, monkeypatch):
    """A missing or wrong key gets HTTP 401 before the upgrade; the key never reaches the logs."""
    monkeypatch.setenv(config.server.api_key_env, "s3cret-key")
    lines = []
    sink = logger.add(lambda m: lines.append(str(m)), level="DEBUG")
    try:
        async with serve(config, synth, port=0) as server:
            for headers, suffix in [(None, ""), ({"kyutai-api-key": "wrong"}, ""), (None, "?auth_id=s3cret-ke")]:
                with pytest.raises(InvalidStatus) as info:
                    async with connect(server.url + suffix, additional_headers=headers):
                        pass
                assert info.value.response.status_code == 401
            async with connect(server.url + "?auth_id=s3cret-key") as ws:
                await ws.recv()
                await ws.send(pack(type="Speak", text="Hi.", id=1))
                while p.decode_server(await ws.recv()).type != "Done":
                    pass
            assert (await http_get(server.port, "/healthz"))[0] == 200  # probes need no key
    finally:
        logger.remove(sink)
    assert lines and not [line for line in lines if "s3cret" in line]


async def test_healthz_and_metrics(config, synth):
    """/healthz is 503 while loading and 200 once the synthesizer is set; /metrics is Prometheus text."""
    async with serve(config, None, port=0) as server:
        assert await http_get(server.port, "/healthz") == (503, "loading\n")
        async with connect(server.url) as ws:  # no synthesizer yet: busy, not Ready
            assert p.decode_server(await ws.recv()).code == "busy"
            await messages(ws)
            assert ws.close_code == 1013
        server.synthesizer = synth
        assert (await http_get(server.port, "/healthz"))[0] == 200
        status, body = await http_get(server.port, "/metrics")
        assert (await http_get(server.port, "/nope"))[0] == 404
    assert status == 200
    assert 'orpheus_connections_total{outcome="busy"}' in body and "orpheus_time_to_first_audio_seconds_bucket" in body
    assert "orpheus_engine_headroom_streams" in body


async def test_connection_limit(config, synth):
    """Past limits.max_connections a client gets Error{busy} instead of Ready, then close 1013."""
    async with serve(with_(config, limits={"max_connections": 1}), synth, port=0) as server:
        async with connect(server.url) as first:
            assert isinstance(p.decode_server(await first.recv()), p.Ready)
            async with connect(server.url) as second:
                got, code = await messages(second)
            assert code == 1013 and [(m.type, m.code) for m in got] == [("Error", "busy")]


async def test_text_and_queue_limits(config, synth):
    """Over-long Speak, too many queued utterances and too much buffered Text get bad_request; the stream goes on."""
    limits = {"max_utterance_chars": 50, "max_queued_utterances": 1, "max_buffered_chars": 40}
    async with serve(with_(config, limits=limits), synth, port=0) as server, connect(server.url) as ws:
        await ws.recv()
        await ws.send(pack(type="Speak", text="x" * 51, id="long"))
        await ws.send(pack(type="Speak", text="One.", id=1))  # starts
        await ws.send(pack(type="Speak", text="Two.", id=2))  # queued
        await ws.send(pack(type="Speak", text="Three.", id=3))  # over the queue limit
        await ws.send(pack(type="Text", text="y" * 45))
        await ws.send(pack(type="Eos"))
        got, code = await messages(ws)
    errors = [(m.id, m.code, m.message.split("limits.")[-1].split()[0]) for m in got if isinstance(m, p.Error)]
    assert errors == [
        ("long", "bad_request", "max_utterance_chars"),
        (3, "bad_request", "max_queued_utterances"),
        (None, "bad_request", "max_buffered_chars"),
    ]
    assert [m.id for m in got if isinstance(m, p.Done)] == [1, 2] and code == 1000


async def test_message_size_limit(config, synth):
    """A frame over limits.max_message_bytes gets Error naming it and the stream goes on; past max_frame_bytes, 1009."""
    limits = {"max_message_bytes": 1024, "max_frame_bytes": 4096}
    async with serve(with_(config, limits=limits), synth, port=0) as server:
        async with connect(server.url) as ws:
            await ws.recv()
            await ws.send(pack(type="Text", text="z" * 2000))
            await ws.send("y" * 1500)  # a text frame counts its UTF-8 bytes too
            for _ in range(2):
                error = p.decode_server(await ws.recv())
                assert error.code == "bad_request" and "limits.max_message_bytes (1024)" in error.message
            await ws.send(pack(type="Marker", id="still-open"))
            assert p.decode_server(await ws.recv()) == p.Marker("still-open")
            await ws.send(pack(type="Text", text="z" * 5000))
            await messages(ws)
        assert ws.close_code == 1009


async def test_malformed_frames_get_bad_request(config, synth):
    """Non-msgpack, non-map, unknown type and wrong field types each get Error{bad_request}; the stream goes on."""
    bad = [b"\xc1\xc1", msgpack.packb([1]), pack(type="Sing"), pack(type="Speak", text=5), pack(type="Marker")]
    async with serve(config, synth, port=0) as server, connect(server.url) as ws:
        await ws.recv()
        for frame in bad:
            await ws.send(frame)
        await ws.send(pack(type="Speak", text="Still here.", id="ok"))
        await ws.send(pack(type="Eos"))
        got, code = await messages(ws)
    assert [m.code for m in got if isinstance(m, p.Error)] == ["bad_request"] * len(bad)
    assert [m.id for m in got if isinstance(m, p.Done)] == ["ok"] and code == 1000


async def test_silent_peer_is_dropped(config, synth):
    """A peer that never answers pings is dropped after server.ping_timeout_s."""
    cfg = with_(config, server={"ping_interval_s": 0.2, "ping_timeout_s": 0.4})
    async with serve(cfg, synth, port=0) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        start = time.monotonic()
        async with asyncio.timeout(5):
            while await reader.read(4096):  # Ready, pings we never answer, then EOF
                pass
        writer.close()
        assert 0.5 < time.monotonic() - start < 3
        await until(lambda: server.open_streams == 0)


@pytest.mark.parametrize(
    "bound",
    [
        {"limits": {"max_unsent_audio_s": 0.3}},  # the outbox passes its bound
        {"server": {"ping_interval_s": 0.2, "ping_timeout_s": 0.5}},  # a send blocks past the ping timeout
    ],
)
async def test_client_that_stops_reading_is_closed(config, synth, bound):
    """A client that stops reading is dropped with the server's buffer bounded, and its slot freed."""
    cfg = with_(with_(config, sampling={"max_tokens": 70}, server={"close_timeout_s": 0.5}), **bound)
    listener = socket.create_server(("127.0.0.1", 0))
    # Small kernel buffers on both ends (Linux autotunes the server's up to MBs on loopback), so
    # what the client does not read piles up where the server can see it.
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    async with serve(cfg, synth, sock=listener) as server:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        sock.setblocking(False)
        async with connect(server.url, sock=sock, max_queue=1) as ws:
            await ws.send(pack(type="Speak", text=LONG_TEXT * 3, id="a"))
            await until(lambda: server.open_streams == 0, timeout=30)  # never reading
            got, _ = await messages(ws)
        assert ws.close_code in (1008, 1011, 1006)  # 1006 if the close frame itself could not get through
        heard = sum(len(m.pcm) for m in got if isinstance(m, p.Audio)) / 24000
        assert heard < 3  # the text makes ~13 s: the server stopped instead of buffering it
        await until(lambda: synth.active_requests == 0 and synth.queued_requests == 0)


async def test_disconnect_mid_utterance_frees_the_slot(config, synth):
    """A client that vanishes mid-utterance has its engine request cancelled: active_requests returns to 0."""
    cfg = with_(config, sampling={"max_tokens": 140})
    async with serve(cfg, synth, port=0) as server:
        ws = await connect(server.url)
        await ws.recv()
        await ws.send(pack(type="Speak", text=LONG_TEXT, id="a"))
        while p.decode_server(await ws.recv()).type != "Audio":
            pass
        assert synth.active_requests == 1
        ws.transport.abort()  # no close handshake: the TCP connection just drops
        start = time.monotonic()
        await until(lambda: synth.active_requests == 0 and synth.queued_requests == 0 and server.open_streams == 0)
        assert time.monotonic() - start < 1.0  # stopped at the next token, not after 140 of them


async def test_fifty_concurrent_connections(config, synth):
    """50 concurrent streams all get Ready, whole frames of audio and Done (the synthesizer is shared)."""

    async def one(server, i):
        async with connect(server.url) as ws:
            assert isinstance(p.decode_server(await ws.recv()), p.Ready)
            await ws.send(pack(type="Speak", text=f"Number {i}.", id=i))
            await ws.send(pack(type="Eos"))
            got, code = await messages(ws)
        samples = sum(len(m.pcm) for m in got if isinstance(m, p.Audio))
        return code, samples, [m.id for m in got if isinstance(m, p.Done)]

    async with serve(with_(config, sampling={"max_tokens": 7}), synth, port=0) as server:
        results = await asyncio.gather(*(one(server, i) for i in range(50)))
    for i, (code, samples, done) in enumerate(results):
        assert code == 1000 and done == [i]
        assert samples > 0 and samples % SAMPLES_PER_FRAME == 0  # every generated frame arrived


async def test_engine_busy_is_per_utterance(tiny_model_dir):
    """EngineBusy from submit becomes Error{busy} for that utterance only; the stream goes on."""
    cfg = load_config(overrides=overrides(tiny_model_dir, **{"engine.max_queue": 0, "sampling.max_tokens": 70}))
    busy_synth = speech_for(open_backend(cfg), cfg)
    try:
        async with serve(cfg, busy_synth, port=0) as server, connect(server.url) as a, connect(server.url) as b:
            await a.recv(), await b.recv()
            await a.send(pack(type="Speak", text="Long enough.", id="a"))
            while p.decode_server(await a.recv()).type != "Audio":
                pass
            await b.send(pack(type="Speak", text="Me too.", id="b"))
            error = p.decode_server(await b.recv())
            assert (error.type, error.code, error.id) == ("Error", "busy", "b")
            await b.send(pack(type="Marker", id="still-open"))
            assert p.decode_server(await b.recv()) == p.Marker("still-open")
    finally:
        busy_synth.close()


async def test_shutdown_finishes_or_cancels_then_1001(config, synth):
    """Shutdown refuses new streams, gives in-flight work the grace period, then closes every stream with 1001."""
    cfg = with_(config, sampling={"max_tokens": 140}, server={"close_timeout_s": 2})
    async with serve(cfg, synth, port=0) as server:
        idle = await connect(server.url)
        busy = await connect(server.url)
        await idle.recv(), await busy.recv()
        await busy.send(pack(type="Speak", text=LONG_TEXT * 3, id="long"))
        assert [p.decode_server(await busy.recv()).type for _ in range(2)] == ["Text", "Audio"]  # in flight
        readers = [asyncio.create_task(messages(ws)) for ws in (idle, busy)]
        start = time.monotonic()
        stopping = asyncio.create_task(server.shutdown(grace_s=0.5))
        await until(lambda: server.draining)
        with pytest.raises((InvalidStatus, OSError)) as info:  # 503 during the grace period, refused after
            await connect(server.url)
        assert not isinstance(info.value, InvalidStatus) or info.value.response.status_code == 503
        await stopping
        assert time.monotonic() - start < 3  # grace (0.5 s) + closing handshakes, not the whole text
        (_, idle_code), (heard, busy_code) = await asyncio.gather(*readers)
        assert idle_code == busy_code == 1001
        assert not any(isinstance(m, p.Done) for m in heard)  # cut at the end of the grace period
    await until(lambda: synth.active_requests == 0 and synth.queued_requests == 0)


async def test_port_in_use_names_the_key(config, synth):
    """Binding a port already in use fails with a ConfigError naming server.port."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ConfigError, match="server.port.*already in use"):
            async with serve(config, synth, port=taken.getsockname()[1]):
                pass


def test_run_serves_until_sigterm(tiny_model_dir):
    """`run(config)` binds, loads, serves, and on SIGTERM closes streams with 1001 and returns."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # engine.max_queue makes it a synthesizer of its own, which run() closes on the way out.
    cfg = load_config(overrides=overrides(tiny_model_dir, **{"server.port": port, "engine.max_queue": 511}))
    result = {}

    async def talk():
        async with asyncio.timeout(60):
            while True:
                try:
                    if (await http_get(port, "/healthz"))[0] == 200:
                        break
                except OSError:
                    pass
                await asyncio.sleep(0.05)
            async with connect(f"ws://127.0.0.1:{port}/ws") as ws:
                await ws.recv()
                os.kill(os.getpid(), signal.SIGTERM)  # caught by run()'s handler
                return (await messages(ws))[1]

    def client():
        try:
            result["code"] = asyncio.run(talk())
        except BaseException as e:
            result["error"] = e
            os.kill(os.getpid(), signal.SIGTERM)  # let run() return so the test can fail

    thread = threading.Thread(target=client)
    thread.start()
    run(cfg)
    thread.join(10)
    assert result == {"code": 1001}


async def test_done_says_why_the_audio_ended(tiny_model_dir):
    """Done carries the guard's reason (loop, duration) or end_of_speech, and /metrics counts the pieces by reason."""
    engine = {"engine.backend": "batched", "engine.max_slots": 3, "engine.max_tokens_per_slot": 600}
    cfg = load_config(overrides=overrides(tiny_model_dir, **engine, **{"sampling.max_tokens": 560}, **GUARD))
    backend = open_backend(cfg)  # the batched engine in this process: its step can be driven
    backend.rewrite_tokens = forced_by_text(backend.tokenizer, cfg.voices.default, guard_scripts())
    try:
        async with serve(cfg, speech_for(backend, cfg), port=0) as server, connect(server.url) as ws:
            await ws.recv()
            for id, text in (("loop", "It loops."), ("runaway", "Hi."), ("fine", "All fine.")):
                await ws.send(pack(type="Speak", text=text, id=id))
            await ws.send(pack(type="Eos"))
            got, code = await messages(ws)
            _, body = await http_get(server.port, "/metrics")
    finally:
        backend.close()
    assert code == 1000
    assert [(m.id, m.reason) for m in got if isinstance(m, p.Done)] == [
        ("loop", "loop"), ("runaway", "duration"), ("fine", "end_of_speech"),
    ]  # fmt: skip
    for reason in ("loop", "duration", "end_of_speech"):
        assert f'orpheus_piece_stops_total{{reason="{reason}"}}' in body
