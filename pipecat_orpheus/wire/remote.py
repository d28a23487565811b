"""`RemoteSynthesizer`: an Orpheus server as a `Synthesizer`, so the Pipecat service has one code path.

Each `submit` becomes one `Speak` on the shared connection of an `OrpheusClient`, and its stream
reads like the engine's `AudioStream`: float32 PCM chunks at 24 kHz, `cancel()` taking effect at
once (the server's `Cancelled` confirmation is not waited for). A connection found dropped (the
server restarted, an idle proxy closed it) is reopened and the utterance sent again, as long as
none of its audio has arrived yet. The server samples as it is configured: PROTOCOL.md carries
no sampling parameters, so `sampling` is accepted and not sent.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncGenerator

import numpy as np
from loguru import logger

from pipecat_orpheus.engine.request import SamplingParams
from pipecat_orpheus.errors import EngineClosed
from pipecat_orpheus.wire.client import OrpheusClient, Utterance


class RemoteSynthesizer:
    """The utterances of one service on one server connection; see the module docstring."""

    def __init__(self, client: OrpheusClient):
        self.client = client
        self.closed = False
        self._ids = itertools.count()
        self._streams: set[RemoteStream] = set()
        self._cancels: set[asyncio.Task] = set()  # Cancel messages on their way

    async def connect(self) -> None:
        """Open the connection now (otherwise the first utterance opens it)."""
        await self.client.connect()

    def submit(self, text: str, *, voice: str | None = None, sampling: SamplingParams | None = None) -> RemoteStream:
        """Start speaking `text` on the server; refusals (`EngineBusy`, ...) arrive while iterating."""
        if self.closed:
            raise EngineClosed(f"{self} is closed")
        stream = RemoteStream(self, text, voice, f"s{next(self._ids)}")
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
    def queued_requests(self) -> int:
        """Always 0: the queue is the server's (see its /metrics)."""
        return 0

    def close(self) -> None:
        """Cancel every utterance in flight; `aclose()` also closes the connection."""
        self.closed = True
        for stream in list(self._streams):
            stream.cancel()

    async def aclose(self) -> None:
        """Cancel everything, close the connection (the server then cancels what it still had)."""
        self.close()
        await self.client.close()
        await asyncio.gather(*self._cancels)  # they end with the connection, confirmed or not

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


class RemoteStream:
    """One utterance's audio from the server, as an async iterator of float32 (n,) chunks."""

    def __init__(self, synth: RemoteSynthesizer, text: str, voice: str | None, request_id: str):
        self.request_id = request_id
        self.cancelled = False
        self._synth = synth
        self._utterance: Utterance | None = None
        self._chunks = self._receive(text, voice)

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

    async def _receive(self, text: str, voice: str | None) -> AsyncGenerator[np.ndarray, None]:
        client = self._synth.client
        for attempt in range(2):
            heard = False
            try:
                self._utterance = await client.speak(text, voice=voice, id=self.request_id)
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
                logger.info(f"{client}: connection lost ({e}); reconnecting")
                await client.close()

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
