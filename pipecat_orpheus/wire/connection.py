"""One WebSocket stream of the server: the tasks that join a socket, a `Session` and the speech source.

The stream is an `asyncio.TaskGroup` of a `recv` task (frames -> session), a `send` task
(session outbox -> frames) and one `synth` task per piece being spoken (speech source ->
session). The tasks meet only in the session, whose outbox is bounded by
`limits.max_unsent_audio_s`; the send task sleeps on an event, never polls. Whatever ends the
stream, its `finally` cancels its engine requests, which frees their slots at the next step.
Under it, a `StreamSocket` drops a peer that leaves what it is sent unread, control frames included.
"""

from __future__ import annotations

import asyncio

from loguru import logger
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from pipecat_orpheus.errors import EngineBusy, ProtocolError
from pipecat_orpheus.format import SAMPLE_RATE
from pipecat_orpheus.speech import AudioStream, Synthesizer
from pipecat_orpheus.wire import metrics
from pipecat_orpheus.wire import protocol as p
from pipecat_orpheus.wire.session import Abort, Close, Session, Start, Stop


class _Closed(Exception):
    """Raised by a task when the stream is over, so the TaskGroup cancels the others."""


class Connection:
    """The tasks of one WebSocket stream around its `Session`; `run()` returns when the stream is over."""

    def __init__(
        self,
        n: int,
        ws: ServerConnection,
        session: Session,
        synthesizer: Synthesizer,
        *,
        pcm16: bool,
    ):
        """Wire up stream number `n`.

        Args:
            n: the server's number for this stream (task names and logs).
            ws: the accepted WebSocket.
            session: the stream's protocol state.
            synthesizer: the shared speech source.
            pcm16: send `Audio.pcm` as int16 bytes (`Pcm16MessagePack`) instead of float32.
        """
        self.n, self.ws, self.session, self.synthesizer = n, ws, session, synthesizer
        self.pcm16 = pcm16
        self.idle = asyncio.Event()  # set while the session has no work: shutdown may close it
        self._wake = asyncio.Event()  # the outbox has something for the send task
        self._drained = asyncio.Event()  # the outbox's replies are below the mark where recv pauses
        # Reading pauses at half of limits.max_unsent_messages: a client that floods requests but reads
        # its replies is slowed down (TCP backpressure), never closed; one that does not read meets the bound.
        self._pause_at = session.limits.max_unsent_messages // 2
        self._audio: dict[int, AudioStream] = {}
        self._tg: asyncio.TaskGroup | None = None

    async def run(self) -> None:
        """Serve the stream until it closes; its engine requests are cancelled on the way out."""
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                self.session.start()
                self._apply()
                tg.create_task(self._recv(), name=f"recv-{self.n}")
                tg.create_task(self._send(), name=f"send-{self.n}")
        except* _Closed:
            pass
        finally:
            for audio in self._audio.values():  # a disconnect frees the engine slots now
                audio.cancel()
            self._audio.clear()
            self.idle.set()  # nothing left for a shutdown to wait for

    async def _recv(self) -> None:
        try:
            async for data in self.ws:
                try:
                    _check_size(data, self.session.limits.max_message_bytes)
                    message = p.decode_client(data)
                except ProtocolError as e:
                    self.session.error(e)
                else:
                    self.session.receive(message)
                self._apply()
                while self.session.unsent_messages > self._pause_at and not self.session.closed:
                    self._drained.clear()
                    await self._drained.wait()
        except ConnectionClosed:
            pass
        raise _Closed

    async def _send(self) -> None:
        try:
            while True:
                item = self.session.pop()
                if self.session.unsent_messages <= self._pause_at:
                    self._drained.set()
                if item is None:
                    self._update_idle()
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                if isinstance(item, Close):
                    await self._abort(item.code, item.reason)
                if isinstance(item, p.Error):
                    metrics.ERRORS_TOTAL.labels(item.code or "internal").inc()
                await self.ws.send(p.encode(item, pcm16=self.pcm16))  # StreamSocket bounds the wait
        except ConnectionClosed:
            raise _Closed from None

    async def _synth(self, key: int, audio: AudioStream) -> None:
        loop = asyncio.get_running_loop()
        started = last = loop.time()
        samples, error = 0, None
        metrics.STREAMS.inc()
        try:
            async for chunk in audio:
                now = loop.time()
                (metrics.CHUNK_GAP if samples else metrics.TIME_TO_FIRST_AUDIO).observe(
                    now - (last if samples else started)
                )
                last, samples = now, samples + len(chunk)
                self.session.audio(key, chunk)
                self._apply()
        except Exception as e:  # an engine failure on this request ends this piece only
            error = e
        finally:
            audio.cancel()  # no-op once finished; on teardown (disconnect) it frees the slot
            metrics.STREAMS.dec()
            metrics.AUDIO_SECONDS_TOTAL.inc(samples / SAMPLE_RATE)
            if self._audio.get(key) is audio:
                del self._audio[key]
        if audio.cancelled:
            metrics.PIECES_TOTAL.labels("cancelled").inc()
            return
        metrics.PIECES_TOTAL.labels("done" if error is None else "error").inc()
        metrics.PIECE_AUDIO.observe(samples / SAMPLE_RATE)
        reason = audio.stop_reason if error is None else None
        if reason is not None:
            metrics.PIECE_STOPS.labels(reason).inc()
        self.session.finished(key, error, reason)
        self._apply()

    def _apply(self) -> None:
        """Carry out what the session asked for, then wake the send task if there is output."""
        while actions := self.session.take_actions():
            for action in actions:
                if isinstance(action, Start):
                    piece = action.piece
                    try:
                        audio = self.synthesizer.submit(piece.text, voice=piece.voice, sampling=piece.sampling)
                    except Exception as e:  # EngineBusy, or a failure of this request only
                        metrics.PIECES_TOTAL.labels("busy" if isinstance(e, EngineBusy) else "error").inc()
                        self.session.finished(piece.key, e)
                        continue
                    self._audio[piece.key] = audio
                    self._tg.create_task(self._synth(piece.key, audio), name=f"synth-{self.n}-{piece.key}")
                elif isinstance(action, Stop):
                    audio = self._audio.pop(action.key, None)
                    if audio is not None:
                        audio.cancel()
                elif isinstance(action, Abort):
                    self._tg.create_task(self._abort(action.code, action.reason), name=f"abort-{self.n}")
        if self.session.outbox:
            self._wake.set()
        self._update_idle()

    def _update_idle(self) -> None:
        if self.session.idle:
            self.idle.set()
        else:
            self.idle.clear()

    async def _abort(self, code: int, reason: str) -> None:
        await self.ws.close(code, reason)  # StreamSocket.close: within close_timeout_s, read or not
        raise _Closed


class StreamSocket(ServerConnection):
    """websockets' server connection, made to drop a peer that does not read, whatever it was sent.

    websockets writes the pong for each ping (and the reply to a close) straight into the transport:
    control frames never wait for the peer to read. A peer that floods pings and reads nothing would
    grow the write buffer without bound, and once the write side is blocked, the keepalive ping, a
    send and a closing handshake all wait in `drain()` forever: `ping_timeout` and `close_timeout`
    never start. So here a blocked write side lasts at most `ping_timeout`, replies written while it
    is blocked at most `write_limit` bytes, and `close()` at most `close_timeout`; past any of them
    the transport is aborted.
    """

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Start with the write side open and no unread replies."""
        super().connection_made(transport)
        self._blocked: asyncio.TimerHandle | None = None  # armed while the write side is paused
        self._unread_replies = 0  # bytes of replies to control frames written since it paused

    def data_received(self, data: bytes) -> None:
        """Handle the peer's bytes; drop it once its unread replies pass `write_limit`."""
        before = self.transport.get_write_buffer_size()
        super().data_received(data)  # may write pongs and a close frame, which never wait
        if self.paused:
            self._unread_replies += self.transport.get_write_buffer_size() - before
            if self._unread_replies > self.write_limit_high:
                self._drop(f"{self._unread_replies} bytes of replies to its control frames unread")

    def pause_writing(self) -> None:
        """The buffer passed `write_limit`: the peer has `ping_timeout` to read some of it."""
        super().pause_writing()
        self._blocked = self.loop.call_later(self.ping_timeout, self._drop, f"nothing read for {self.ping_timeout} s")

    def resume_writing(self) -> None:
        """The peer read: the clock and the reply allowance start over at the next pause."""
        super().resume_writing()
        self._blocked.cancel()
        self._unread_replies = 0

    def connection_lost(self, exc: Exception | None) -> None:
        """Disarm the timer before websockets tears down."""
        if self._blocked is not None:
            self._blocked.cancel()
        super().connection_lost(exc)

    async def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        """Close with a handshake, or abort once `close_timeout` has passed (the close frame may never drain)."""
        try:
            async with asyncio.timeout(self.close_timeout):
                await super().close(code, reason)
        except TimeoutError:
            self.transport.abort()

    def _drop(self, why: str) -> None:
        if not self.transport.is_closing():
            logger.warning(f"client {peer(self)}: {why}; dropping it")
        self.transport.abort()


def peer(ws: ServerConnection) -> str:
    """`host:port` of the client, for logs."""
    address = ws.remote_address
    return f"{address[0]}:{address[1]}" if address else "?"


def _check_size(data: bytes | str, limit: int) -> None:
    """Refuse a frame over `limits.max_message_bytes` (websockets already refused those over `max_frame_bytes`)."""
    size = len(data) if isinstance(data, bytes) else len(data.encode())
    if size > limit:
        raise ProtocolError(f"a message of {size} bytes is over limits.max_message_bytes ({limit})")
