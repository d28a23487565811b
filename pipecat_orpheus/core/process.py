"""The engine core: one process that owns the GPU and runs the engine's step loop, nothing else.

Started by `client.EngineClient` as `python -m pipecat_orpheus.core.process`; it loads the
configured backend (`backend.load_backend`), says `ready`, then serves: the main thread reads
requests and cancels, the engine's step thread sends one message per step with every request's
new audio. No asyncio, no sockets to users, no Pipecat. It exits on `stop`, and on its own
when the process that started it is gone (so a killed bot leaves no orphan holding the GPU).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading

import numpy as np
import zmq
from loguru import logger

from pipecat_orpheus.backend import LocalBackend, load_backend
from pipecat_orpheus.core import messages
from pipecat_orpheus.engine.request import SamplingParams
from pipecat_orpheus.errors import EngineBusy, EngineClosed, InvalidRequest, RequestCancelled

PARENT_CHECK_S = 0.5  # how often an idle core looks whether the process that started it is still there


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

    def finish(self, error: BaseException | None = None) -> None:
        self._core.end(self.request_id, error)


class EngineCore:
    """Serves a backend to one client: requests in, one message per step out.

    Args:
        backend: the engine (or the reference path), loaded and warm.
        out: the PUSH socket to the client; sent on under a lock (the step and main threads both send).
    """

    def __init__(self, backend: LocalBackend, out: zmq.Socket):
        self.backend = backend
        self._out = out
        self._lock = threading.Lock()
        self._sinks: dict[str, _Sink] = {}
        self._audio: list[tuple[str, np.ndarray]] = []
        self._ended: list[messages.Ended] = []
        self._load = (0, 0)  # (active, queued) as last sent
        backend.on_step = self.flush

    def submit(self, request_id: str, prompts: list[list[int]], sampling: SamplingParams) -> None:
        """Start a request; a refusal (full, invalid) ends it at once."""
        sink = _Sink(request_id, self)
        with self._lock:
            self._sinks[request_id] = sink
        try:
            self.backend.enqueue(prompts, sampling, sink)
        except (EngineBusy, InvalidRequest, EngineClosed) as e:
            sink.finish(e)

    def cancel(self, request_id: str) -> None:
        """Stop a request: its end goes out now, whatever the backend still delivers for it is dropped."""
        with self._lock:
            sink = self._sinks.get(request_id)
        if sink is not None:
            sink.cancelled = True
            self.backend.cancel(request_id)
            self.end(request_id, RequestCancelled(request_id))

    def put(self, request_id: str, pcm: np.ndarray) -> None:
        """New audio of a request, for the next message."""
        with self._lock:
            self._audio.append((request_id, pcm))

    def end(self, request_id: str, error: BaseException | None) -> None:
        """A request ended (once: a later end of the same request is dropped)."""
        with self._lock:
            if self._sinks.pop(request_id, None) is not None:
                self._ended.append(messages.ended(request_id, error))

    def flush(self) -> None:
        """Send what the last step produced, and the load if it changed, as one message."""
        load = (self.backend.active_requests, self.backend.queued_requests)
        with self._lock:
            if not (self._audio or self._ended or load != self._load):
                return
            audio, ended, self._audio, self._ended, self._load = self._audio, self._ended, [], [], load
            stats = getattr(self.backend, "stats", None)
            self._out.send(messages.step(audio, ended, *load, stats), copy=False)

    def serve(self, inputs: zmq.Socket, parent: int) -> None:
        """Handle client messages until `stop` or until the parent process is gone."""
        poller = zmq.Poller()
        poller.register(inputs, zmq.POLLIN)
        while True:
            if not poller.poll(PARENT_CHECK_S * 1000):
                if os.getppid() != parent:
                    logger.warning(f"{self}: the process that started it is gone; stopping")
                    return
                continue
            while True:
                try:
                    message = messages.decode(inputs.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
                if message[0] == "submit":
                    self.submit(*message[1:])
                elif message[0] == "cancel":
                    self.cancel(message[1])
                elif message[0] == "stop":
                    return
            self.flush()

    def close(self) -> None:
        """Stop the backend; requests still in flight end as cancelled."""
        self.backend.close()
        self.flush()

    def __repr__(self) -> str:
        return f"EngineCore(pid {os.getpid()}, {self.backend!r})"


def main(argv: list[str] | None = None) -> int:
    """The core process: load, say ready (or why not), serve, stop."""
    parser = argparse.ArgumentParser(prog="python -m pipecat_orpheus.core.process")
    parser.add_argument("--config", required=True, help="JSON written by config_to_json")
    parser.add_argument("--inputs", required=True, help="ZeroMQ address the client sends to")
    parser.add_argument("--outputs", required=True, help="ZeroMQ address the client receives on")
    parser.add_argument("--parent", type=int, required=True, help="pid of the client's process")
    args = parser.parse_args(argv)
    context = zmq.Context()
    out = context.socket(zmq.PUSH)
    out.setsockopt(zmq.SNDHWM, 0)  # never block the step thread: the client reads all the time
    out.setsockopt(zmq.LINGER, 2000)
    out.connect(args.outputs)
    inputs = context.socket(zmq.PULL)
    inputs.setsockopt(zmq.RCVHWM, 0)
    inputs.connect(args.inputs)
    try:
        with open(args.config) as f:
            config = messages.config_from_json(f.read())
        backend = load_backend(config)
    except Exception as e:  # the client raises it as ModelLoadError / ConfigError, with this message
        logger.opt(exception=e).error("engine core: could not start")
        out.send(messages.failed(e))
        return 1
    core = EngineCore(backend, out)
    out.send(messages.ready({"pid": os.getpid(), "backend": repr(backend)}))
    logger.info(f"{core}: serving")
    try:
        core.serve(inputs, args.parent)
    finally:
        core.close()
        context.destroy(linger=2000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
