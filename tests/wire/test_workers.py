"""`pipecat-orpheus serve --workers 2`: two server processes on one port around one engine core (tiny model, CPU)."""

import asyncio
import os
import signal

import pytest

from bench.reliability.common import KEY, free_port, http_status, serve_process
from bench.serving import children, engine_cores
from pipecat_orpheus.config import load_config
from pipecat_orpheus.errors import ConfigError, EngineBusy, ProtocolError
from pipecat_orpheus.wire.client import OrpheusClient
from tests.helpers import http_get, overrides

CLIENTS = 16


def served(tiny_model_dir, **extra):
    return {
        **overrides(tiny_model_dir),
        "engine.core_process": True,
        "server.workers": 2,
        "sampling.seed": 3,
        "engine.core_restart_backoff_s": 0.2,
        **extra,
    }


def listening(pid: int, port: int) -> bool:
    """Whether process `pid` listens on `port`."""
    return _sockets(pid, port, "0A") > 0


def established(pid: int, port: int) -> int:
    """TCP connections process `pid` holds on local `port`, established (from /proc)."""
    return _sockets(pid, port, "01")


def _sockets(pid: int, port: int, state: str) -> int:
    """Sockets of process `pid` on local `port` in TCP state `state` (/proc/net/tcp's hex code)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) == port and fields[3] == state and fields[9] in inodes:
                count += 1
    return count


async def test_workers_share_one_port_and_one_core(tiny_model_dir):
    """16 clients spread over both workers, all speak through the one core; /metrics counts every worker.

    `limits.max_connections: 16` holds for both workers together: all 16 get in however the kernel
    spread them, and a 17th is refused.
    """
    port = free_port()
    async with serve_process(served(tiny_model_dir, **{"limits.max_connections": CLIENTS}), port) as proc:
        kids = children(proc.pid)
        workers = [pid for pid, cmd in kids.items() if "pipecat_orpheus.wire.workers" in cmd]
        cores = [pid for pid, cmd in kids.items() if "pipecat_orpheus.core.process" in cmd]
        assert len(workers) == 2 and len(cores) == 1, kids
        async with asyncio.timeout(60):  # /healthz came from one; each listens once its engine client is up
            while not all(listening(pid, port) for pid in workers):
                await asyncio.sleep(0.1)
        clients = [OrpheusClient(f"ws://127.0.0.1:{port}", api_key=KEY, max_retries=0) for _ in range(CLIENTS)]
        try:
            utterances = [await client.speak("Hello there, friend.") for client in clients]
            audio = await asyncio.wait_for(asyncio.gather(*(u.read_all() for u in utterances)), 120)
            assert all(len(a) == len(audio[0]) > 0 for a in audio)
            served_by = [established(pid, port) for pid in workers]
            assert sum(served_by) == CLIENTS and min(served_by) > 0, served_by  # the kernel spread them
            with pytest.raises(EngineBusy, match="max_connections"):
                await OrpheusClient(f"ws://127.0.0.1:{port}", api_key=KEY, max_retries=0).connect()
            status, body = await http_get(port, "/metrics")
            assert status == 200
            assert 'orpheus_connections_total{outcome="accepted"} 16.0' in body
            assert "orpheus_open_connections 16.0" in body
        finally:
            await asyncio.gather(*(client.close() for client in clients))
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
    assert not any(os.path.exists(f"/proc/{pid}") and _running(pid) for pid in workers + cores)


async def test_workers_ride_out_a_core_death(tiny_model_dir):
    """SIGKILL to the core: every worker's /healthz turns 503, the parent restarts the core, and they speak again."""
    port = free_port()
    async with serve_process(served(tiny_model_dir), port) as proc:
        (core,) = engine_cores(proc.pid)
        os.kill(core, signal.SIGKILL)
        async with asyncio.timeout(120):  # a new core process: torch and the model load again, on a busy machine
            while await http_status(port, "/healthz") != 503:
                await asyncio.sleep(0.05)
            while await http_status(port, "/healthz") != 200:
                await asyncio.sleep(0.1)
        # /healthz came from one worker; the other may hear the new core a beat later: busy until then
        async with asyncio.timeout(60):
            while True:
                try:
                    async with OrpheusClient(f"ws://127.0.0.1:{port}", api_key=KEY, max_retries=0) as client:
                        assert len(await (await client.speak("Back again.")).read_all()) > 0
                        break
                except (EngineBusy, ProtocolError):
                    await asyncio.sleep(0.2)


def test_workers_need_a_fixed_port_and_the_core_process():
    """Bad combinations fail at start, naming `server.workers`."""
    with pytest.raises(ConfigError, match="server.workers"):
        load_config(overrides={"server.workers": 2, "server.port": 0})
    with pytest.raises(ConfigError, match="server.workers"):
        load_config(overrides={"server.workers": 2, "engine.core_process": False})


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
