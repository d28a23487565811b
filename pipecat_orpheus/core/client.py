"""`EngineClient`: the engine core as a `Backend`, in the process of the server or the bot.

`EngineClient.start(config)` launches a core (`CoreProcess`: `python -m pipecat_orpheus.core.process`)
as a child process and waits until it beats; `EngineClient.attach(config, addresses)` joins a
core another process started (the workers of `serve --workers`). The tokenizer is loaded here,
so prompts are built where the text arrives. A receiver thread reads the core's one message
per step and hands each event loop its streams' chunks in one wake-up. When the core dies
(its process exits, or its beats stop), every request in flight ends with `EngineFailed` and
`healthy` turns False until a core beats again: the owner restarts it (`engine.core_restarts`
times in a row, backing off), so a server answers 503 on /healthz meanwhile and 200 once it
is back. A core stops with its owner, at interpreter exit, and on its own when that process is
killed.
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

POLL_S = 0.1  # the receiver's wait between looks at whether the core is still there
SILENT_S = 60 * messages.BEAT_S  # a core whose process lives but that has not beaten for this long is hung
STOP_WAIT_S = 10.0  # a stopping core gets this long to exit before it is killed

_owned: weakref.WeakSet[CoreProcess] = weakref.WeakSet()


class CoreProcess:
    """A core process this process started, in a directory of its own; restartable at the same addresses."""

    def __init__(self, config: Config):
        self.config = config
        self.addresses = messages.Addresses(Path(tempfile.mkdtemp(prefix="orpheus-core-")))
        (self.addresses.directory / "config.json").write_text(messages.config_to_json(config))
        self.process: subprocess.Popen | None = None
        self.spawn()
        _owned.add(self)

    def spawn(self) -> None:
        """Start the core process (loading takes seconds to minutes; it beats once it serves)."""
        (self.addresses.directory / messages.FAILED).unlink(missing_ok=True)
        command = [
            sys.executable, "-m", "pipecat_orpheus.core.process",
            "--dir", str(self.addresses.directory), "--parent", str(os.getpid()),
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL)

    @property
    def alive(self) -> bool:
        """Whether the process runs."""
        return self.process is not None and self.process.poll() is None

    def start_error(self) -> BaseException:
        """Why the process exited while starting: what it left behind, or its exit code."""
        return messages.read_failure(self.addresses.directory) or ModelLoadError(
            f"the engine core exited with code {self.process.returncode} while starting (its log is above)"
        )

    def stop(self, requests: zmq.Socket | None = None) -> None:
        """Ask the core to stop (on `requests`, if given), kill it if it does not, and remove its directory."""
        self.kill(requests)
        shutil.rmtree(self.addresses.directory, ignore_errors=True)

    def kill(self, requests: zmq.Socket | None = None) -> None:
        """Stop the process now (gracefully first when a requests socket is given)."""
        if not self.alive:
            return
        if requests is not None:
            try:
                requests.send(messages.STOP, zmq.NOBLOCK)
                self.process.wait(STOP_WAIT_S)
                return
            except (zmq.ZMQError, subprocess.TimeoutExpired):
                pass
        self.process.kill()
        self.process.wait()


class EngineClient:
    """A `Backend` whose engine runs in an engine core process; see the module docstring.

    Args:
        config: the whole configuration (the core loads `model`, `engine`, `codec`; restarts follow `engine`).
        addresses: the core's sockets.
        owner: the core's process when this client started it (it then restarts it when it dies).
    """

    def __init__(self, config: Config, addresses: messages.Addresses, owner: CoreProcess | None = None):
        self.config = config
        self.addresses = addresses
        self.owner = owner
        self.tokenizer = None  # loaded while the core loads the model
        self.closed = False
        self.healthy = False  # a core beats and serves
        self.active_requests = 0  # as the core last reported
        self.queued_requests = 0
        self.stats: EngineStats | None = None  # the core's engine counters, as of its last beat
        self._core_pid: int | None = None  # the core this client's requests go to
        self._last_beat = time.monotonic()
        self._down: str | None = None  # why the engine is down for good (restarts spent)
        self._name = f"p{os.getpid()}-{id(self):x}"  # this client's topic on the core's PUB socket
        self._streams: dict[str, AudioStream] = {}
        self._ids = itertools.count()
        self._context = zmq.Context()
        self._send_lock = threading.Lock()  # the requests socket is used from any event loop's thread
        self._requests = self._context.socket(zmq.PUSH)
        self._requests.setsockopt(zmq.SNDHWM, 0)
        self._requests.setsockopt(zmq.LINGER, 0)
        self._requests.connect(addresses.requests)
        self._outputs = self._context.socket(zmq.SUB)
        self._outputs.setsockopt(zmq.RCVHWM, 0)
        self._outputs.setsockopt(zmq.SUBSCRIBE, messages.topic(self._name))  # before BROADCAST: a beat
        self._outputs.setsockopt(zmq.SUBSCRIBE, messages.BROADCAST)  # heard means both are in place
        self._outputs.connect(addresses.outputs)
        self._receiver: threading.Thread | None = None

    @classmethod
    def start(cls, config: Config) -> EngineClient:
        """Start a core of its own and wait until it serves (blocking: minutes on a cold GPU)."""
        return cls.start_all([config])[0]

    @classmethod
    def start_all(cls, configs: list[Config]) -> list[EngineClient]:
        """A core per configuration, loading side by side; returns once every one serves."""
        owners = [CoreProcess(config) for config in configs]  # each starts loading now
        clients = [cls(config, owner.addresses, owner) for config, owner in zip(configs, owners, strict=True)]
        try:
            for client in clients:
                client._open()
        except BaseException:
            for client in clients:
                if client._receiver is not None:  # it serves: stop it as any owner does
                    client.close()
                else:
                    client._context.destroy(linger=0)
                    client.owner.stop()
            raise
        return clients

    @classmethod
    def attach(cls, config: Config, addresses: messages.Addresses) -> EngineClient:
        """Join a core another process started and owns (blocking until it beats)."""
        client = cls(config, addresses)
        client._open()
        return client

    def _open(self) -> None:
        from pipecat_orpheus.loader import load_tokenizer

        self.tokenizer = load_tokenizer(self.config.model.llm)
        while not self._hear(POLL_S):
            if self.owner is not None and not self.owner.alive:
                raise self.owner.start_error()
        logger.info(f"{self}: engine core ready")
        self._receiver = threading.Thread(target=self._receive, name="orpheus-core-receiver", daemon=True)
        self._receiver.start()

    # -- Backend -------------------------------------------------------------------------------

    def submit_prompts(self, prompts: list[list[int]], sampling: SamplingParams) -> AudioStream:
        """Speak `prompts` as one stream read on the running event loop; refusals end the stream."""
        if self.closed:
            raise EngineClosed("the Orpheus engine is closed")
        if self._down is not None:
            raise EngineFailed(self._down)
        if not self.healthy:
            raise EngineBusy("the engine core is restarting; try again shortly")
        stream = AudioStream(f"{self._name}/{next(self._ids)}", asyncio.get_running_loop(), self._cancel)
        self._streams[stream.request_id] = stream
        self._send(messages.submit(self._core_pid, stream.request_id, prompts, sampling))
        return stream

    @property
    def load(self) -> int:
        """Requests the core holds: as its last beat counted every client's, or this client's in flight if more."""
        return max(self.active_requests + self.queued_requests, len(self._streams))

    @property
    def engine_stats(self) -> list[EngineStats]:
        """The core's engine counters as of its last beat (none for the reference path)."""
        return [self.stats] if self.stats is not None else []

    def close(self) -> None:
        """Stop listening (and stop the core if this client started it); streams in flight end cancelled."""
        if self.closed:
            return
        self.closed = True
        self.healthy = False
        if self._receiver is not None:
            self._receiver.join()
        if self.owner is not None:
            self.owner.stop(self._requests)
        self._fail_all(RequestCancelled("the Orpheus engine is closed"))
        self._context.destroy(linger=0)

    def _cancel(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None and self.healthy:
            self._send(messages.cancel(self._core_pid, request_id))

    def _send(self, data: bytes) -> None:
        with self._send_lock:
            self._requests.send(data)

    # -- the receiver thread -------------------------------------------------------------------

    def _receive(self) -> None:
        failures = 0
        while not self.closed and self._down is None:
            if self._hear(POLL_S):
                failures = 0
            elif self.owner is not None and not self.owner.alive:
                failures = self._restart(failures + 1)
            elif self.healthy and not _exists(self._core_pid):  # another process owns it and restarts it
                self._lost(f"the engine core (pid {self._core_pid}) is gone")
            elif self.healthy and time.monotonic() - self._last_beat > SILENT_S:
                self._lost(f"the engine core has been silent for {SILENT_S:.0f} s")

    def _hear(self, timeout_s: float) -> bool:
        """Handle what the core sent within `timeout_s`; whether a beat came."""
        beat = False
        if not self._outputs.poll(timeout_s * 1000):
            return False
        while True:
            try:
                _, data = self._outputs.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return beat
            message = messages.decode(data)
            if message[0] == "step":
                self._deliver(message[1], message[2])
            elif message[0] == "beat":
                beat = True
                self._beat(message[1])

    def _beat(self, beat: messages.Beat) -> None:
        self._last_beat = time.monotonic()
        self.active_requests, self.queued_requests = beat.active, beat.queued
        if beat.stats is not None:
            self.stats = EngineStats(*beat.stats)
        if beat.pid != self._core_pid:  # a new core: what the old one held is lost
            if self._core_pid is not None:
                self._lost(f"the engine core was replaced (pid {self._core_pid} -> {beat.pid})")
            self._core_pid = beat.pid
        self.healthy = True

    def _deliver(self, audio: list, ended: list) -> None:
        """One step's chunks and ends to their streams: one call into each event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for request_id, pcm in audio:
            stream = self._streams.get(request_id)
            if stream is not None:
                by_loop[stream.loop].append((stream, np.frombuffer(pcm, dtype=np.float32)))
        for request_id, kind, field, message in ended:
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                by_loop[stream.loop].append((stream, messages.error_of(kind, field, message)))
        _hand_over(by_loop)

    def _lost(self, why: str) -> None:
        """The core is gone: fail what it held; healthy again when a core beats."""
        self.healthy = False
        held = len(self._streams)
        self._fail_all(EngineFailed(f"{why} mid-request"))
        self.active_requests = self.queued_requests = 0
        logger.error(f"{self}: {why}; {held} requests failed")

    def _restart(self, attempt: int) -> int:
        """The core this client started died: restart it, backing off; returns the failures in a row."""
        code = self.owner.process.returncode
        self._lost(f"the engine core died (exit code {code})")
        self._core_pid = None
        if attempt > self.config.engine.core_restarts:
            self._down = f"the engine core died {attempt} times in a row (last exit code {code}); restart the service"
            logger.error(f"{self}: {self._down}")
            return attempt
        delay = self.config.engine.core_restart_backoff_s * 2 ** (attempt - 1)
        logger.error(f"{self}: restart {attempt} of {self.config.engine.core_restarts} in {delay:.1f} s")
        time.sleep(delay)
        self.owner.spawn()
        while self.owner.alive and not self._hear(POLL_S):
            pass
        if self.owner.alive:
            logger.info(f"{self}: engine core restarted")
        else:
            logger.error(f"{self}: the engine core did not restart: {self.owner.start_error()}")
        return attempt

    def _fail_all(self, error: BaseException) -> None:
        streams, self._streams = self._streams, {}
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for stream in streams.values():
            by_loop[stream.loop].append((stream, error))
        _hand_over(by_loop)

    def __repr__(self) -> str:
        return f"EngineClient(core pid {self._core_pid}, {'up' if self.healthy else 'down'})"


def _exists(pid: int) -> bool:
    """Whether process `pid` is still there (a zombie not yet reaped by its owner counts as gone soon after)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _hand_over(by_loop: dict[asyncio.AbstractEventLoop, list]) -> None:
    """Each event loop gets its streams' items in one call: chunks, and ends (None, or the error)."""
    for loop, items in by_loop.items():
        if not loop.is_closed():
            loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[AudioStream, np.ndarray | BaseException | None]]) -> None:
    for stream, item in items:
        if isinstance(item, np.ndarray):
            stream.put(item)
        else:
            stream.finish(item)


@atexit.register
def _stop_cores() -> None:
    for core in list(_owned):
        core.stop()
