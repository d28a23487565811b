"""A real `pipecat-orpheus serve` in a subprocess, as users run it: what the server and reliability benches drive.

Configuration goes in as `ORPHEUS_*` environment variables (config keys), so the server reads
it the way a deployment does; the server's log goes to a file, whose tail is shown if it does
not come up.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def http_status(port: int, path: str, headers: list[tuple[str, str]] = ()) -> int | None:
    """Status of a raw GET (None if the server closed without answering)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode())
    try:
        line = await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.transport.abort()
    return int(line.split()[1]) if line.startswith(b"HTTP/1.1") else None


async def healthy(port: int) -> bool:
    try:
        return await http_status(port, "/healthz") == 200
    except OSError:
        return False


def children(pid: int) -> dict[int, str]:
    """pid -> command line of `pid`'s children (Linux /proc)."""
    out = {}
    for child in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{child}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    with open(f"/proc/{child}/cmdline") as c:
                        out[int(child)] = c.read().replace("\0", " ")
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return out


def engine_cores(pid: int) -> list[int]:
    """The engine core processes `pid` started, in start order (pids grow; one per device of `engine.devices`)."""
    return sorted(child for child, command in children(pid).items() if "pipecat_orpheus.core.process" in command)


def config_environment(overrides: dict) -> dict[str, str]:
    """Config keys as the `ORPHEUS_<SECTION>_<KEY>` variables `load_config` reads (values as YAML)."""
    return {f"ORPHEUS_{k.replace('.', '_').upper()}": str(v) for k, v in overrides.items() if v is not None}


@asynccontextmanager
async def serve_process(
    overrides: dict, port: int, *, config_path: str | None = None, ready_timeout_s: float = 180.0, **env: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`pipecat-orpheus serve` on `overrides` (config keys over `config_path`) and `port`, once /healthz says 200.

    `env` adds or replaces variables. The process is killed on the way out if it is still running.
    """
    command = [sys.executable, "-m", "pipecat_orpheus.cli", "serve", "--port", str(port)]
    if config_path is not None:
        command += ["--config", config_path]
    with tempfile.TemporaryFile() as log:  # its stderr, shown if it does not come up
        proc = await asyncio.create_subprocess_exec(
            *command, env={**os.environ, **config_environment(overrides), **env}, stderr=log
        )
        try:
            async with asyncio.timeout(ready_timeout_s):
                while not await healthy(port):
                    if proc.returncode is not None:
                        log.seek(0)
                        tail = log.read().decode(errors="replace")[-1500:]
                        raise RuntimeError(f"pipecat-orpheus serve exited with {proc.returncode}: {tail}")
                    await asyncio.sleep(0.1)
            yield proc
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
