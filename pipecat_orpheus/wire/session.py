"""One connection's behaviour as a sans-I/O state machine: events in, messages and actions out.

The server feeds it client messages (`receive`), audio from the speech source (`audio`,
`finished`) and reads back two things: the ordered `outbox` of messages to send (`pop`) and
`take_actions()`, what to do with the speech source (`Start`/`Stop` a piece of text) or the
socket (`Abort`). It owns the rules that make the protocol safe and ordered:

- streamed `Text` is cut into sentences; `Speak` text into pieces of at most
  `max_chars_per_piece`; pieces are synthesized one at a time, in order (one engine slot per
  connection, so one client cannot starve the others);
- `Marker` is a barrier: echoed once everything queued before it has been sent;
- `Cancel` drops queued pieces and unsent output of the matching utterances, then `Cancelled`;
- `Done` says why the utterance's audio ended: the first integrity-guard stop among its pieces, if any;
- word times (`Text` out) go with the audio: each word before the `Audio` message that holds its
  estimated start (`text.WordClock`), the rest when its piece ends, timed on the audio the client got;
- every limit of `LimitsConfig` is checked here, and the outbox is bounded by
  `max_unsent_audio_s`: a client that stops reading is aborted instead of buffered forever.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from loguru import logger
from websockets.frames import CloseCode

from pipecat_orpheus.config import LimitsConfig, VoiceConfig
from pipecat_orpheus.engine.guard import worse
from pipecat_orpheus.engine.request import SamplingParams
from pipecat_orpheus.errors import EngineBusy, InvalidRequest, ProtocolError
from pipecat_orpheus.format import SAMPLE_RATE
from pipecat_orpheus.pcm import PcmFramer
from pipecat_orpheus.text import SentenceBuffer, WordClock, split_text
from pipecat_orpheus.wire import protocol as p


@dataclass(slots=True)
class Piece:
    """One piece of text handed to the speech source: a sentence, or a cut of a long `Speak`."""

    key: int  # unique within the connection
    utterance: int  # pieces of one Speak (or one streamed sentence) share it
    text: str
    voice: str
    id: p.MessageId | None  # the client's utterance id (Speak), None for streamed Text
    last: bool  # the utterance's last piece: Done{id} follows it
    streamed: bool  # from streamed Text (bounded by max_buffered_chars), else from Speak
    sampling: SamplingParams
    samples: int = 0  # audio generated so far
    popped: int = 0  # of it, samples handed to the socket (its words are timed from where that began)
    clock: WordClock = field(init=False)

    def __post_init__(self) -> None:
        self.clock = WordClock(self.text)


@dataclass(slots=True)
class _Barrier:
    id: p.MessageId


class _Queue:
    """The pieces and markers waiting for the speech source, with the counts the limits check.

    The counts are kept as items come and go, so checking a limit costs the same however many
    items wait (a client sending many small messages must not make each one slower).
    """

    def __init__(self) -> None:
        self._items: deque[Piece | _Barrier] = deque()
        self.streamed_chars = 0  # text of queued `Text` sentences
        self.markers = 0
        self._spoken: dict[int, int] = {}  # utterance of a `Speak` -> its pieces still queued

    @property
    def utterances(self) -> int:
        """`Speak` utterances with a piece still queued."""
        return len(self._spoken)

    def __bool__(self) -> bool:
        return bool(self._items)

    def append(self, item: Piece | _Barrier) -> None:
        self._items.append(item)
        self._count(item, 1)

    def popleft(self) -> Piece | _Barrier:
        item = self._items.popleft()
        self._count(item, -1)
        return item

    def drop(self, match) -> None:
        """Remove the pieces `match` selects (markers stay)."""
        kept = deque(q for q in self._items if isinstance(q, _Barrier) or not match(q))
        self.clear()
        for item in kept:
            self.append(item)

    def clear(self) -> None:
        self._items.clear()
        self.streamed_chars = self.markers = 0
        self._spoken.clear()

    def _count(self, item: Piece | _Barrier, sign: int) -> None:
        if isinstance(item, _Barrier):
            self.markers += sign
        elif item.streamed:
            self.streamed_chars += sign * len(item.text)
        else:
            left = self._spoken.get(item.utterance, 0) + sign
            if left:
                self._spoken[item.utterance] = left
            else:
                self._spoken.pop(item.utterance, None)


@dataclass(slots=True)
class Start:
    """Action: submit `piece` to the speech source and feed its audio back to the session."""

    piece: Piece


@dataclass(slots=True)
class Stop:
    """Action: cancel the speech source's request for piece `key` (frees its slot)."""

    key: int


@dataclass(slots=True)
class Close:
    """Outbox item: close the socket with `code` once everything before it has been sent."""

    code: int
    reason: str = ""


@dataclass(slots=True)
class Abort:
    """Action: close the socket now with `code` (the client is not reading, nothing else will flush)."""

    code: int
    reason: str


Action = Start | Stop | Abort


@dataclass(slots=True)
class _Out:
    message: object
    key: int | None = None  # the piece this output belongs to (Cancel purges by it)
    id: p.MessageId | None = None
    samples: int = 0
    piece: Piece | None = None  # its piece: audio counts as the piece's, word times move onto the timeline


class Session:
    """The protocol state of one connection; see the module docstring."""

    def __init__(
        self,
        *,
        limits: LimitsConfig,
        voices: VoiceConfig,
        voice: str,
        max_chars_per_piece: int,
        sampling: SamplingParams | None = None,
    ):
        """Start a session.

        Args:
            limits: what the client may cost (text, queue, unsent audio).
            voices: the voices a `Speak` may name.
            voice: the connection's voice (query `voice`, or the default).
            max_chars_per_piece: longest text handed to the speech source at once.
            sampling: the server's sampling (default `SamplingParams()`); a `Speak` may override it,
                with at most its `max_tokens`.
        """
        self.limits = limits
        self.voices = voices
        self.voice = voice
        self.max_chars_per_piece = max_chars_per_piece
        self.sampling = sampling if sampling is not None else SamplingParams()
        self.outbox: deque[_Out] = deque()
        self.closed = False  # a Close or Abort has been issued: every later event is ignored
        self._actions: list[Action] = []
        self._queue = _Queue()
        self._current: Piece | None = None
        self._framer = PcmFramer()  # the current piece's audio -> 1920-sample messages, short last one
        self._sentences = SentenceBuffer(max_chars_per_piece)
        self._next_key = 0
        self._next_utterance = 0
        self._unsent_samples = 0
        self._unsent_messages = 0  # outbox messages other than audio (replies, word times)
        self._popped_samples = 0  # audio handed to the socket: the client's timeline
        self._ended = False
        self._voice_warned = False
        self._stop: tuple[int, str | None] = (-1, None)  # (utterance, why its audio ended so far) for Done

    # -- outputs -----------------------------------------------------------------------------

    def take_actions(self) -> list[Action]:
        """The actions issued since the last call, oldest first."""
        actions, self._actions = self._actions, []
        return actions

    def pop(self) -> object | None:
        """The next message (or `Close`) to send, or None if there is nothing to send now."""
        if not self.outbox:
            return None
        out = self.outbox.popleft()
        self._unsent_samples -= out.samples
        self._unsent_messages -= not (out.samples or isinstance(out.message, Close))
        if out.samples:
            self._popped_samples += out.samples
            out.piece.popped += out.samples
        elif isinstance(out.message, p.Word):
            # Timed from its piece's first audio, which sits where the piece's popped audio began.
            origin = (self._popped_samples - out.piece.popped) / SAMPLE_RATE
            word = out.message
            return p.Word(word.text, origin + word.start_s, origin + word.stop_s, id=word.id)
        return out.message

    @property
    def idle(self) -> bool:
        """No text buffered, nothing queued, generating or waiting to be sent."""
        return not (self.outbox or self._queue or self._current or self._sentences.pending.strip())

    @property
    def unsent_messages(self) -> int:
        """Messages other than audio (replies, word times) waiting in the outbox."""
        return self._unsent_messages

    @property
    def unsent_s(self) -> float:
        """Seconds of audio waiting in the outbox."""
        return self._unsent_samples / SAMPLE_RATE

    # -- events ------------------------------------------------------------------------------

    def start(self) -> None:
        """The stream is accepted: `Ready` goes first, with the voices and sampling a `Speak` may ask for."""
        sampling = {name: getattr(self.sampling, name) for name in p.SAMPLING_FIELDS}
        self._send(p.Ready(voices=list(self.voices.available), default_voice=self.voice, sampling=sampling))

    def receive(self, message: p.ClientMessage) -> None:
        """A decoded client message; limit breaches become `Error{bad_request}` and are dropped."""
        if self.closed:
            return
        message_id = getattr(message, "id", None)
        if isinstance(message_id, str) and len(message_id) > self.limits.max_id_chars:
            self.error(  # not echoed: the id is what is too long
                ProtocolError(
                    f"{message.type} id has {len(message_id)} characters, over limits.max_id_chars "
                    f"({self.limits.max_id_chars})"
                )
            )
            return
        try:
            if self._ended and not isinstance(message, (p.Voice, p.Cancel)):
                raise ProtocolError(f"{message.type} after Eos: the input has ended")
            handler = getattr(self, f"_on_{message.type.lower()}")
            handler(message)
        except ProtocolError as e:
            self.error(e, id=message_id)
        self._advance()

    def error(self, error: ProtocolError, id: p.MessageId | None = None) -> None:
        """Report a bad client message (malformed or over a limit); the connection goes on."""
        if not self.closed:
            self._send(p.Error(str(error), code=error.code, id=id))

    def audio(self, key: int, pcm: np.ndarray) -> None:
        """A chunk of float32 PCM, shape (n,), generated for piece `key`."""
        piece = self._current
        if self.closed or piece is None or piece.key != key or not len(pcm):
            return  # a cancelled piece's late audio
        framed = piece.samples - self._framer.pending  # the piece's samples already in messages
        piece.samples += len(pcm)
        for chunk in self._framer.push(pcm):
            framed += len(chunk)
            self._send_words(piece, piece.clock.advance(framed / SAMPLE_RATE))  # before the audio they start in
            self._send_audio(piece, chunk)
        if self._unsent_samples > self.limits.max_unsent_audio_s * SAMPLE_RATE:
            self._abort_slow_client(f"over limits.max_unsent_audio_s ({self.limits.max_unsent_audio_s} s) unsent")

    def finished(self, key: int, error: BaseException | None = None, reason: str | None = None) -> None:
        """Piece `key` ended: normally (None; why: `reason`), refused (`EngineBusy`, `InvalidRequest`) or failed."""
        piece = self._current
        if self.closed or piece is None or piece.key != key:
            return
        self._current = None
        if error is None:
            self._send_words(piece, piece.clock.finish(piece.samples / SAMPLE_RATE))
            self._send_audio(piece, self._framer.flush())
            utterance, so_far = self._stop
            self._stop = (piece.utterance, worse(so_far if utterance == piece.utterance else None, reason))
            if piece.last and piece.id is not None:
                self._send(p.Done(piece.id, reason=self._stop[1]), piece)
        else:
            refused = isinstance(error, (EngineBusy, InvalidRequest))  # the request's fault or capacity, not ours
            code = error.code if refused else "internal"
            if not refused:
                logger.opt(exception=error).error(f"{self}: piece {key} failed")
            self._send(p.Error(f"synthesis failed: {error}", code=code, id=piece.id))
            self._drop(lambda q: q.utterance == piece.utterance)  # the rest of a failed utterance
            self._framer.flush()
        self._advance()

    # -- client messages ---------------------------------------------------------------------

    def _on_text(self, message: p.Text) -> None:
        words = message.text.strip()
        if not words:
            return
        # Kyutai semantics: each Text holds whole words, so a fragment ends at a word boundary.
        self._check_buffered(len(words) + 1)
        for sentence in self._sentences.push(words + " "):
            self._enqueue([sentence], self.voice, None, self.sampling, streamed=True)

    def _on_eos(self, message: p.Eos) -> None:
        self._flush_text()
        self._ended = True

    def _on_voice(self, message: p.Voice) -> None:
        if not self._voice_warned:
            logger.warning(f"{self}: Voice (voice cloning) is not supported by Orpheus; ignored")
            self._voice_warned = True

    def _on_speak(self, message: p.Speak) -> None:
        voice = message.voice or self.voice
        if voice not in self.voices.available:
            raise ProtocolError(f"unknown voice {voice!r}; available: {', '.join(self.voices.available)}")
        if len(message.text) > self.limits.max_utterance_chars:
            raise ProtocolError(
                f"Speak text has {len(message.text)} characters, over limits.max_utterance_chars "
                f"({self.limits.max_utterance_chars})"
            )
        if not message.text.strip():
            raise ProtocolError("Speak text is empty")
        queued = self._queue.utterances
        if queued >= self.limits.max_queued_utterances:
            raise ProtocolError(
                f"{queued} utterances already queued: limits.max_queued_utterances "
                f"({self.limits.max_queued_utterances})"
            )
        sampling = self._sampling(message.sampling)
        self._flush_text()
        self._enqueue(split_text(message.text, self.max_chars_per_piece), voice, message.id, sampling, streamed=False)

    def _on_flush(self, message: p.Flush) -> None:
        self._flush_text()

    def _on_marker(self, message: p.Marker) -> None:
        waiting = self._queue.markers
        if waiting >= self.limits.max_queued_utterances:  # markers wait in the utterance queue
            raise ProtocolError(
                f"{waiting} markers already waiting: limits.max_queued_utterances ({self.limits.max_queued_utterances})"
            )
        self._flush_text()  # "all audio for input sent before it" includes buffered words
        self._queue.append(_Barrier(message.id))

    def _on_cancel(self, message: p.Cancel) -> None:
        def match(item: Piece | _Out) -> bool:
            return item.key is not None and (message.id is None or item.id == message.id)

        if message.id is None:
            self._sentences.flush()
        self._drop(match)
        if self._current is not None and match(self._current):
            self._actions.append(Stop(self._current.key))
            self._framer.flush()  # held samples belong to the cancelled piece
            self._current = None
        kept = deque()
        for out in self.outbox:
            if match(out):
                self._unsent_samples -= out.samples
                self._unsent_messages -= not out.samples
            else:
                kept.append(out)
        self.outbox = kept
        self._send(p.Cancelled(message.id))

    # -- internals ---------------------------------------------------------------------------

    def _check_buffered(self, extra: int) -> None:
        buffered = len(self._sentences.pending) + self._queue.streamed_chars + extra
        if buffered > self.limits.max_buffered_chars:
            raise ProtocolError(
                f"{buffered} characters of Text buffered, over limits.max_buffered_chars "
                f"({self.limits.max_buffered_chars})"
            )

    def _sampling(self, overrides: dict[str, float | int] | None) -> SamplingParams:
        """The server's sampling with a `Speak`'s overrides; out of range, or past its max_tokens: bad_request."""
        if not overrides:
            return self.sampling
        most = self.sampling.max_tokens
        if overrides.get("max_tokens", 0) > most:
            raise ProtocolError(f"Speak.sampling.max_tokens: {overrides['max_tokens']} is over this server's {most}")
        try:
            return dataclasses.replace(self.sampling, **overrides)
        except InvalidRequest as e:
            raise ProtocolError(f"Speak.sampling.{e.field}: {e.reason}") from None

    def _flush_text(self) -> None:
        for sentence in self._sentences.flush():
            self._enqueue([sentence], self.voice, None, self.sampling, streamed=True)

    def _enqueue(
        self, texts: list[str], voice: str, id: p.MessageId | None, sampling: SamplingParams, *, streamed: bool
    ) -> None:
        utterance, self._next_utterance = self._next_utterance, self._next_utterance + 1
        for i, text in enumerate(texts):
            last = i == len(texts) - 1
            self._queue.append(Piece(self._next_key, utterance, text, voice, id, last, streamed, sampling))
            self._next_key += 1

    def _drop(self, match) -> None:
        self._queue.drop(match)

    def _advance(self) -> None:
        """Start the next piece, echoing the markers it passes; close after Eos once all is done."""
        while not self.closed and self._current is None and self._queue:
            item = self._queue.popleft()
            if isinstance(item, _Barrier):
                self._send(p.Marker(item.id))
            else:
                self._current = item
                self._actions.append(Start(item))
        if self._ended and self._current is None and not self._queue and not self.closed:
            self.outbox.append(_Out(Close(CloseCode.NORMAL_CLOSURE)))  # done, after Eos
            self.closed = True

    def _send(self, message: object, piece: Piece | None = None) -> None:
        self.outbox.append(_Out(message, piece.key if piece else None, piece.id if piece else None, piece=piece))
        self._unsent_messages += 1
        # Replies to a client that sends but does not read would pile up; audio has its own bound.
        if self._unsent_messages > self.limits.max_unsent_messages and not self.closed:
            self._abort_slow_client(f"over limits.max_unsent_messages ({self.limits.max_unsent_messages}) unsent")

    def _send_words(self, piece: Piece, words: list[tuple[str, float, float]]) -> None:
        """Word times relative to the piece's first audio (`pop` places them on the timeline)."""
        for word, start_s, stop_s in words:
            self._send(p.Word(word, start_s, stop_s, id=piece.id), piece)

    def _send_audio(self, piece: Piece, pcm: np.ndarray) -> None:
        if len(pcm) and not self.closed:  # a word just sent may have found the client not reading
            self.outbox.append(_Out(p.Audio(pcm, piece.id), piece.key, piece.id, len(pcm), piece))
            self._unsent_samples += len(pcm)

    def _abort_slow_client(self, why: str) -> None:
        reason = f"client is not reading: {why}"
        logger.warning(f"{self}: {reason}")
        if self._current is not None:
            self._actions.append(Stop(self._current.key))
        self._current = None
        self._queue.clear()
        self.outbox.clear()
        self._unsent_samples = self._unsent_messages = 0
        self._send(p.Error(reason, code="bad_request"))
        self._actions.append(Abort(CloseCode.POLICY_VIOLATION, reason))  # the client broke a rule: it stopped reading
        self.closed = True

    def __str__(self) -> str:
        return f"Session({id(self):x})"
