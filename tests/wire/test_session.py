"""session.py: one connection's protocol rules, driven without sockets (sans-I/O)."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipecat_orpheus.config import LimitsConfig, VoiceConfig
from pipecat_orpheus.engine.request import SamplingParams
from pipecat_orpheus.errors import EngineBusy
from pipecat_orpheus.pcm import MESSAGE_SAMPLES
from pipecat_orpheus.wire import protocol as p
from pipecat_orpheus.wire.session import Abort, Close, Piece, Session, Start, Stop


class Driver:
    """Plays the speech source and the socket around a Session, recording what it sends."""

    def __init__(self, limits: LimitsConfig | None = None, max_chars: int = 40):
        self.session = Session(
            limits=limits or LimitsConfig(), voices=VoiceConfig(), voice="tara", max_chars_per_piece=max_chars
        )
        self.current = None  # the piece the "engine" is generating
        self.fed: dict = {}  # utterance id -> samples generated for it
        self.sent: list = []
        self.aborted = None
        self.session.start()
        self.apply()

    def apply(self):
        for action in self.session.take_actions():
            if isinstance(action, Start):
                assert self.current is None, "one piece at a time per connection"
                self.current = action.piece
            elif isinstance(action, Stop):
                assert self.current is not None and self.current.key == action.key
                self.current = None
            elif isinstance(action, Abort):
                self.aborted = action

    def receive(self, message):
        self.session.receive(message)
        self.apply()

    def audio(self, n: int):
        if self.current is not None:
            self.fed[self.current.id] = self.fed.get(self.current.id, 0) + n
            self.session.audio(self.current.key, np.full(n, 0.1, dtype=np.float32))
            self.apply()

    def finish(self, error=None):
        if self.current is not None:
            key, self.current = self.current.key, None
            self.session.finished(key, error)
            self.apply()

    def drain(self):
        while (item := self.session.pop()) is not None:
            self.sent.append(item)

    def run_to_end(self, frames_per_piece: int = 2):
        while self.current is not None:
            for _ in range(frames_per_piece):
                self.audio(2048)
            self.finish()
        self.drain()

    def types(self):
        return [type(m).__name__ for m in self.sent]


words = st.sampled_from(["Hello", "there.", "How", "are", "you?", "Fine,", "thanks!", "<laugh>", "Dr.", "Smith"])
ops = st.lists(
    st.one_of(
        st.tuples(st.just("speak"), st.lists(words, min_size=1, max_size=12).map(" ".join)),
        st.tuples(st.just("text"), words),
        st.tuples(st.just("flush")),
        st.tuples(st.just("marker")),
        st.tuples(st.just("cancel"), st.booleans()),
        st.tuples(st.just("audio"), st.integers(1, 5000)),
        st.tuples(st.just("finish")),
        st.tuples(st.just("busy")),
        st.tuples(st.just("drain")),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
def assert_queue_counts(session: Session) -> None:
    """The queue's running counts (what the limits check per message) equal a recount of its items."""
    queue = session._queue
    items = list(queue._items)
    pieces = [q for q in items if isinstance(q, Piece)]
    assert queue.streamed_chars == sum(len(q.text) for q in pieces if q.streamed)
    assert queue.utterances == len({q.utterance for q in pieces if not q.streamed})
    assert queue.markers == len(items) - len(pieces)


@given(ops=ops)
def test_ordering_rules_hold_for_any_interleaving(ops):
    """Markers, Cancel, Done, word timings and 80 ms framing stay correct under any event order."""
    d = Driver()
    ids = itertools.count()
    spoken: list = []  # Speak ids in order
    markers: list = []  # (marker id, Speak ids sent before it)
    cancels: list = []  # (cancel id, Speak ids sent before it)
    for op in ops:
        if op[0] == "speak":
            spoken.append(f"s{next(ids)}")
            d.receive(p.Speak(op[1], id=spoken[-1]))
        elif op[0] == "text":
            d.receive(p.Text(op[1]))
        elif op[0] == "flush":
            d.receive(p.Flush())
        elif op[0] == "marker":
            markers.append((f"m{next(ids)}", set(spoken)))
            d.receive(p.Marker(markers[-1][0]))
        elif op[0] == "cancel":
            target = spoken[-1] if op[1] and spoken else None
            cancels.append((target, set(spoken) if target is None else {target}))
            d.receive(p.Cancel(target))
        elif op[0] == "audio":
            d.audio(op[1])
        elif op[0] == "finish":
            d.finish()
        elif op[0] == "busy":
            d.finish(EngineBusy("full"))
        else:
            d.drain()
        assert_queue_counts(d.session)
    d.receive(p.Eos())
    d.run_to_end()
    sent = d.sent
    assert isinstance(sent[0], p.Ready) and isinstance(sent[-1], Close) and sent[-1].code == 1000

    def position(pred):
        return [i for i, m in enumerate(sent) if pred(m)]

    # Markers come back in order, each after all audio of the utterances sent before it.
    echoed = [m.id for m in sent if isinstance(m, p.Marker)]
    assert echoed == [m for m, _ in markers]
    for marker_id, before in markers:
        at = position(lambda m, marker_id=marker_id: isinstance(m, p.Marker) and m.id == marker_id)[0]
        audio_before = position(lambda m, before=before: isinstance(m, p.Audio) and m.id in before)
        assert all(i < at for i in audio_before)
    # Nothing of cancelled work follows its Cancelled.
    cancelled_at = position(lambda m: isinstance(m, p.Cancelled))
    assert len(cancelled_at) == len(cancels)
    for at, (_, covered) in zip(cancelled_at, cancels, strict=True):
        later = sent[at + 1 :]
        assert not [m for m in later if isinstance(m, (p.Audio, p.Word, p.Done)) and m.id in covered]
    # Every Speak ends exactly once: Done, Error, or covered by a Cancel.
    for sid in spoken:
        done = position(lambda m, sid=sid: isinstance(m, p.Done) and m.id == sid)
        errors = position(lambda m, sid=sid: isinstance(m, p.Error) and m.id == sid)
        cancelled = any(sid in covered for _, covered in cancels)
        assert len(done) + len(errors) <= 1 and (done or errors or cancelled)
        if done:
            audio = [m for m in sent if isinstance(m, p.Audio) and m.id == sid]
            assert all(
                i < done[0] for i in position(lambda m, sid=sid: isinstance(m, (p.Audio, p.Word)) and m.id == sid)
            )
            assert all(0 < len(a.pcm) <= MESSAGE_SAMPLES for a in audio)
            if not cancelled and not errors:
                assert sum(len(a.pcm) for a in audio) == d.fed.get(sid, 0)
    # Word timings are monotonic on the connection's timeline, and each comes no later than the audio
    # message it starts in: never past the audio sent so far plus the next message.
    timeline = 0.0
    last_stop = 0.0
    for i, m in enumerate(sent):
        if isinstance(m, p.Audio):
            timeline += len(m.pcm) / 24000
        elif isinstance(m, p.Word):
            upcoming = next((len(a.pcm) / 24000 for a in sent[i:] if isinstance(a, p.Audio)), 0.0)
            assert last_stop - 1e-9 <= m.start_s <= m.stop_s <= timeline + upcoming + 1e-9
            last_stop = m.stop_s


def test_kyutai_words_become_sentences():
    """Streamed words are cut at sentence ends and each sentence is spoken as soon as it is complete."""
    d = Driver()
    for word in "Hello there. How are".split():
        d.receive(p.Text(word))
    assert d.current is not None and d.current.text == "Hello there."
    d.run_to_end()
    d.receive(p.Text("you?"))
    d.receive(p.Eos())
    assert d.current.text == "How are you?"
    d.run_to_end()
    texts = [m.text for m in d.sent if isinstance(m, p.Word)]
    assert texts == ["Hello", "there.", "How", "are", "you?"]
    assert set(d.types()) == {"Ready", "Audio", "Word", "Close"}  # nothing a Kyutai client does not know
    assert all(m.id is None for m in d.sent if isinstance(m, (p.Audio, p.Word)))


def test_voice_is_ignored_and_input_after_eos_is_refused():
    """Voice is accepted silently; new input after Eos is a bad_request Error, and the close still comes."""
    d = Driver()
    d.receive(p.Voice([0.1], [1]))
    d.receive(p.Text("Hi."))
    d.receive(p.Eos())
    d.receive(p.Speak("late."))
    d.run_to_end()
    assert d.types()[:2] == ["Ready", "Error"] and "after Eos" in d.sent[1].message
    assert d.types()[-1] == "Close"


def test_speak_limits():
    """Too long, unknown voice and too many queued utterances are refused with an Error naming the limit."""
    d = Driver(LimitsConfig(max_utterance_chars=20, max_queued_utterances=2))
    d.receive(p.Speak("x" * 21, id="long"))
    d.receive(p.Speak("Hi.", voice="nobody", id="voice"))
    for i in range(4):  # the first starts at once, two more queue, the fourth is over the limit
        d.receive(p.Speak("Hi.", id=i))
    d.drain()
    errors = [m for m in d.sent if isinstance(m, p.Error)]
    assert [e.id for e in errors] == ["long", "voice", 3]
    assert "limits.max_utterance_chars" in errors[0].message and "unknown voice" in errors[1].message
    assert "limits.max_queued_utterances" in errors[2].message
    assert all(e.code == "bad_request" for e in errors)


def test_ready_offers_voices_and_sampling():
    """Ready carries the voices a Speak may name, the connection's voice and the server's sampling."""
    d = Driver()
    d.drain()
    ready = d.sent[0]
    assert ready.voices == list(VoiceConfig().available) and ready.default_voice == "tara"
    assert ready.sampling == {"temperature": 0.6, "top_p": 0.8, "repetition_penalty": 1.1, "max_tokens": 2000}


def test_speak_sampling_overrides_the_servers_within_its_limits():
    """A Speak's sampling reaches its pieces; past the server's max_tokens or out of range it is refused by name."""
    d = Driver()
    d.receive(p.Speak("Hi.", id="a", sampling={"temperature": 0.3, "max_tokens": 70}))
    assert d.current.sampling == SamplingParams(temperature=0.3, max_tokens=70)
    d.receive(p.Speak("Hi.", id="b", sampling={"max_tokens": 2001}))
    d.receive(p.Speak("Hi.", id="c", sampling={"top_p": 0.0}))
    d.drain()
    errors = {m.id: m for m in d.sent if isinstance(m, p.Error)}
    assert set(errors) == {"b", "c"} and all(e.code == "bad_request" for e in errors.values())
    assert "Speak.sampling.max_tokens" in errors["b"].message and "2000" in errors["b"].message
    assert "Speak.sampling.top_p" in errors["c"].message and "range" in errors["c"].message


def test_words_go_out_with_the_audio_they_start_in():
    """Each word goes just before the audio message that holds its estimated start; the rest at the piece's end."""
    d = Driver(max_chars=200)
    d.receive(p.Speak("One two three four five.", id="a"))  # estimated starts 0, 0.24, 0.48, 0.88, 1.2 s
    for _ in range(10):  # 0.8 s in 80 ms messages
        d.audio(1920)
    d.drain()
    shown = ["W" if isinstance(m, p.Word) else "A" for m in d.sent if isinstance(m, (p.Word, p.Audio))]
    assert "".join(shown) == "WAAAWAAAWAAAA"
    d.finish()  # shorter than estimated: four and five share what is left after three
    d.drain()
    words = [m for m in d.sent if isinstance(m, p.Word)]
    assert [w.text for w in words] == ["One", "two", "three", "four", "five."] and d.types()[-1] == "Done"
    assert [round(w.start_s, 3) for w in words] == [0.0, 0.24, 0.48, 0.56, 0.68]
    assert words[-1].stop_s == pytest.approx(0.8)


def test_overlong_ids_are_refused_and_not_echoed():
    """An id past limits.max_id_chars gets an Error without the id, and nothing of that message is done."""
    d = Driver(LimitsConfig(max_id_chars=8))
    d.receive(p.Speak("Hi.", id="x" * 9))
    d.receive(p.Marker("y" * 9))
    d.receive(p.Speak("Hi.", id="x" * 8))
    d.run_to_end()
    errors = [m for m in d.sent if isinstance(m, p.Error)]
    assert len(errors) == 2 and all(e.id is None and "limits.max_id_chars" in e.message for e in errors)
    assert {m.id for m in d.sent if isinstance(m, p.Done)} == {"x" * 8}
    assert not any(isinstance(m, p.Marker) for m in d.sent)


def test_buffered_text_limit():
    """Streamed text past max_buffered_chars is refused, and the connection keeps working."""
    d = Driver(LimitsConfig(max_buffered_chars=32), max_chars=200)
    d.receive(p.Text("a" * 25))
    d.receive(p.Text("b" * 10))
    d.drain()
    assert isinstance(d.sent[-1], p.Error) and "limits.max_buffered_chars" in d.sent[-1].message
    d.receive(p.Text("end."))
    d.receive(p.Flush())
    assert d.current is not None and d.current.text == "a" * 25 + " end."


def test_long_speak_is_split_into_pieces_with_one_done():
    """A Speak longer than max_chars_per_piece is spoken piece by piece, 80 ms messages, one Done."""
    d = Driver(max_chars=20)
    d.receive(p.Speak("One two three. Four five six. Seven eight nine.", id="u"))
    pieces = []
    while d.current is not None:
        pieces.append(d.current.text)
        d.audio(1000)
        d.audio(3000)
        d.finish()
    d.drain()
    assert pieces == ["One two three.", "Four five six.", "Seven eight nine."]
    audio = [m for m in d.sent if isinstance(m, p.Audio)]
    assert [len(a.pcm) for a in audio] == [1920, 1920, 160] * 3  # each sentence's last message is short
    assert d.types()[-1] == "Done"


def test_engine_busy_fails_one_utterance_only():
    """EngineBusy for an utterance becomes Error{busy, id}; the rest of it is dropped and the next one runs."""
    d = Driver(max_chars=20)
    d.receive(p.Speak("One two three. Four five six.", id="a"))
    d.receive(p.Speak("Next.", id="b"))
    d.finish(EngineBusy("full"))
    assert d.current.id == "b"
    d.run_to_end()
    errors = [m for m in d.sent if isinstance(m, p.Error)]
    assert [(e.id, e.code) for e in errors] == [("a", "busy")]
    assert [m.id for m in d.sent if isinstance(m, p.Done)] == ["b"]


def test_engine_failure_is_internal_error():
    """Any other engine failure becomes Error{internal} for that utterance."""
    d = Driver()
    d.receive(p.Speak("Hi.", id="a"))
    d.finish(RuntimeError("boom"))
    d.drain()
    assert (d.sent[-1].code, d.sent[-1].id) == ("internal", "a")


def test_cancel_purges_unsent_audio_and_stops_generation():
    """Cancel drops queued work and unsent audio of its id, stops its piece, and answers Cancelled."""
    d = Driver()
    d.receive(p.Speak("First.", id="a"))
    d.receive(p.Speak("Second.", id="b"))
    d.audio(5000)
    d.receive(p.Cancel("a"))
    assert d.current.id == "b"  # a's generation was stopped and b started
    d.run_to_end()
    assert not [m for m in d.sent if getattr(m, "id", None) == "a" and not isinstance(m, p.Cancelled)]
    assert d.types().count("Cancelled") == 1


def test_marker_waits_for_audio_before_it():
    """A Marker is echoed only after the audio of everything sent before it."""
    d = Driver()
    d.receive(p.Speak("First.", id="a"))
    d.receive(p.Marker(1))
    d.drain()
    assert "Marker" not in d.types()
    d.run_to_end()
    assert d.types()[-2:] == ["Done", "Marker"]


def test_slow_client_is_aborted_with_bounded_buffer():
    """Past max_unsent_audio_s unsent, the session drops its buffer, stops the engine and asks to abort."""
    d = Driver(LimitsConfig(max_unsent_audio_s=0.5))
    d.receive(p.Speak("A long one.", id="a"))
    for _ in range(10):
        d.audio(2048)  # nobody drains: the client is not reading
    assert isinstance(d.aborted, Abort) and d.aborted.code == 1008
    assert d.current is None and d.session.closed
    assert d.session.unsent_s < 0.5
    d.drain()
    assert isinstance(d.sent[-1], p.Error) and "limits.max_unsent_audio_s" in d.sent[-1].message


@pytest.mark.parametrize("eos_first", [True, False])
def test_close_only_after_everything_is_sent(eos_first):
    """After Eos the session closes normally (1000), only once all pieces are spoken and queued to send."""
    d = Driver()
    d.receive(p.Text("Hi"))
    if not eos_first:
        d.receive(p.Flush())
    d.receive(p.Eos())
    d.drain()
    assert "Close" not in d.types() and d.current is not None
    d.run_to_end()
    assert d.types()[-1] == "Close" and d.sent[-1].code == 1000
    assert d.types().count("Audio") == 3  # 4096 samples: 1920 + 1920 + 256
