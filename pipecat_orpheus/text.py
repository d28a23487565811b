"""Text handling around the model: split long text into pieces, find sentence ends, time words as audio comes.

Orpheus loses the plot past ~280 characters (Baseten's Orpheus server chunks at 280 for this), so long text is split at
sentence boundaries and the pieces are spoken in order as one utterance. Emotion tags such as
`<laugh>` are never cut and never counted as words.
"""

from __future__ import annotations

import itertools
import re

_MAX_TAG_CHARS = 18  # <, at most 16 letters, >: a longer "<...>" is text, so it can't outgrow a piece
_TAG = re.compile(r"<[A-Za-z_]{1,16}>")  # an emotion tag like <laugh>
# .?! (with closing quotes) before a space or the end. The lookbehind (the character before the
# first mark is not one) and the possessive runs make each run of marks tried once, from its start:
# a run not followed by a space fails in one pass, not once per position in it (quadratic).
_SENTENCE_END = re.compile(r"[.?!…](?<![.?!…]{2})[.?!…]*+[\"')\]]*+(?=\s|$)")
_SENTENCE_END_CHARS = ".?!…\"')]"  # what a _SENTENCE_END match is made of
_NEWLINE = re.compile(r"\n")
_CLAUSE_END = re.compile(r"[;:,](?=\s|$)")
_SPACE = re.compile(r"\s")
_SPACES = re.compile(r"\s*")
_WORD = re.compile(r"[\w.]+$")
# Abbreviations whose period does not end a sentence when text is streamed.
_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "no"})
_LONGEST_ABBREVIATION = max(map(len, _ABBREVIATIONS))
# Expected speaking pace before the audio's length is known: 12.5 letters/s, about 150 words a minute
# (English words average ~5 letters). A prior, not a measurement of Orpheus's voices.
SECONDS_PER_LETTER = 0.08


def _cut(window: str, limit: int) -> int:
    """Where to end the piece that starts `window`: a position in 1..limit (a tag may end it past limit).

    `window` holds the rest of the text up to at least `limit` + 1 characters (the one after a cut
    decides whether it is a sentence end) and `limit + _MAX_TAG_CHARS` at most, so every cut costs
    O(limit) whatever follows. A pattern cut never falls inside a tag: none of them ends on a letter.
    """
    for pattern in (_SENTENCE_END, _NEWLINE, _CLAUSE_END, _SPACE):
        cut = None
        for m in pattern.finditer(window, 0, limit + 1):
            if m.end() <= limit:
                cut = m.end()
        if cut:
            return cut
    for m in _TAG.finditer(window):  # one long word: cut at the limit, or around a tag that straddles it
        if m.start() < limit < m.end():
            return m.start() or m.end()
    return limit


def _piece_spans(text: str, max_chars: int) -> list[tuple[int, int]]:
    """(start, end) in `text` of the pieces `split_text` returns."""
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    spans: list[tuple[int, int]] = []
    pos, stop = _SPACES.match(text).end(), len(text.rstrip())
    while pos < stop:
        if stop - pos <= max_chars:
            spans.append((pos, stop))
            break
        # A fresh string, not finditer(text, pos): a piece starts anew, as if the text began there.
        window = text[pos : min(stop, pos + max_chars + _MAX_TAG_CHARS)]
        cut = _cut(window, max_chars)
        spans.append((pos, pos + len(window[:cut].rstrip())))
        pos = _SPACES.match(text, pos + cut).end()
    return spans


def split_text(text: str, max_chars: int) -> list[str]:
    """Split `text` into pieces of at most `max_chars` characters, each as long as it can be.

    Cuts prefer a sentence end (.?!), then a newline, then ; : or a comma, then a space; a word
    longer than `max_chars` is cut where it must be. Emotion tags are never cut, so a piece is
    longer than `max_chars` only when it is one tag longer than that (tags have at most 18).
    Whitespace between pieces is dropped; empty text gives no pieces. Time is linear in the text.
    """
    return [text[start:end] for start, end in _piece_spans(text, max_chars)]


def sentence_end(buffer: str, start: int = 0) -> int | None:
    """Index just past the last complete sentence in `buffer`, or None if it holds none yet.

    A sentence ends at .?! followed by whitespace (so "3.5" and a word still arriving do not
    count), or at a newline. Common abbreviations ("Dr.", "e.g.") do not end a sentence. Ends
    made of text before `start` are not looked for (the caller knows there are none).
    """
    best = None
    for m in _SENTENCE_END.finditer(buffer, start):
        if m.end() < len(buffer) and not _is_abbreviation(buffer, m.start()):  # at the end, "3." may become "3.5"
            best = m.end()
    newline = buffer.rfind("\n", start)
    if newline >= 0 and (best is None or newline + 1 > best):
        best = newline + 1
    return best


def _is_abbreviation(buffer: str, dot: int) -> bool:
    # Only the last few characters can make an abbreviation: a longer word is not one.
    word = _WORD.search(buffer, max(0, dot - _LONGEST_ABBREVIATION - 1), dot)
    return bool(word) and buffer[dot] == "." and word.group().lower() in _ABBREVIATIONS


class SentenceBuffer:
    """Collects streamed text (e.g. word by word from an LLM) and pops complete sentences.

    Text longer than `max_chars` without a sentence end is released in `split_text` pieces so
    the buffer stays bounded.
    """

    def __init__(self, max_chars: int):
        self.max_chars = max_chars
        self._buffer = ""
        self._settled = 0  # the buffer before this holds no sentence end, and no push can make one there

    @property
    def pending(self) -> str:
        """Text received but not yet released."""
        return self._buffer

    def push(self, text: str) -> list[str]:
        """Add `text`; return the complete sentences now available (possibly none)."""
        self._buffer += text
        out: list[str] = []
        end = sentence_end(self._buffer, self._settled)  # one scan of the new text, not of the whole buffer
        if end is not None:
            out += split_text(self._buffer[:end], self.max_chars)
            self._buffer = self._buffer[end:].lstrip()
        # Only a run of marks at the end can still become a sentence end ("Hi." + " there").
        self._settled = len(self._buffer.rstrip(_SENTENCE_END_CHARS))
        if len(self._buffer) > self.max_chars:
            self._settled = 0  # a piece cut inside a run of marks leaves a run that starts afresh
            spans = _piece_spans(self._buffer, self.max_chars)
            keep = len(self._buffer)  # all of it, unless the last piece fits with the whitespace after it
            if len(spans) > 1 and len(self._buffer) - spans[-1][0] <= self.max_chars:
                keep = spans.pop()[0]  # the last piece stays, with its trailing space, so the next word stays apart
            out += [self._buffer[start:end] for start, end in spans]
            self._buffer = self._buffer[keep:]
        return out

    def flush(self) -> list[str]:
        """Release whatever is left (end of the turn), as pieces of at most `max_chars`."""
        out = split_text(self._buffer, self.max_chars)
        self._buffer = ""
        self._settled = 0
        return out


def words(text: str) -> list[str]:
    """The spoken words of `text`: whitespace-separated, emotion tags removed."""
    return _TAG.sub(" ", text).split()


class WordClock:
    """Word times of one text while its audio is being produced, each word released once, never retracted.

    `advance(audio_s)` releases the words whose estimated start (their letters at
    `seconds_per_letter`) falls before `audio_s`, the audio produced so far counting the chunk
    about to go out, so each word goes out no later than the audio that holds its start.
    `finish(duration_s)` releases the rest once the real length is known, spread over the audio
    after the last word released. Times are non-decreasing, and no stop passes the audio produced.
    """

    def __init__(self, text: str, seconds_per_letter: float = SECONDS_PER_LETTER):
        self._words = words(text)
        letters = [max(1, sum(ch.isalnum() for ch in w)) for w in self._words]  # a word of marks counts one
        self._before = [0, *itertools.accumulate(letters)]  # letters before word i; [-1]: the whole text
        self._pace = seconds_per_letter
        self._next = 0  # the first word not released yet
        self._stop = 0.0  # stop of the last word released

    def advance(self, audio_s: float) -> list[tuple[str, float, float]]:
        """(word, start_s, stop_s) of the words whose estimated start is before `audio_s`, newly released."""
        out = []
        while self._next < len(self._words) and self._before[self._next] * self._pace < audio_s:
            start = self._before[self._next] * self._pace
            self._stop = min(self._before[self._next + 1] * self._pace, audio_s)  # the next word's start, at most
            out.append((self._words[self._next], start, self._stop))
            self._next += 1
        return out

    def finish(self, duration_s: float) -> list[tuple[str, float, float]]:
        """The words not released yet, shared by letters over [last stop, `duration_s`] (the audio's real length)."""
        first = self._next
        letters = self._before[-1] - self._before[first]
        rate = (max(duration_s, self._stop) - self._stop) / max(letters, 1)  # seconds per remaining letter
        out = [
            (self._words[i], self._stop + (self._before[i] - self._before[first]) * rate,
             self._stop + (self._before[i + 1] - self._before[first]) * rate)
            for i in range(first, len(self._words))
        ]  # fmt: skip
        self._next = len(self._words)
        self._stop = out[-1][2] if out else self._stop
        return out
