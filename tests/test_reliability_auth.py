"""Auth under attack: every bad key refused with 401 before the upgrade, and the key never in a log line."""

import asyncio

from loguru import logger
from websockets.asyncio.client import connect

from pipecat_orpheus.wire import protocol as p
from pipecat_orpheus.wire.server import serve
from tests.helpers import http_get
from tests.reliability_helpers import KEY, UPGRADE, config, idle, synth, utterance  # noqa: F401 (fixtures)

H, B = "kyutai-api-key", "Authorization"
REFUSED = {
    "missing": ("", []),
    "wrong header": ("", [(H, "nope")]),
    "wrong bearer": ("", [(B, "Bearer nope")]),
    "wrong query": ("?auth_id=nope", []),
    "empty header": ("", [(H, "")]),
    "empty bearer": ("", [(B, "Bearer ")]),
    "empty query": ("?auth_id=", []),
    "overlong header": ("", [(H, KEY * 300)]),
    "overlong bearer": ("", [(B, "Bearer " + KEY * 300)]),
    "overlong query": ("?auth_id=" + KEY * 300, []),
    "duplicated wrong header": ("", [(H, "a"), (H, "b")]),
    "duplicated header right+wrong": ("", [(H, "a"), (H, KEY)]),
    "duplicated bearer right+wrong": ("", [(B, f"Bearer {KEY}"), (B, "Bearer a")]),
    "duplicated query right+wrong": (f"?auth_id={KEY}&auth_id=a", []),
    "header right, query wrong": ("?auth_id=a", [(H, KEY)]),
    "basic scheme": ("", [(B, f"Basic {KEY}")]),
    "prefix": ("", [(H, KEY[:-1])]),
}
ACCEPTED = {
    "header": ("", [(H, KEY)]),
    "bearer": ("", [(B, f"Bearer {KEY}")]),
    "query": (f"?auth_id={KEY}", []),
    "same key twice": (f"?auth_id={KEY}", [(H, KEY)]),
}


async def handshake_status(port, query, headers):
    lines = UPGRADE + "".join(f"{k}: {v}\r\n" for k, v in headers)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /api/tts_streaming{query} HTTP/1.1\r\nHost: x\r\n{lines}\r\n".encode())
    status = (await reader.readline()).split()[1]
    writer.transport.abort()
    return int(status)


async def test_auth_refuses_every_bad_key_before_upgrade_and_never_logs_it(config, synth):
    """Missing, wrong, empty, overlong, duplicated keys (header, bearer, query) get 401; the key is never logged."""
    lines = []
    sink = logger.add(lambda m: lines.append(str(m) + str(m.record["extra"])), level="DEBUG")
    try:
        async with serve(config, synth, port=0, api_keys=[KEY]) as server:
            for name, (query, headers) in REFUSED.items():
                assert await handshake_status(server.port, query, headers) == 401, name
            for name, (query, headers) in ACCEPTED.items():
                assert await handshake_status(server.port, query, headers) == 101, name
            async with connect(server.url, additional_headers={H: KEY}) as ws:
                assert p.decode_server(await ws.recv()) == p.Ready()
                assert (await utterance(ws, 1))[0] > 0
            too_long = await handshake_status(server.port, "", [(H, "k" * 20000)])  # past websockets' line limit
            assert too_long != 101 and (await http_get(server.port, "/healthz"))[0] == 200
            await idle(server, synth)
    finally:
        logger.remove(sink)
    assert lines and not [line for line in lines if KEY in line]
