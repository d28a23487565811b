import time

from hypothesis import given, settings
from hypothesis import strategies as st

from pipecat_orpheus.format import EMOTION_TAGS
from pipecat_orpheus.text import SentenceBuffer, WordClock, sentence_end, split_text, words


def test_short_text_is_one_piece():
    """Text within the limit is returned whole (stripped); empty text gives no pieces."""
    assert split_text("  Hello there.  ", 280) == ["Hello there."]
    assert split_text("   ", 280) == []


def test_prefers_sentence_ends():
    """Pieces are packed up to the limit and cut after the last sentence end that fits."""
    text = "One two. Three four? Five six!"
    assert split_text(text, 20) == ["One two. Three four?", "Five six!"]
    assert split_text(text, 10) == ["One two.", "Three", "four?", "Five six!"]


def test_fallback_order_newline_clause_space():
    """Without a sentence end, cuts fall back to a newline, then ; : or comma, then a space."""
    assert split_text("alpha beta\ngamma delta", 15) == ["alpha beta", "gamma delta"]
    assert split_text("alpha beta, gamma delta", 15) == ["alpha beta,", "gamma delta"]
    assert split_text("alpha beta gamma delta", 15) == ["alpha beta", "gamma delta"]
    assert split_text("abcdefghij", 4) == ["abcd", "efgh", "ij"]


def test_never_cuts_inside_emotion_tag():
    """An emotion tag is never cut, even when it straddles the limit."""
    pieces = split_text("ha<laugh>ha<laugh>", 5)
    assert all("<" not in p or p.count("<") == p.count(">") for p in pieces)
    assert "".join(pieces) == "ha<laugh>ha<laugh>"
    assert split_text("Well. <sigh> fine", 9) == ["Well.", "<sigh>", "fine"]


@given(st.lists(st.sampled_from([*"ab .,!?\n", "<laugh>", "<sigh>"]), max_size=200), st.integers(8, 60))
def test_split_keeps_all_text_within_limit(parts, limit):
    """Pieces are non-empty, within the limit, keep every non-space character in order, and keep tags whole."""
    text = "".join(parts)
    pieces = split_text(text, limit)
    assert all(p and len(p) <= limit and p == p.strip() for p in pieces)
    assert "".join(pieces).replace(" ", "").replace("\n", "") == text.replace(" ", "").replace("\n", "")
    for p in pieces:
        assert p.count("<") == p.count(">")


def test_sentence_end_needs_whitespace_and_skips_abbreviations():
    """A sentence ends at .?! followed by whitespace, or a newline; "3." and "Dr." do not end one."""
    assert sentence_end("Hello there") is None
    assert sentence_end("It costs 3.") is None
    assert sentence_end("It costs 3.5 now. And") == len("It costs 3.5 now.")
    assert sentence_end("Ask Dr. Smith") is None
    assert sentence_end("Really?! Yes") == len("Really?!")
    assert sentence_end("line one\nline") == len("line one\n")


def test_sentence_buffer_word_by_word():
    """Words pushed one at a time come out as whole sentences; flush releases the rest."""
    buf = SentenceBuffer(max_chars=280)
    out = []
    for word in "Hello there. How are you? I am fine".split(" "):
        out += buf.push(word + " ")
    assert out == ["Hello there.", "How are you?"]
    assert buf.pending.strip() == "I am fine"
    assert buf.flush() == ["I am fine"] and buf.pending == ""


def test_sentence_buffer_bounded():
    """Text without a sentence end is released in pieces once it exceeds max_chars."""
    buf = SentenceBuffer(max_chars=20)
    out = []
    for word in ("word " * 12).split(" "):
        out += buf.push(word + " ")
    assert out and all(len(p) <= 20 for p in out)
    assert len(buf.pending) <= 20


def test_word_clock_releases_words_as_audio_reaches_them():
    """A word goes out with the chunk that reaches its estimated start; the rest share the audio left at the end."""
    clock = WordClock("One <laugh> two three", seconds_per_letter=0.1)  # starts 0, 0.3, 0.6; tags are not words
    assert clock.advance(0.1) == [("One", 0.0, 0.1)]  # a stop never passes the audio produced
    assert clock.advance(0.2) == []
    assert clock.finish(0.5) == [("two", 0.1, 0.25), ("three", 0.25, 0.5)]  # shorter than expected: squeezed
    assert clock.finish(0.6) == [] and WordClock("<sigh>").finish(1.0) == []


@given(
    st.lists(st.sampled_from(["a", "bb", "ccc!", "<laugh>", "3.5"]), max_size=30),
    st.lists(st.floats(0.001, 2.0), max_size=20),
    st.floats(0, 10),
)
def test_word_clock_is_monotonic_and_never_late(tokens, chunks, tail):
    """Every word once, in order, times non-decreasing; each released with the first chunk reaching its start."""
    text = " ".join(tokens)
    clock, audio, out = WordClock(text, seconds_per_letter=0.05), 0.0, []
    for chunk in chunks:
        before, audio = audio, audio + chunk
        released = clock.advance(audio)
        assert all(before <= start < audio and stop <= audio for _, start, stop in released)
        out += released
    out += clock.finish(audio + tail)
    assert [w for w, _, _ in out] == words(text) == [t for t in tokens if t not in EMOTION_TAGS]
    times = [t for _, start, stop in out for t in (start, stop)]
    assert times == sorted(times) and (not out or out[-1][2] <= max(audio + tail, 0.0) + 1e-9)


# -- hostile input (issue 13): time linear in the text, pieces within the limit -------------------

ATTACKS = [
    "." * 7998 + "x",  # a run of marks not followed by a space: once quadratic per scan
    "." * 4000,
    "a" * 5332 + " Dr." * 666,  # a long word before a dot: once a quadratic abbreviation check
    "<" + "a" * 3990 + ">",  # a fake tag: once kept whole, past max_chars
]
CPU_BUDGET_S = 1.0  # for 8,000 characters through all of `_process`; about 0.07 s at worst today


def _process(text: str) -> None:
    """Everything the server does to text, checking that every piece fits the limit."""
    for limit in (280, 20):
        assert all(len(p) <= limit for p in split_text(text, limit))
    for chunks in (list(text), [w + " " for w in text.split(" ")]):  # character by character, word by word
        buf = SentenceBuffer(280)
        pieces = [p for chunk in chunks for p in buf.push(chunk)] + buf.flush()
        assert all(len(p) <= 280 for p in pieces)
    sentence_end(text)


def _cpu_seconds(text: str) -> float:
    """CPU time of `_process(text)`: unlike wall time it does not grow when other processes load the machine."""
    start = time.process_time()
    _process(text)
    return time.process_time() - start


def _to_length(text: str, n: int) -> str:
    text = text or "x"
    return (text * (n // len(text) + 1))[:n]


_BLOCKS = st.one_of(
    st.builds(  # a run of one sentence-end mark, maybe closed by quotes, then a space, a letter or nothing
        lambda mark, n, closer, after: mark * n + closer + after,
        st.sampled_from(".?!…"),
        st.integers(1, 4000),
        st.sampled_from(["", '"', "'", ")", "]", '")', "')]"]),
        st.sampled_from(["", " ", "x", "\n"]),
    ),
    st.builds(
        lambda unit, n: unit * n,
        st.sampled_from(['."', ".)", "?!", ". ", "a.", "<a", "Dr. ", "e.g.", "\n."]),
        st.integers(1, 3000),
    ),
    st.builds(lambda n: "a" * n, st.integers(1, 8000)),
    st.builds(lambda n, k: "a" * n + " Dr." * k, st.integers(1, 6000), st.integers(1, 700)),
    st.builds(
        lambda pair, n: pair[0] * n + pair[1] * n, st.sampled_from(["()", "[]", "<>", '""']), st.integers(1, 3000)
    ),
    st.sampled_from(EMOTION_TAGS),
    st.builds(lambda n: "<" + "a" * n + ">", st.integers(17, 4000)),
    st.lists(st.sampled_from([*".?!…\"')] \n<>a_", "Dr.", "<laugh>"]), max_size=300).map("".join),
    st.text(max_size=300),
)


@settings(max_examples=30, deadline=None)
@given(st.lists(_BLOCKS, min_size=1, max_size=6).map(lambda blocks: _to_length("".join(blocks), 8000)))
def test_hostile_text_costs_linear_time(text):
    """8,000 characters of any mix of mark runs, long words, brackets and tags stay far under a second of CPU.

    The quadratic code took 8-85 s for the attack strings, so even a loaded machine tells the two apart.
    """
    assert _cpu_seconds(text) < CPU_BUDGET_S


def test_attack_strings_cost_linear_time():
    """The strings that froze the server for minutes now take milliseconds."""
    for text in ATTACKS:
        assert _cpu_seconds(text) < CPU_BUDGET_S, text[:20]


@given(
    st.lists(
        st.sampled_from(["a", "bb ", ". ", "!", "<laugh>", "<" + "a" * 17 + ">", "<" * 20, "x" * 30, "\n"]), max_size=80
    ),
    st.integers(18, 60),
)
def test_pieces_never_exceed_limit_once_a_tag_fits(parts, limit):
    """With room for the longest tag (18 characters), no piece is over the limit, whatever looks like a tag."""
    assert all(len(p) <= limit for p in split_text("".join(parts), limit))


def test_fake_long_tag_is_split():
    """A "<...>" longer than any tag is text, so it is cut to the limit like a long word."""
    pieces = split_text("<" + "a" * 3990 + ">", 280)
    assert max(map(len, pieces)) == 280 and "".join(pieces) == "<" + "a" * 3990 + ">"
    assert words("<" + "a" * 20 + ">") == ["<" + "a" * 20 + ">"]


@given(st.lists(st.text("abc.,", min_size=1, max_size=19), max_size=60))
def test_sentence_buffer_keeps_words_apart(ws):
    """Words shorter than the limit come out whole and in order, also after the buffer released a piece."""
    buf = SentenceBuffer(max_chars=20)
    out = [p for w in ws for p in buf.push(w + " ")] + buf.flush()
    assert " ".join(out).split() == ws
