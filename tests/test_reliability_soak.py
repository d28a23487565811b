"""A short soak: churn at full concurrency leaves no engine slot, asyncio task or memory behind."""

import asyncio
import gc
import random
import time
from pathlib import Path

from websockets.asyncio.client import connect

from pipecat_orpheus.wire import protocol as p
from pipecat_orpheus.wire.server import serve
from tests.helpers import pack
from tests.reliability_helpers import LONG, TEXT, config, idle, synth  # noqa: F401 (fixtures)


def rss_mib():
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS"))
    return int(line.split()[1]) / 1024


async def test_short_soak_leaves_nothing_behind(config, synth):
    """~20 s of churn (connect, speak, read/cancel/abort, leave) at full concurrency: no slot, task or memory leak."""
    rng = random.Random(0)

    async def churner(deadline):
        while time.monotonic() < deadline:
            async with connect(server.url) as ws:
                await ws.recv()
                await ws.send(pack(type="Speak", text=rng.choice([TEXT, LONG]), id=1))
                action = rng.choice(["read", "cancel", "abort"])
                if action == "abort":
                    await ws.recv()
                    ws.transport.abort()
                elif action == "cancel":
                    await ws.send(pack(type="Cancel", id=1))
                    while p.decode_server(await ws.recv()) != p.Cancelled(1):
                        pass
                else:
                    while not isinstance(p.decode_server(await ws.recv()), p.Done):
                        pass

    async with serve(config, synth, port=0, api_keys=[]) as server:
        tasks = len(asyncio.all_tasks())
        slots = config.engine.max_slots
        await asyncio.gather(*(churner(time.monotonic() + 6) for _ in range(slots)))  # warm-up: arenas fill
        await idle(server, synth)
        gc.collect()
        before = rss_mib()
        await asyncio.gather(*(churner(time.monotonic() + 14) for _ in range(slots)))
        await idle(server, synth)
        gc.collect()
        assert len(asyncio.all_tasks()) == tasks
        assert (rss_mib() - before) / before < 0.05
