"""The engine core: one process that owns the GPU and runs the engine's step loop, nothing else.

Started by `client.CoreProcess` as `python -m pipecat_orpheus.core.process`; it loads the
configured backend (`backend.load_backend`) and serves every client that connects: the main
thread reads requests and cancels, the engine's step thread sends one message per step and
client with its requests' new audio (`messages`). No asyncio, no sockets to users, no Pipecat.
It exits on `stop`, and on its own when the process that started it is gone (so a killed bot
or server leaves no orphan holding the GPU).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections import defaultdict
from pathlib import Path

import numpy as np
import zmq
from loguru import logger

from pipecat_orpheus.backend import LocalBackend, load_backend
from pipecat_orpheus.core import messages
from pipecat_orpheus.engine.request import SamplingParams
from pipecat_orpheus.errors import EngineBusy, EngineClosed, InvalidRequest, RequestCancelled


class _Sink:
    """Where the backend puts one request's audio: the core's outbox for the next step message."""

    __slots__ = ("request_id", "cancelled", "_core")

    def __init__(self, request_id: str, core: EngineCore):
        self.request_id = request_id
        self.cancelled = False
        self._core = core

    def put(self, pcm: np.ndarray) -> None:
        if not self.cancelled:
            self._core.put(self.request_id, pcm)

    def finish(self, error: BaseException | None = None, reason: str | None = None) -> None:
        self._core.end(self.request_id, error, reason)


class EngineCore:
    """Serves a backend to its clients: requests in, one message per step and client out.

    Args:
        backend: the engine (or the reference path), loaded and warm.
        out: the PUB socket; sent on under a lock (the step and main threads both send).
    """

    def __init__(self, backend: LocalBackend, out: zmq.Socket):
        self.backend = backend
        self.pid = os.getpid()
        self._out = out
        self._lock = threading.Lock()
        self._sinks: dict[str, _Sink] = {}
        self._audio: list[tuple[str, np.ndarray]] = []
        self._ended: list[messages.Ended] = []
        self._load = (-1, -1)  # (active, queued) as last sent: nothing sent yet
        backend.on_step = self.flush

    def submit(
        self,
        core: int,
        request_id: str,
        prompts: list[list[int]],
        sampling: SamplingParams,
        budgets: list[int] | None = None,
    ) -> None:
        """Start a request ("client/n"), each piece within its budget; a refusal (full, invalid) ends it at once."""
        sink = _Sink(request_id, self)
        with self._lock:
            self._sinks[request_id] = sink
        if core != self.pid:  # sent to a core that has since died: its client has failed it already
            return self.end(request_id, EngineClosed("the engine core restarted"))
        try:
            self.backend.enqueue(prompts, sampling, sink, budgets)
        except (EngineBusy, InvalidRequest, EngineClosed) as e:
            sink.finish(e)

    def cancel(self, core: int, request_id: str) -> None:
        """Stop a request: its end goes out now, whatever the backend still delivers for it is dropped."""
        with self._lock:
            sink = self._sinks.get(request_id)
        if sink is not None and core == self.pid:
            sink.cancelled = True
            self.backend.cancel(request_id)
            self.end(request_id, RequestCancelled(request_id))

    def put(self, request_id: str, pcm: np.ndarray) -> None:
        """New audio of a request, for the next message."""
        with self._lock:
            self._audio.append((request_id, pcm))

    def end(self, request_id: str, error: BaseException | None, reason: str | None = None) -> None:
        """A request ended, and why (once: a later end of the same request is dropped)."""
        with self._lock:
            if self._sinks.pop(request_id, None) is not None:
                self._ended.append(messages.ended(request_id, error, reason))

    def flush(self, *, beat: bool = False) -> None:
        """Send each client what the last step produced for it, and a beat if the load changed (or `beat`)."""
        load = (self.backend.active_requests, self.backend.queued_requests)
        with self._lock:
            if not (self._audio or self._ended or load != self._load or beat):
                return
            audio, ended, self._audio, self._ended = self._audio, self._ended, [], []
            by_client: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
            for item in audio:
                by_client[item[0].partition("/")[0]][0].append(item)
            for item in ended:
                by_client[item[0].partition("/")[0]][1].append(item)
            for client, (chunks, ends) in by_client.items():
                self._out.send_multipart([messages.topic(client), messages.step(chunks, ends)], copy=False)
            if load != self._load or beat:
                self._load = load
                stats = getattr(self.backend, "stats", None)
                self._out.send_multipart([messages.BROADCAST, messages.beat(self.pid, *load, stats)])

    def serve(self, inputs: zmq.Socket, parent: int) -> None:
        """Handle client messages until `stop` or until the parent process is gone; beat while idle."""
        poller = zmq.Poller()
        poller.register(inputs, zmq.POLLIN)
        while True:
            if not poller.poll(messages.BEAT_S * 1000):
                if os.getppid() != parent:
                    logger.warning(f"{self}: the process that started it is gone; stopping")
                    return
                self.flush(beat=True)
                continue
            while True:
                try:
                    message = messages.decode(inputs.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
                if message[0] == "submit":
                    self.submit(*message[1:])
                elif message[0] == "cancel":
                    self.cancel(*message[1:])
                elif message[0] == "stop":
                    return
            self.flush()

    def close(self) -> None:
        """Stop the backend; requests still in flight end as cancelled."""
        self.backend.close()
        self.flush()

    def __repr__(self) -> str:
        return f"EngineCore(pid {self.pid}, {self.backend!r})"


def main(argv: list[str] | None = None) -> int:
    """The core process: load, serve its clients (or leave why it could not start), stop."""
    parser = argparse.ArgumentParser(prog="python -m pipecat_orpheus.core.process")
    parser.add_argument("--dir", required=True, type=Path, help="the core's directory: config.json, its sockets")
    parser.add_argument("--parent", type=int, required=True, help="pid of the process that started it")
    args = parser.parse_args(argv)
    addresses = messages.Addresses(args.dir)
    try:
        config = messages.config_from_json((args.dir / "config.json").read_text())
        backend = load_backend(config)
    except Exception as e:  # the client raises it as ModelLoadError / ConfigError, with this message
        logger.opt(exception=e).error("engine core: could not start")
        messages.write_failure(args.dir, e)
        return 1
    context = zmq.Context()
    out = context.socket(zmq.PUB)
    out.setsockopt(zmq.SNDHWM, 0)  # never drop or block: the clients read all the time
    out.setsockopt(zmq.LINGER, 2000)
    out.bind(addresses.outputs)
    inputs = context.socket(zmq.PULL)
    inputs.setsockopt(zmq.RCVHWM, 0)
    inputs.bind(addresses.requests)
    core = EngineCore(backend, out)
    logger.info(f"{core}: serving")
    try:
        core.serve(inputs, args.parent)
    finally:
        core.close()
        context.destroy(linger=2000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
