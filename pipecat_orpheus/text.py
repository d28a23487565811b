"""Text handling around the model: split long text into pieces, find sentence ends, estimate word timings.

Orpheus loses the plot past ~280 characters (research/orpheus.md 2.5), so long text is split at
sentence boundaries and the pieces are spoken in order as one utterance. Emotion tags such as
`<laugh>` are never cut and never counted as words.
"""

from __future__ import annotations

import re

_TAG = re.compile(r"<[A-Za-z_]+>")  # an emotion tag like <laugh>
_SENTENCE_END = re.compile(r"[.?!…]+[\"')\]]*(?=\s|$)")  # .?! (with closing quotes) before a space or the end
_NEWLINE = re.compile(r"\n")
_CLAUSE_END = re.compile(r"[;:,](?=\s|$)")
_SPACE = re.compile(r"\s")
# Abbreviations whose period does not end a sentence when text is streamed.
_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "no"})


def _tag_spans(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in _TAG.finditer(text)]


def _inside_tag(pos: int, spans: list[tuple[int, int]]) -> bool:
    return any(start < pos < end for start, end in spans)


def _last_cut(text: str, limit: int, pattern: re.Pattern, spans: list[tuple[int, int]]) -> int | None:
    """The largest cut position <= limit just after a match of `pattern` (None if there is none)."""
    best = None
    for m in pattern.finditer(text, 0, len(text)):
        cut = m.end()
        if cut > limit:
            break
        if cut > 0 and not _inside_tag(cut, spans):
            best = cut
    return best


def split_text(text: str, max_chars: int) -> list[str]:
    """Split `text` into pieces of at most `max_chars` characters, each as long as it can be.

    Cuts prefer a sentence end (.?!), then a newline, then ; : or a comma, then a space; a word
    longer than `max_chars` is cut where it must be. Emotion tags are never cut. Whitespace
    between pieces is dropped; empty text gives no pieces.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    pieces: list[str] = []
    rest = text.strip()
    while rest:
        if len(rest) <= max_chars:
            pieces.append(rest)
            break
        spans = _tag_spans(rest)
        cut = None
        for pattern in (_SENTENCE_END, _NEWLINE, _CLAUSE_END, _SPACE):
            cut = _last_cut(rest, max_chars, pattern, spans)
            if cut:
                break
        if not cut:  # one long word: cut at the limit, or just past a tag that straddles it
            cut = max_chars
            for start, end in spans:
                if start < cut < end:
                    cut = start if start > 0 else end
        piece, rest = rest[:cut].strip(), rest[cut:].strip()
        if piece:
            pieces.append(piece)
    return pieces


def sentence_end(buffer: str) -> int | None:
    """Index just past the last complete sentence in `buffer`, or None if it holds none yet.

    A sentence ends at .?! followed by whitespace (so "3.5" and a word still arriving do not
    count), or at a newline. Common abbreviations ("Dr.", "e.g.") do not end a sentence.
    """
    best = None
    for pattern in (_SENTENCE_END, _NEWLINE):
        for m in pattern.finditer(buffer):
            if m.end() >= len(buffer) and pattern is _SENTENCE_END:
                continue  # no whitespace after it yet: more may follow ("3." of "3.5")
            if pattern is _SENTENCE_END and _is_abbreviation(buffer, m.start()):
                continue
            if best is None or m.end() > best:
                best = m.end()
    return best


def _is_abbreviation(buffer: str, dot: int) -> bool:
    word = re.search(r"([\w.]+)$", buffer[:dot])
    return bool(word) and buffer[dot] == "." and word.group(1).lower() in _ABBREVIATIONS


class SentenceBuffer:
    """Collects streamed text (e.g. word by word from an LLM) and pops complete sentences.

    Text longer than `max_chars` without a sentence end is released in `split_text` pieces so
    the buffer stays bounded.
    """

    def __init__(self, max_chars: int):
        self.max_chars = max_chars
        self._buffer = ""

    @property
    def pending(self) -> str:
        """Text received but not yet released."""
        return self._buffer

    def push(self, text: str) -> list[str]:
        """Add `text`; return the complete sentences now available (possibly none)."""
        self._buffer += text
        out: list[str] = []
        end = sentence_end(self._buffer)
        if end is not None:
            out += split_text(self._buffer[:end], self.max_chars)
            self._buffer = self._buffer[end:].lstrip()
        while len(self._buffer) > self.max_chars:
            pieces = split_text(self._buffer, self.max_chars)
            out.append(pieces[0])
            self._buffer = self._buffer.strip()[len(pieces[0]) :].lstrip()
        return out

    def flush(self) -> list[str]:
        """Release whatever is left (end of the turn), as pieces of at most `max_chars`."""
        out = split_text(self._buffer, self.max_chars)
        self._buffer = ""
        return out


def words(text: str) -> list[str]:
    """The spoken words of `text`: whitespace-separated, emotion tags removed."""
    return _TAG.sub(" ", text).split()


def word_timings(text: str, start_s: float, duration_s: float) -> list[tuple[str, float, float]]:
    """Estimate (word, start_s, stop_s) for the words of `text` spoken over `duration_s` seconds.

    Each word's share of the time is proportional to its letters and digits (at least one), so
    the estimate is monotonic and ends exactly at `start_s + duration_s`. Emotion tags are excluded.
    """
    ws = words(text)
    if not ws:
        return []
    weights = [max(1, sum(ch.isalnum() for ch in w)) for w in ws]
    total = sum(weights)
    out, acc = [], 0
    for w, weight in zip(ws, weights, strict=True):
        begin = start_s + duration_s * acc / total
        acc += weight
        out.append((w, begin, start_s + duration_s * acc / total))
    return out
