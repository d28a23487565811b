"""`RemoteSynthesizer`: an Orpheus server as a `Synthesizer`, so the Pipecat service has one code path.

One connection per synthesizer, opened by `start()` and kept open until `aclose()`: when it
drops (the server restarted, a Modal container was replaced, an idle proxy closed it) it is
reopened in the background with backoff, for as long as it takes; only a refused API key stops
that. `on_event` hears each change (`connected` with the server's `Ready`, `disconnected`,
`connection_error` with the exception), as Pipecat's websocket services fire theirs.

Each `submit` becomes one `Speak` on that connection, and its stream reads like the engine's
`AudioStream`: float32 PCM chunks at 24 kHz, `cancel()` taking effect at once (the server's
`Cancelled` is not waited for). While the server cannot be reached, a stream fails at once with
`ConnectionError` (one connection attempt, shared with whoever else is trying, and no retries);
an utterance whose connection drops before any of its audio arrived is sent once more.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncGenerator, Awaitable, Callable

import numpy as np
from loguru import logger

from pipecat_orpheus.engine.request import SamplingParams
from pipecat_orpheus.errors import AuthError, EngineBusy, EngineClosed, ProtocolError
from pipecat_orpheus.wire import protocol as p
from pipecat_orpheus.wire.client import OrpheusClient, Utterance

# `connected` (with the server's Ready), `disconnected` (None) or `connection_error` (the exception).
EventCallback = Callable[[str, object], Awaitable[None]]
_ATTEMPT_ERRORS = (AuthError, ConnectionError, EngineBusy, ProtocolError)  # what one connection attempt may raise


class RemoteSynthesizer:
    """The utterances of one service on one kept-open server connection; see the module docstring."""

    def __init__(self, client: OrpheusClient, *, on_event: EventCallback | None = None):
        """Wrap `client`; nothing connects until `start()` or the first utterance.

        Args:
            client: the connection's client; its `backoff_s` and `max_backoff_s` pace reconnection.
            on_event: awaited on each connection change, with the event's name and its detail.
        """
        self.client = client
        self.closed = False
        self._on_event = on_event
        self._ids = itertools.count()
        self._streams: set[RemoteStream] = set()
        self._cancels: set[asyncio.Task] = set()  # Cancel messages on their way
        self._opening: asyncio.Task | None = None  # the connection attempt under way
        self._keeper: asyncio.Task | None = None
        self._up = False  # `connected` was reported for the connection open now

    async def start(self) -> None:
        """Connect now, then keep the connection open until `aclose()`.

        Raises what the first attempt met; reconnecting goes on in the background unless the
        server refused the API key (`AuthError`).
        """
        try:
            await self.connect()
        except AuthError:
            raise
        except _ATTEMPT_ERRORS:
            self._keep_open()
            raise
        self._keep_open()

    async def connect(self) -> None:
        """One attempt to open the connection, shared by everyone asking at the same time; no-op when open."""
        if self.client.connected:
            return
        if self.closed:
            raise EngineClosed(f"{self} is closed")
        if self._opening is None:
            self._opening = asyncio.create_task(self._open(), name="orpheus-remote-open")
            self._opening.add_done_callback(_retrieve)
        opening = self._opening
        await asyncio.wait([opening])  # a caller cancelled meanwhile leaves the attempt to the others
        if opening.cancelled():
            raise ConnectionError(f"{self.client}: closed while connecting")
        opening.result()

    def submit(self, text: str, *, voice: str | None = None, sampling: SamplingParams | None = None) -> RemoteStream:
        """Start speaking `text` on the server; refusals (`EngineBusy`, ...) arrive while iterating.

        `sampling` is sent as the utterance's own (the server checks it against its limits);
        None leaves the server's.
        """
        if self.closed:
            raise EngineClosed(f"{self} is closed")
        fields = None if sampling is None else {name: getattr(sampling, name) for name in p.SAMPLING_FIELDS}
        stream = RemoteStream(self, text, voice, fields, f"s{next(self._ids)}")
        self._streams.add(stream)
        return stream

    @property
    def active_requests(self) -> int:
        """Utterances started and not yet finished or cancelled."""
        return len(self._streams)

    @property
    def healthy(self) -> bool:
        """Whether the connection is open (the server's own health is on its /healthz)."""
        return self.client.connected

    @property
    def engine_stats(self) -> list:
        """None here (an empty list): the server's engine counters are on its /metrics."""
        return []

    @property
    def queued_requests(self) -> int:
        """Always 0: the queue is the server's (see its /metrics)."""
        return 0

    def close(self) -> None:
        """Cancel every utterance in flight and stop reconnecting; `aclose()` also closes the connection."""
        self.closed = True
        for task in (self._keeper, self._opening):
            if task is not None:
                task.cancel()
        for stream in list(self._streams):
            stream.cancel()

    async def aclose(self) -> None:
        """Cancel everything, close the connection (the server then cancels what it still had)."""
        self.close()
        await asyncio.gather(*(t for t in (self._keeper, self._opening) if t is not None), return_exceptions=True)
        await self.client.close()
        await asyncio.gather(*self._cancels)  # they end with the connection, confirmed or not
        if self._up:
            self._up = False
            await self._event("disconnected", None)

    # -- the connection ----------------------------------------------------------------------------

    async def _open(self) -> None:
        try:
            await self.client.open()
        except _ATTEMPT_ERRORS as e:
            await self._event("connection_error", e)
            raise
        finally:
            self._opening = None
        self._up = True
        await self._event("connected", self.client.ready)

    def _keep_open(self) -> None:
        if self._keeper is None and not self.closed:
            self._keeper = asyncio.create_task(self._keep(), name="orpheus-remote-keeper")

    async def _keep(self) -> None:
        """Reopen the connection whenever it drops, waiting longer after each failure, until closed."""
        loop = asyncio.get_running_loop()
        delay = self.client.backoff_s
        while True:
            opened = loop.time()
            await self.client.wait_closed()  # at once when no connection is open
            if self._up:
                self._up = False
                await self._event("disconnected", None)
                if loop.time() - opened > self.client.max_backoff_s:  # it had stayed up: start over from quick
                    delay = self.client.backoff_s
            await asyncio.sleep(delay)
            delay = min(2 * delay, self.client.max_backoff_s)
            try:
                await self.connect()
            except AuthError:
                logger.error(f"{self.client}: the server refused the API key; no longer reconnecting")
                return
            except (ConnectionError, EngineBusy, ProtocolError) as e:
                logger.warning(f"{self.client}: reconnecting failed ({e}); next try in {delay:.1f} s")

    async def _event(self, name: str, detail: object) -> None:
        if self._on_event is not None:
            await self._on_event(name, detail)

    # -- cancel ------------------------------------------------------------------------------------

    def _send_cancel(self, request_id: str) -> None:
        if self.client.connected:
            task = asyncio.get_running_loop().create_task(self._cancel(request_id))
            self._cancels.add(task)
            task.add_done_callback(self._cancels.discard)

    async def _cancel(self, request_id: str) -> None:
        try:
            await self.client.cancel(request_id)
        except (ConnectionError, TimeoutError) as e:  # a closed connection has cancelled it anyway
            logger.debug(f"{self}: Cancel {request_id} not confirmed: {e}")

    def __repr__(self) -> str:
        return f"RemoteSynthesizer({self.client})"


def _retrieve(task: asyncio.Task) -> None:
    """Mark a shared attempt's failure as seen, even when every caller waiting for it has gone."""
    if not task.cancelled():
        task.exception()


class RemoteStream:
    """One utterance's audio from the server, as an async iterator of float32 (n,) chunks."""

    def __init__(
        self,
        synth: RemoteSynthesizer,
        text: str,
        voice: str | None,
        sampling: dict[str, float | int] | None,
        request_id: str,
    ):
        self.request_id = request_id
        self.cancelled = False
        self._synth = synth
        self._utterance: Utterance | None = None
        self._chunks = self._receive(text, voice, sampling)

    @property
    def stop_reason(self) -> str | None:
        """Why the utterance's audio ended (the server's `Done.reason`), once it has."""
        return self._utterance.stop_reason if self._utterance is not None else None

    def __aiter__(self) -> RemoteStream:
        return self

    async def __anext__(self) -> np.ndarray:
        if self.cancelled:
            raise StopAsyncIteration
        try:
            pcm = await anext(self._chunks)
        except BaseException:
            self._synth._streams.discard(self)
            raise
        if self.cancelled:
            raise StopAsyncIteration
        return pcm

    async def _receive(
        self, text: str, voice: str | None, sampling: dict[str, float | int] | None
    ) -> AsyncGenerator[np.ndarray, None]:
        client = self._synth.client
        for attempt in range(2):
            await self._synth.connect()  # raises at once when the server cannot be reached
            heard = False
            try:
                self._utterance = await client.speak(text, voice=voice, id=self.request_id, sampling=sampling)
                if self.cancelled:  # cancelled while the Speak was on its way
                    self._synth._send_cancel(self.request_id)
                    return
                async for pcm in self._utterance:
                    heard = True
                    yield pcm
                return
            except ConnectionError as e:
                if heard or attempt:
                    raise
                logger.info(f"{client}: connection lost before any audio ({e}); sending the utterance again")

    def cancel(self) -> None:
        """Stop now: iteration ends at once and the server is sent `Cancel{id}`."""
        if self.cancelled:
            return
        self.cancelled = True
        self._synth._streams.discard(self)
        if self._utterance is not None and not self._utterance.finished:
            self._utterance.stop()
            self._synth._send_cancel(self.request_id)

    async def aclose(self) -> None:
        """Cancel unless finished."""
        self.cancel()
        await self._chunks.aclose()
