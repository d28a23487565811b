"""`pipecat-orpheus serve`: the WebSocket server around a shared `Synthesizer`.

Thin on purpose: `process_request` answers `/healthz` and `/metrics`, 404s any other request
target (taken literally, never resolved as a URL) and checks the API key (401 before the upgrade),
the handler enforces the connection limit, and each accepted stream is run by
`connection.Connection` (its tasks) around a `session.Session` (its rules) on a
`connection.StreamSocket` (which drops a peer that reads nothing). SIGTERM stops accepting, gives
in-flight work `server.shutdown_grace_s`, then closes streams with 1001 within `server.close_timeout_s`.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import hmac
import http
import itertools
import os
import signal
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from urllib.parse import parse_qs

from loguru import logger
from websockets.asyncio.server import Server
from websockets.asyncio.server import serve as ws_serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from pipecat_orpheus.config import Config
from pipecat_orpheus.engine.request import SamplingParams
from pipecat_orpheus.errors import ConfigError
from pipecat_orpheus.speech import Synthesizer, load_synthesizer
from pipecat_orpheus.wire import metrics
from pipecat_orpheus.wire import protocol as p
from pipecat_orpheus.wire.connection import Connection, StreamSocket, peer
from pipecat_orpheus.wire.session import Session
from pipecat_orpheus.wire.slots import ConnectionSlots

STREAM_PATHS = ("/api/tts_streaming", "/ws")  # Kyutai's path, and a short alias
PROBE_PATHS = ("/healthz", "/metrics")  # no parameters: a query string is refused


class OrpheusServer:
    """A running server: its address, its shared synthesizer, its open streams; see `serve`."""

    def __init__(
        self,
        config: Config,
        synthesizer: Synthesizer | None = None,
        *,
        # Network
        host: str | None = None,
        port: int | None = None,
        sock: socket.socket | None = None,
        reuse_port: bool = False,
        slots: ConnectionSlots | None = None,
        # Auth
        api_keys: Sequence[str] | None = None,
    ):
        """Configure a server; `start()` binds it.

        Args:
            config: the whole configuration (`server`, `limits`, `voices`, `sampling` are used).
            synthesizer: the shared speech source; None while it loads (`/healthz` says 503).
            host: overrides `server.host`.
            port: overrides `server.port` (0: any free port; read it back from `port`).
            sock: an already bound, listening socket to serve on instead of host and port
                (socket activation; accepted sockets inherit its options, e.g. SO_SNDBUF).
            reuse_port: bind with SO_REUSEPORT, beside other processes on the same port (`server.workers`).
            slots: the connections held against `limits.max_connections`, shared with those other
                processes (`SharedConnectionSlots`); None: this process's own.
            api_keys: accepted keys; None reads the comma-separated env var `server.api_key_env`.
        """
        self.config = config
        self.synthesizer = synthesizer
        self.host = config.server.host if host is None else host
        self._port = config.server.port if port is None else port
        self._sock = sock
        self._reuse_port = reuse_port
        if api_keys is None:
            api_keys = os.environ.get(config.server.api_key_env, "").split(",")
        # Keys are kept only as digests: compared in constant time, never logged.
        self._key_digests = [_digest(k.strip()) for k in api_keys if k.strip()]
        self._sampling = SamplingParams.from_config(config.sampling)
        self._ws: Server | None = None
        self._streams: set[Connection] = set()
        self._slots = slots or ConnectionSlots(config.limits.max_connections)
        self._ids = itertools.count(1)
        self.draining = False

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind and start accepting; a port in use is a `ConfigError` naming `server.port`."""
        try:
            where = (
                {"sock": self._sock}
                if self._sock is not None
                else {"host": self.host, "port": self._port, "reuse_port": self._reuse_port}
            )
            self._ws = await ws_serve(
                self._handle,
                **where,
                process_request=self._process_request,
                create_connection=StreamSocket,  # drops a peer that reads nothing (pings unanswered included)
                compression=None,  # PCM barely compresses; deflate costs ~300 KiB per connection
                # The hard ceiling: past it, 1009 before buffering. Up to it, the connection checks
                # limits.max_message_bytes itself and answers Error (the stream goes on).
                max_size=self.config.limits.max_frame_bytes,
                # What a client that sends faster than the server reads, or reads slower than it
                # sends, may hold here: past these, reading its socket pauses / a send waits.
                max_queue=self.config.limits.max_incoming_messages,
                write_limit=self.config.limits.max_write_buffer_bytes,
                open_timeout=self.config.limits.handshake_timeout_s,
                ping_interval=self.config.server.ping_interval_s,
                ping_timeout=self.config.server.ping_timeout_s,
                close_timeout=self.config.server.close_timeout_s,
            )
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError("server.port", f"{self.host}:{self._port} is already in use") from e
            raise ConfigError("server.host", f"cannot listen on {self.host}:{self._port}: {e.strerror}") from e
        self.host, self._port = self._ws.sockets[0].getsockname()[:2]
        if not self._key_digests:
            logger.warning(
                f"{self}: NO API KEYS CONFIGURED ({self.config.server.api_key_env} is empty): "
                "anyone who can reach this port may use it"
            )
        logger.info(f"{self}: listening on {self.url}")

    async def shutdown(self, grace_s: float | None = None) -> None:
        """Stop accepting, let streams finish their work for up to `grace_s`, then close them with 1001."""
        if self._ws is None or self.draining:
            return
        self.draining = True  # new handshakes now get 503
        grace = self.config.server.shutdown_grace_s if grace_s is None else grace_s
        busy = [s.idle.wait() for s in self._streams]
        if busy:
            logger.info(f"{self}: shutting down; {len(busy)} streams get up to {grace} s to finish")
            try:
                async with asyncio.timeout(grace):
                    await asyncio.gather(*busy)
            except TimeoutError:
                left = sum(not s.idle.is_set() for s in self._streams)
                logger.warning(f"{self}: {left} streams still busy after {grace} s; cancelling their work")
        self._ws.close()  # closes the listener and every open stream with 1001
        await self._ws.wait_closed()
        logger.info(f"{self}: stopped")

    @property
    def port(self) -> int:
        """The bound port (the real one when configured as 0)."""
        return self._port

    @property
    def url(self) -> str:
        """The stream endpoint, e.g. `ws://127.0.0.1:8000/api/tts_streaming`."""
        return f"ws://{self.host}:{self._port}{STREAM_PATHS[0]}"

    @property
    def open_streams(self) -> int:
        """Streams open right now."""
        return len(self._streams)

    def __str__(self) -> str:
        return "OrpheusServer"

    # -- HTTP, before the upgrade ----------------------------------------------------------------

    def _process_request(self, connection: StreamSocket, request: Request) -> Response | None:
        path, query_string = _split_target(request.path)
        if path in PROBE_PATHS and query_string is not None:
            return _plain(400, f"{path} takes no query\n")
        if path == "/healthz":
            if self.draining:
                return _plain(503, "shutting down\n")
            if self.synthesizer is None:
                return _plain(503, "loading\n")
            return _plain(200, "ok\n") if self.synthesizer.healthy else _plain(503, "engine down\n")
        if path == "/metrics":
            synth = self.synthesizer
            load = (synth.active_requests, synth.queued_requests, synth.engine_stats) if synth else (0, 0, [])
            body, content_type = metrics.render(*load)
            return _plain(200, body.decode(), content_type)
        if path not in STREAM_PATHS:
            return _plain(404, f"not found; the stream is at {STREAM_PATHS[0]}\n")
        if self.draining:
            metrics.CONNECTIONS_TOTAL.labels("shutting_down").inc()
            return _plain(503, "server is shutting down\n")
        query = parse_qs(query_string or "")
        if self._key_digests and not self._authorized(request, query):
            metrics.CONNECTIONS_TOTAL.labels("unauthorized").inc()
            logger.info(f"{self}: refused {peer(connection)}: missing or invalid API key")
            response = _plain(401, "missing or invalid API key\n")
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        fmt = query.get("format", [p.FORMATS[0]])[-1]
        if fmt not in p.FORMATS:
            return _plain(400, f"unsupported format {fmt!r}; supported: {', '.join(p.FORMATS)}\n")
        return None

    def _authorized(self, request: Request, query: dict[str, list[str]]) -> bool:
        """Whether the request offers exactly one key (however often) and it is a configured one.

        Several different keys are refused even if one is right: one request is one guess, not
        a batch of them packed into repeated headers or query parameters. The comparison runs
        against every configured key (constant time).
        """
        offered = [*request.headers.get_all("kyutai-api-key"), *query.get("auth_id", [])]
        for value in request.headers.get_all("Authorization"):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer":
                offered.append(token.strip())
        if len(set(offered)) != 1:
            return False
        digest, ok = _digest(offered[0]), False
        for known in self._key_digests:
            ok |= hmac.compare_digest(digest, known)
        return ok

    # -- one stream ------------------------------------------------------------------------------

    async def _handle(self, ws: StreamSocket) -> None:
        n = next(self._ids)
        if self.synthesizer is None or not self._slots.acquire():
            why = "the model is loading" if self.synthesizer is None else "limits.max_connections reached"
            metrics.CONNECTIONS_TOTAL.labels("busy").inc()
            metrics.ERRORS_TOTAL.labels("busy").inc()
            logger.warning(f"{self}: refused stream {n} from {peer(ws)}: {why}")
            try:
                await ws.send(p.encode(p.Error(f"server at capacity: {why}", code="busy")))
                await ws.close(CloseCode.TRY_AGAIN_LATER, "busy")  # Kyutai: "no free channels"
            except ConnectionClosed:
                pass
            return
        try:
            await self._serve_stream(n, ws)
        finally:
            self._slots.release()

    async def _serve_stream(self, n: int, ws: StreamSocket) -> None:
        """Stream `n`, admitted: its session, its connection, until it closes."""
        limits = self.config.limits
        query = parse_qs(_split_target(ws.request.path)[1] or "")
        voice = query.get("voice", [self.config.voices.default])[-1]
        if voice not in self.config.voices.available:  # e.g. a Kyutai voice path: keep the client working
            logger.warning(f"{self}: stream {n}: unknown voice {voice!r}; using {self.config.voices.default!r}")
            voice = self.config.voices.default
        session = Session(
            limits=limits,
            voices=self.config.voices,
            voice=voice,
            max_chars_per_piece=self.config.engine.max_chars_per_piece,
            sampling=self._sampling,
        )
        pcm16 = query.get("format", [p.FORMATS[0]])[-1] == "Pcm16MessagePack"
        stream = Connection(n, ws, session, self.synthesizer, pcm16=pcm16)
        self._streams.add(stream)
        metrics.CONNECTIONS.inc()
        metrics.CONNECTIONS_TOTAL.labels("accepted").inc()
        logger.debug(f"{self}: stream {n} from {peer(ws)} (voice={voice}, pcm16={pcm16})")
        try:
            await stream.run()
        finally:
            self._streams.discard(stream)
            metrics.CONNECTIONS.dec()
            logger.debug(f"{self}: stream {n} closed ({ws.close_code})")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()  # fixed length, so compare_digest leaks nothing


def _plain(status: int, text: str, content_type: str = "text/plain; charset=utf-8") -> Response:
    body = text.encode()
    headers = [("Connection", "close"), ("Content-Length", str(len(body))), ("Content-Type", content_type)]
    return Response(status, http.HTTPStatus(status).phrase, Headers(headers), body)


def _split_target(target: str) -> tuple[str, str | None]:
    """(path, query or None) of a request target, taken literally: `//x/ws` is the path `//x/ws`.

    Not `urlsplit`: it reads `//host/path` as a host and a path (so `//x/ws` would reach `/ws` past
    a proxy's path rules) and raises on `//[`, which websockets would answer with a 500 and a traceback.
    """
    path, sep, query = target.partition("?")
    return path, query if sep else None


@asynccontextmanager
async def serve(
    config: Config,
    synthesizer: Synthesizer | None,
    *,
    # Network
    host: str | None = None,
    port: int | None = None,
    sock: socket.socket | None = None,
    # Auth
    api_keys: Sequence[str] | None = None,
) -> AsyncIterator[OrpheusServer]:
    """Serve `synthesizer` while the context is open, then shut down gracefully (tests: `port=0`).

    Args are those of `OrpheusServer`.
    """
    server = OrpheusServer(config, synthesizer, host=host, port=port, sock=sock, api_keys=api_keys)
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown()


def run(config: Config) -> None:
    """Bind, load the speech source (off the event loop), serve until SIGTERM/SIGINT, then drain.

    With `server.workers` > 1: that many server processes around one engine core (`workers.py`).
    """
    if config.server.workers > 1:
        from pipecat_orpheus.wire import workers

        workers.run(config)
    else:
        asyncio.run(run_server(config, load_synthesizer))


async def run_server(
    config: Config,
    open_speech: Callable[[Config], Synthesizer],
    *,
    reuse_port: bool = False,
    slots: ConnectionSlots | None = None,
) -> None:
    """One server process: bind, `open_speech(config)` off the event loop, serve until a signal, drain.

    `reuse_port` and `slots` are `OrpheusServer`'s, for one of several workers on the port.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = OrpheusServer(config, reuse_port=reuse_port, slots=slots)
    # Bind first, so a port in use fails before a long model load; but a worker beside others on the
    # port (reuse_port) listens only once it can speak, or the kernel would hand it connections to refuse.
    if not reuse_port:
        await server.start()
    synthesizer = None
    try:
        synthesizer = await asyncio.to_thread(open_speech, config)
        server.synthesizer = synthesizer
        if reuse_port:
            await server.start()
        logger.info(f"{server}: ready")
        await stop.wait()
        logger.info(f"{server}: signal received, shutting down")
    finally:
        await server.shutdown()
        if synthesizer is not None:
            synthesizer.close()
