"""`OrpheusClient`: an asyncio client of the Orpheus WebSocket protocol (PROTOCOL.md).

Used by the remote mode of the Pipecat service, and usable on its own. One connection carries
many utterances: `speak()` returns an `Utterance` whose audio arrives as float32 chunks as the
server decodes them; `cancel()` is barge-in; `marker()` waits until the audio before it has
been sent. If the connection drops between utterances, the next call reconnects with backoff
(`connect`; `open` is a single attempt). `ready` is the server's `Ready`: the voices and sampling
an Orpheus server offers.
Refusals are typed: `AuthError` (401), `EngineBusy` (server at capacity, or one utterance
refused), `ConnectionError` naming the URL when the server cannot be reached.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict, deque
from http import HTTPStatus
from urllib.parse import urlencode, urlsplit, urlunsplit

import numpy as np
from loguru import logger
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.frames import CloseCode

from pipecat_orpheus.errors import AuthError, EngineBusy, ProtocolError
from pipecat_orpheus.format import SAMPLE_RATE
from pipecat_orpheus.wire import protocol as p

DEFAULT_PATH = "/api/tts_streaming"


class Utterance:
    """One utterance's audio as an async iterator of float32 (n,) chunks at 24 kHz.

    Iteration ends at `Done` (or `Cancelled`: then `cancelled` is True), whose reason is then
    `stop_reason`; a server `Error` for it raises `EngineBusy` or `ProtocolError`; a dropped
    connection raises `ConnectionError`.
    """

    def __init__(self, id: p.MessageId | None):
        self.id = id
        self.words: list[p.Word] = []  # word timings on the connection's audio timeline
        self.start_s: float | None = None  # where its first audio sits on that timeline
        self.cancelled = False
        self.finished = False
        self.stop_reason: str | None = None  # Done's reason: end_of_speech, max_tokens, duration, loop (None: not said)
        self._queue: asyncio.Queue[np.ndarray | BaseException | None] = asyncio.Queue()

    def word_times(self) -> list[tuple[str, float]]:
        """(word, start in seconds from this utterance's first audio) for the words received so far."""
        origin = self.start_s or 0.0
        return [(w.text, max(0.0, w.start_s - origin)) for w in self.words]

    def __aiter__(self) -> Utterance:
        return self

    async def __anext__(self) -> np.ndarray:
        item = await self._queue.get()
        if item is None:
            self._queue.put_nowait(None)  # stay ended for later readers
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._queue.put_nowait(item)
            raise item
        return item

    async def read_all(self) -> np.ndarray:
        """Every remaining sample, concatenated."""
        chunks = [chunk async for chunk in self]
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)

    def stop(self) -> None:
        """End the iteration here, as cancelled, without telling the server (`OrpheusClient.cancel` does)."""
        self.cancelled = True
        self._end()

    def _end(self, error: BaseException | None = None) -> None:
        if not self.finished:
            self.finished = True
            self._queue.put_nowait(error)


class OrpheusClient:
    """A connection to an Orpheus (or Kyutai-compatible) TTS server; see the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        # Auth
        api_key: str | None = None,
        # Stream
        voice: str | None = None,
        format: str = "Pcm16MessagePack",
        # Timeouts
        open_timeout_s: float = 10.0,
        reply_timeout_s: float = 10.0,
        # Reconnection
        max_retries: int = 3,
        backoff_s: float = 0.1,
        max_backoff_s: float = 2.0,
    ):
        """Configure a client; nothing connects until `connect()` or the first call that sends.

        Args:
            url: `ws(s)://` or `http(s)://` server address; the path defaults to `/api/tts_streaming`.
            api_key: sent as the `kyutai-api-key` header.
            voice: the connection's default voice (query `voice`).
            format: `Pcm16MessagePack` (int16 on the wire, default) or `PcmMessagePack` (float32).
            open_timeout_s: limit for the handshake plus `Ready` (raise it for cold starts).
            reply_timeout_s: limit for a `Marker` echo or a `Cancelled` answer.
            max_retries: extra connection attempts after a failure (not after a 401).
            backoff_s: first delay between attempts; doubles each time (`RemoteSynthesizer`'s
                reconnecting too).
            max_backoff_s: the longest delay between attempts.
        """
        if format not in p.FORMATS:
            raise ValueError(f"format must be one of {', '.join(p.FORMATS)}, got {format!r}")
        self.url = _stream_url(url, voice=voice, format=format)
        self._api_key = api_key
        self._open_timeout_s = open_timeout_s
        self._reply_timeout_s = reply_timeout_s
        self._max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.ready: p.Ready | None = None  # the Ready of the connection open now (or the last one)
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task | None = None
        self._utterances: dict[p.MessageId | None, Utterance] = {}
        self._markers: dict[p.MessageId, deque[asyncio.Future]] = defaultdict(deque)
        self._cancels: dict[p.MessageId | None, deque[asyncio.Future]] = defaultdict(deque)
        self._ids = itertools.count(1)
        self._received_samples = 0  # the connection's audio timeline, as the server counts it

    # -- connection ------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether a connection is open now."""
        return self._reader is not None and not self._reader.done()

    async def connect(self) -> None:
        """Open the connection (retrying with backoff); no-op when already open."""
        delay = self.backoff_s
        for attempt in range(self._max_retries + 1):
            try:
                await self.open()
                return
            except (ConnectionError, EngineBusy) as e:
                if attempt == self._max_retries:
                    raise
                logger.warning(f"{self}: {e}; retrying in {delay:.2f} s")
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff_s)

    async def open(self) -> None:
        """One attempt to open the connection (`AuthError`, `EngineBusy`, `ConnectionError`); no-op when open."""
        if self.connected:
            return
        headers = {"kyutai-api-key": self._api_key} if self._api_key else None
        try:
            async with asyncio.timeout(self._open_timeout_s):
                ws = await connect(self.url, additional_headers=headers, open_timeout=None, compression=None)
                try:
                    first = p.decode_server(await ws.recv())
                except BaseException:
                    await ws.close()
                    raise
        except InvalidStatus as e:
            if e.response.status_code == HTTPStatus.UNAUTHORIZED:
                raise AuthError(f"{self.url}: the server refused the API key (HTTP 401)") from None
            raise ConnectionError(f"{self.url}: the server refused the connection: {e}") from None
        except InvalidURI:
            raise
        except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as e:
            raise ConnectionError(f"cannot reach {self.url}: {e or type(e).__name__}") from e
        if isinstance(first, p.Error):
            await ws.close()
            if first.code == EngineBusy.code:
                raise EngineBusy(f"{self.url}: {first.message}")
            raise ProtocolError(f"{self.url}: {first.message}", code=first.code or "internal")
        if not isinstance(first, p.Ready):
            await ws.close()
            raise ProtocolError(f"{self.url}: expected Ready first, got {first.type}")
        self._ws, self.ready = ws, first
        self._received_samples = 0
        self._reader = asyncio.create_task(self._read(ws), name="orpheus-client-read")

    async def wait_closed(self) -> None:
        """Return once the connection open now has closed (at once when none is open)."""
        if self._reader is not None:
            await asyncio.shield(self._reader)

    async def close(self) -> None:
        """Close the connection; unfinished utterances end with `ConnectionError`."""
        ws, reader = self._ws, self._reader
        self._ws = None
        if ws is not None:
            await ws.close()
        if reader is not None:
            await reader

    async def __aenter__(self) -> OrpheusClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- sending ---------------------------------------------------------------------------------

    async def speak(
        self,
        text: str,
        *,
        voice: str | None = None,
        id: p.MessageId | None = None,
        sampling: dict[str, float | int] | None = None,
    ) -> Utterance:
        """Queue one utterance; iterate the returned `Utterance` for its audio.

        `sampling` overrides the server's for this utterance (keys: `protocol.SAMPLING_FIELDS`).
        """
        id = f"u{next(self._ids)}" if id is None else id
        utterance = Utterance(id)
        await self.connect()
        self._utterances[id] = utterance
        try:
            await self._send(p.Speak(text, voice=voice, id=id, sampling=sampling))
        except ConnectionError:
            self._utterances.pop(id, None)
            raise
        return utterance

    def stream(self) -> Utterance:
        """The audio of `send_text` input (no id); it ends when the server closes after `eos()`."""
        if None not in self._utterances:
            self._utterances[None] = Utterance(None)
        return self._utterances[None]

    async def send_text(self, text: str) -> None:
        """Kyutai-style streamed words; the server speaks each sentence as soon as it is complete."""
        await self.connect()
        self.stream()
        await self._send(p.Text(text))

    async def flush(self) -> None:
        """Speak the words sent so far without ending the input."""
        await self._send(p.Flush())

    async def eos(self) -> None:
        """End the input: the server speaks what is buffered, sends all audio and closes."""
        await self._send(p.Eos())

    async def marker(self, id: p.MessageId | None = None) -> None:
        """Return once all audio for everything sent before this call has been received."""
        id = f"m{next(self._ids)}" if id is None else id
        await self.connect()
        waiter = asyncio.get_running_loop().create_future()
        self._markers[id].append(waiter)
        await self._send(p.Marker(id))
        async with asyncio.timeout(self._reply_timeout_s):
            await waiter

    async def cancel(self, id: p.MessageId | None = None) -> None:
        """Barge-in: stop utterance `id` (None: everything) and wait until the server confirms."""
        if not self.connected:
            for utterance in [u for key, u in self._utterances.items() if id is None or key == id]:
                utterance.stop()
            return
        waiter = asyncio.get_running_loop().create_future()
        self._cancels[id].append(waiter)
        await self._send(p.Cancel(id))
        async with asyncio.timeout(self._reply_timeout_s):
            await waiter

    async def _send(self, message: object) -> None:
        if self._ws is None:
            raise ConnectionError(f"{self.url}: not connected")
        try:
            await self._ws.send(p.encode(message))
        except ConnectionClosed as e:
            raise ConnectionError(f"{self.url}: connection closed: {e}") from e

    # -- receiving -------------------------------------------------------------------------------

    async def _read(self, ws: ClientConnection) -> None:
        error: BaseException | None = None
        try:
            async for data in ws:
                try:
                    self._dispatch(p.decode_server(data))
                except ProtocolError as e:
                    logger.warning(f"{self}: ignoring a malformed server message: {e}")
        except ConnectionClosed as e:
            error = e
        normal = ws.close_code == CloseCode.NORMAL_CLOSURE
        for id, utterance in list(self._utterances.items()):
            if id is None and normal:
                utterance._end()  # Kyutai style: a normal close after Eos ends the stream
            else:
                reason = f"code {ws.close_code} {ws.close_reason or ''}".strip() if error is None else str(error)
                utterance._end(ConnectionError(f"{self.url}: connection closed mid-utterance ({reason})"))
        self._utterances.clear()
        for waiters in (*self._markers.values(), *self._cancels.values()):
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(ConnectionError(f"{self.url}: connection closed"))
        self._markers.clear()
        self._cancels.clear()

    def _dispatch(self, message: p.ServerMessage) -> None:
        if isinstance(message, p.Audio):
            utterance = self._utterances.get(message.id)
            if utterance is not None:
                if utterance.start_s is None:
                    utterance.start_s = self._received_samples / SAMPLE_RATE
                utterance._queue.put_nowait(message.pcm)
            self._received_samples += len(message.pcm)
        elif isinstance(message, p.Word):
            utterance = self._utterances.get(message.id)
            if utterance is not None:
                utterance.words.append(message)
        elif isinstance(message, p.Done):
            utterance = self._utterances.pop(message.id, None)
            if utterance is not None:
                utterance.stop_reason = message.reason
                utterance._end()
        elif isinstance(message, p.Marker):
            _resolve(self._markers, message.id)
        elif isinstance(message, p.Cancelled):
            for id in [k for k in self._utterances if message.id is None or k == message.id]:
                self._utterances.pop(id).stop()
            _resolve(self._cancels, message.id)
        elif isinstance(message, p.Error):
            utterance = self._utterances.pop(message.id, None) if message.id is not None else None
            if utterance is None:
                logger.warning(f"{self}: server error: {message.message} ({message.code})")
            elif message.code == EngineBusy.code:
                utterance._end(EngineBusy(message.message))
            else:
                utterance._end(ProtocolError(message.message, code=message.code or "internal"))

    def __str__(self) -> str:
        return f"OrpheusClient({urlsplit(self.url).netloc})"


def _resolve(waiters: dict, id: p.MessageId | None) -> None:
    queue = waiters.get(id)
    while queue:
        waiter = queue.popleft()
        if not waiter.done():
            waiter.set_result(None)
            break


def _stream_url(url: str, *, voice: str | None, format: str) -> str:
    """`url` as a ws(s) stream URL with the default path and our query added."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise ValueError(f"the server URL must start with ws://, wss://, http:// or https://, got {url!r}")
    path = parts.path if parts.path not in ("", "/") else DEFAULT_PATH
    query = {"format": format, **({"voice": voice} if voice else {})}
    extra = f"&{parts.query}" if parts.query else ""
    return urlunsplit((scheme, parts.netloc, path, urlencode(query) + extra, ""))
