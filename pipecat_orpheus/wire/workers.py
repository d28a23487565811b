"""`pipecat-orpheus serve` with `server.workers` > 1: several server processes on one port, one engine core per device.

One server process spends its time in Python on sockets, framing and the protocol; past about
200 streams that, not the GPU, is the limit (bench/README.md, server under load). So the parent
starts the engine cores (`engine.devices`; it restarts one that dies, as any owner does), then
`server.workers` worker processes. Each runs the whole server (`server.run_server`) with
`EngineCores` attached to those cores, on its own listening socket bound with SO_REUSEPORT: the
kernel spreads new connections over them. `limits.max_connections` holds for all of them together
(`SharedConnectionSlots`); `/metrics` from any worker counts every worker (Prometheus multiprocess mode);
`/healthz` says whether every core beats. SIGTERM to the parent drains every worker, then stops
the cores; a worker that dies is started again.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from loguru import logger

from pipecat_orpheus.config import Config
from pipecat_orpheus.core import EngineCores, messages
from pipecat_orpheus.errors import ConfigError
from pipecat_orpheus.wire.slots import SharedConnectionSlots

_PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies


def run(config: Config) -> None:
    """Start the cores and the workers, serve until SIGTERM/SIGINT, then drain the workers and stop the cores."""
    _check_port(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    cores = EngineCores.start(config)  # it owns the core processes: restarts one that dies, stops them at the end
    metrics_dir = Path(tempfile.mkdtemp(prefix="orpheus-metrics-"))
    slots = metrics_dir / "connections.bin"  # outside the Prometheus files' naming: it never reads it
    SharedConnectionSlots.create(slots, config.server.workers)
    workers: list[subprocess.Popen] = []
    try:
        workers = [_spawn(cores.directories, i, metrics_dir, slots) for i in range(config.server.workers)]
        logger.info(f"serving on {config.server.host}:{config.server.port} with {len(workers)} workers")
        while not stop.wait(1.0):
            for i, worker in enumerate(workers):
                if worker.poll() is not None:
                    logger.error(f"worker {i} exited with code {worker.returncode}; starting it again")
                    SharedConnectionSlots.reset(slots, i)  # its connections died with it
                    workers[i] = _spawn(cores.directories, i, metrics_dir, slots)
        logger.info("signal received, shutting down the workers")
    finally:
        for worker in workers:
            worker.terminate()  # each drains: server.shutdown_grace_s, then server.close_timeout_s
        wait_s = config.server.shutdown_grace_s + config.server.close_timeout_s + 5
        for worker in workers:
            try:
                worker.wait(wait_s)
            except subprocess.TimeoutExpired:
                worker.kill()
        cores.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _check_port(config: Config) -> None:
    """A port in use fails here with a clear message (SO_REUSEPORT would share it with another server)."""
    where = f"{config.server.host}:{config.server.port}"
    with socket.socket() as probe:
        try:
            probe.bind((config.server.host, config.server.port))
        except OSError as e:
            raise ConfigError("server.port", f"{where} is already in use: {e.strerror}") from e


def _spawn(directories: list[Path], index: int, metrics_dir: Path, slots: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "pipecat_orpheus.wire.workers", *(f"--dir={d}" for d in directories)]
    command += [f"--index={index}", f"--slots={slots}"]
    environment = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "ORPHEUS_WORKER": str(index)}
    return subprocess.Popen(command, stdin=subprocess.DEVNULL, env=environment)


def main(argv: list[str] | None = None) -> int:
    """A worker: the server around `EngineCores` attached to the parent's cores."""
    import asyncio

    from pipecat_orpheus.speech import speech_for
    from pipecat_orpheus.wire.server import run_server

    parser = argparse.ArgumentParser(prog="python -m pipecat_orpheus.wire.workers")
    parser.add_argument("--dir", required=True, type=Path, action="append", help="an engine core's directory")
    parser.add_argument("--index", required=True, type=int, help="this worker's number, from 0")
    parser.add_argument("--slots", required=True, type=Path, help="the workers' shared connection counts")
    args = parser.parse_args(argv)
    if sys.platform == "linux":  # the parent killed outright: end too, so no worker holds the port
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    config = messages.config_from_json((args.dir[0] / "config.json").read_text())
    slots = SharedConnectionSlots(args.slots, args.index, config.limits.max_connections)

    def open_speech(config: Config):
        return speech_for(EngineCores.attach(config, args.dir), config)

    try:
        asyncio.run(run_server(config, open_speech, reuse_port=True, slots=slots))
    finally:
        slots.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
