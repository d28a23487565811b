"""`EngineClient`: the engine core as a `Backend`, in the process of the server or the bot.

`EngineClient.start(config)` launches the core (`python -m pipecat_orpheus.core.process`) as a
child process and waits until it is ready; the tokenizer is loaded here, so prompts are built
where the text arrives. Requests go to the core over a ZeroMQ socket; a receiver thread reads
the core's one message per step and hands each event loop its streams' chunks in one wake-up.
When the core dies, every request in flight ends with `EngineFailed`, `healthy` turns False,
and the core is started again (`engine.core_restarts` times in a row, backing off), so a
server answers 503 on /healthz meanwhile and 200 once it is back. The child stops with the
client, at interpreter exit, and on its own when this process is killed.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections import defaultdict
from pathlib import Path

import numpy as np
import zmq
from loguru import logger

from pipecat_orpheus.config import Config
from pipecat_orpheus.core import messages
from pipecat_orpheus.engine.engine import EngineStats
from pipecat_orpheus.engine.request import SamplingParams
from pipecat_orpheus.engine.stream import AudioStream
from pipecat_orpheus.errors import EngineBusy, EngineClosed, EngineFailed, ModelLoadError, RequestCancelled

POLL_S = 0.1  # the receiver's wait between looks at whether the core is still alive
STOP_WAIT_S = 10.0  # a stopping core gets this long to exit before it is killed

_clients: weakref.WeakSet[EngineClient] = weakref.WeakSet()


class _Core:
    """One running core process and this side's two sockets to it."""

    def __init__(self, context: zmq.Context, config: Config):
        self.dir = Path(tempfile.mkdtemp(prefix="orpheus-core-"))
        (self.dir / "config.json").write_text(messages.config_to_json(config))
        self.requests = context.socket(zmq.PUSH)
        self.requests.setsockopt(zmq.SNDHWM, 0)
        self.requests.setsockopt(zmq.LINGER, 0)
        self.requests.bind(f"ipc://{self.dir}/requests")
        self.outputs = context.socket(zmq.PULL)
        self.outputs.setsockopt(zmq.RCVHWM, 0)
        self.outputs.bind(f"ipc://{self.dir}/outputs")
        command = [
            sys.executable, "-m", "pipecat_orpheus.core.process", "--config", str(self.dir / "config.json"),
            "--inputs", f"ipc://{self.dir}/requests", "--outputs", f"ipc://{self.dir}/outputs",
            "--parent", str(os.getpid()),
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL)

    def wait_ready(self) -> dict:
        """Block until the core says ready; its start error (or its death) raised as ours."""
        while True:
            if self.outputs.poll(POLL_S * 1000):
                message = messages.decode(self.outputs.recv())
                if message[0] == "ready":
                    return message[1]
                if message[0] == "failed":
                    raise messages.start_error(*message[1:])
            elif self.process.poll() is not None:
                raise ModelLoadError(
                    f"the engine core exited with code {self.process.returncode} while starting (its log is above)"
                )

    def stop(self) -> None:
        """Ask the core to stop, kill it if it does not, and remove its sockets."""
        if self.process.poll() is None:
            try:
                self.requests.send(messages.STOP, zmq.NOBLOCK)
                self.process.wait(STOP_WAIT_S)
            except (zmq.ZMQError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self.requests.close(linger=0)
        self.outputs.close(linger=0)
        shutil.rmtree(self.dir, ignore_errors=True)


class EngineClient:
    """A `Backend` whose engine runs in an engine core process; see the module docstring.

    Args:
        config: the whole configuration (the core loads `model`, `engine`, `codec`; restarts follow `engine`).
    """

    def __init__(self, config: Config):
        self.config = config
        self.tokenizer = None  # loaded by `start` while the core loads the model
        self.closed = False
        self.healthy = False  # a core is up and serving
        self._down: str | None = None  # why the engine is down for good (restarts spent)
        self.active_requests = 0  # as the core last reported
        self.queued_requests = 0
        self.stats: EngineStats | None = None  # the core's engine counters, as of its last message
        self._context = zmq.Context()
        self._send_lock = threading.Lock()  # the requests socket is used from any event loop's thread
        self._streams: dict[str, AudioStream] = {}
        self._ids = itertools.count()
        self._core = _Core(self._context, config)
        self._receiver: threading.Thread | None = None

    @classmethod
    def start(cls, config: Config) -> EngineClient:
        """Load the tokenizer, start the core and wait until it serves (blocking: minutes on a cold GPU)."""
        from pipecat_orpheus.loader import load_tokenizer

        client = cls(config)  # the core starts loading now
        try:
            client.tokenizer = load_tokenizer(config.model.llm)
            info = client._core.wait_ready()
        except BaseException:
            client._core.stop()
            raise
        client.healthy = True
        logger.info(f"{client}: engine core ready ({info['backend']})")
        client._receiver = threading.Thread(target=client._receive, name="orpheus-core-receiver", daemon=True)
        client._receiver.start()
        _clients.add(client)
        return client

    # -- Backend -------------------------------------------------------------------------------

    def submit_prompts(self, prompts: list[list[int]], sampling: SamplingParams) -> AudioStream:
        """Speak `prompts` as one stream read on the running event loop; refusals end the stream."""
        if self.closed:
            raise EngineClosed("the Orpheus engine is closed")
        if self._down is not None:
            raise EngineFailed(self._down)
        if not self.healthy:
            raise EngineBusy("the engine core is restarting; try again shortly")
        stream = AudioStream(f"c{next(self._ids)}", asyncio.get_running_loop(), self._cancel)
        self._streams[stream.request_id] = stream
        self._send(messages.submit(stream.request_id, prompts, sampling))
        return stream

    def close(self) -> None:
        """Stop the core; every stream in flight ends with `RequestCancelled`."""
        if self.closed:
            return
        self.closed = True
        self.healthy = False
        if self._receiver is not None:
            self._receiver.join()
        self._core.stop()
        self._fail_all(RequestCancelled("the Orpheus engine is closed"))
        self._context.term()

    def _cancel(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None and self.healthy:
            self._send(messages.cancel(request_id))

    def _send(self, data: bytes) -> None:
        with self._send_lock:
            self._core.requests.send(data)

    # -- the receiver thread -------------------------------------------------------------------

    def _receive(self) -> None:
        failures = 0
        while not self.closed and self._down is None:
            if self._core.outputs.poll(POLL_S * 1000):
                while True:
                    try:
                        message = messages.decode(self._core.outputs.recv(zmq.NOBLOCK))
                    except zmq.Again:
                        break
                    if message[0] == "step":
                        self._deliver(message[1])
                        failures = 0
            elif self._core.process.poll() is not None and not self.closed:
                failures = self._restart(failures + 1)

    def _deliver(self, step: messages.Step) -> None:
        """One step's chunks and ends to their streams: one call into each event loop."""
        self.active_requests, self.queued_requests = step.active, step.queued
        if step.stats is not None:
            self.stats = EngineStats(*step.stats)
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for request_id, pcm in step.audio:
            stream = self._streams.get(request_id)
            if stream is not None:
                by_loop[stream.loop].append((stream, np.frombuffer(pcm, dtype=np.float32)))
        for request_id, kind, field, message in step.ended:
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                by_loop[stream.loop].append((stream, messages.error_of(kind, field, message)))
        for loop, items in by_loop.items():
            if not loop.is_closed():
                loop.call_soon_threadsafe(_hand_over, items)

    def _restart(self, attempt: int) -> int:
        """The core died: fail what it held, start a new one (backing off); returns the failures in a row."""
        code = self._core.process.returncode
        self.healthy = False
        held = len(self._streams)
        self._fail_all(EngineFailed(f"the engine core died (exit code {code}) mid-request"))
        self.active_requests = self.queued_requests = 0
        self._core.stop()
        if attempt > self.config.engine.core_restarts:
            self._down = f"the engine core died {attempt} times in a row (last exit code {code}); restart the service"
            logger.error(f"{self}: {self._down}")
            return attempt
        delay = self.config.engine.core_restart_backoff_s * 2 ** (attempt - 1)
        logger.error(
            f"{self}: the engine core died (exit code {code}); {held} requests failed; "
            f"restart {attempt} of {self.config.engine.core_restarts} in {delay:.1f} s"
        )
        time.sleep(delay)
        try:
            self._core = _Core(self._context, self.config)
            self._core.wait_ready()
        except Exception as e:
            logger.error(f"{self}: the engine core did not restart: {e}")
            return attempt
        self.healthy = True
        logger.info(f"{self}: engine core restarted")
        return attempt

    def _fail_all(self, error: BaseException) -> None:
        streams, self._streams = self._streams, {}
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for stream in streams.values():
            by_loop[stream.loop].append((stream, error))
        for loop, items in by_loop.items():
            if not loop.is_closed():
                loop.call_soon_threadsafe(_hand_over, items)

    def __repr__(self) -> str:
        return f"EngineClient(core pid {self._core.process.pid}, {'up' if self.healthy else 'down'})"


def _hand_over(items: list[tuple[AudioStream, np.ndarray | BaseException | None]]) -> None:
    """On a stream's event loop: chunks to their streams, ends (None, or the error) to theirs."""
    for stream, item in items:
        if isinstance(item, np.ndarray):
            stream.put(item)
        else:
            stream.finish(item)


@atexit.register
def _stop_cores() -> None:
    for client in list(_clients):
        client.close()
