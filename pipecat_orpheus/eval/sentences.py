"""What the eval speaks: a fixed, public-domain sentence set, the same for every run and configuration.

The Harvard sentences (IEEE Recommended Practice for Speech Quality Measurements, 1969; public
domain, phonetically balanced, the usual intelligibility material), then what a voice agent
says: short turns, numbers, emotion tags and one long answer that is split into pieces. Each
sentence carries the transcripts an ASR may rightly give (numbers as words or digits); tags are
not words, so they are in no transcript.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pipecat_orpheus.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Sentence:
    """One text to speak, with every transcript that counts as right (`accepted[0]` in words)."""

    id: str
    kind: str  # harvard | short | number | tag | long
    text: str
    accepted: tuple[str, ...]


def _plain(id: str, kind: str, text: str) -> Sentence:
    """A sentence whose words are its transcript."""
    return Sentence(id, kind, text, (text,))


_HARVARD = (
    # list 1
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.",
    "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.",
    "A large size in stockings is hard to sell.",
    # list 2
    "The boy was there when the sun rose.",
    "A rod is used to catch pink salmon.",
    "The source of the huge river is the clear spring.",
    "Kick the ball straight and follow through.",
    "Help the woman get back to her feet.",
    "A pot of tea helps to pass the evening.",
    "Smoky fires lack flame and heat.",
    "The soft cushion broke the man's fall.",
    "The salt breeze came across from the sea.",
    "The girl at the booth sold fifty bonds.",
)

_SHORT = (
    Sentence("short01", "short", "Okay.", ("okay", "ok")),
    Sentence("short02", "short", "Sure, I can help with that.", ("sure i can help with that",)),
    Sentence("short03", "short", "Hello! How are you today?", ("hello how are you today",)),
    Sentence("short04", "short", "Got it, thanks.", ("got it thanks",)),
    Sentence("short05", "short", "One moment, please.", ("one moment please",)),
)

_NUMBERS = (
    Sentence(
        "number01",
        "number",
        "The meeting starts at 3 pm on Friday.",
        ("the meeting starts at three pm on friday", "the meeting starts at 3 pm on friday"),
    ),
    Sentence(
        "number02",
        "number",
        "Your total comes to 42 dollars.",
        ("your total comes to forty two dollars", "your total comes to 42 dollars", "your total comes to 42"),
    ),
    Sentence(
        "number03",
        "number",
        "There are 365 days in a year.",
        (
            "there are three hundred sixty five days in a year",
            "there are three hundred and sixty five days in a year",
            "there are 365 days in a year",
        ),
    ),
    Sentence(
        "number04",
        "number",
        "Flight 209 leaves from gate 12.",
        (
            "flight two oh nine leaves from gate twelve",
            "flight two zero nine leaves from gate twelve",
            "flight two hundred nine leaves from gate twelve",
            "flight two hundred and nine leaves from gate twelve",
            "flight 209 leaves from gate 12",
        ),
    ),
)

_TAGS = (
    _plain("tag01", "tag", "That is the funniest thing I have heard all week <laugh>."),
    _plain("tag02", "tag", "Well <sigh> I suppose we could try again tomorrow."),
    _plain("tag03", "tag", "Oh <gasp> you scared me!"),
    _plain("tag04", "tag", "Sorry <cough> let me start over."),
    _plain("tag05", "tag", "It has been a long day <yawn> and I am ready for bed."),
)

_LONG = _plain(
    "long01",
    "long",
    "Thanks for calling. I looked up your account, and your last payment arrived on time. Your next bill "
    "will be a little higher, because the discount you had last year has ended. If you like, I can walk you "
    "through the new plans, or send a summary to your email address. Is there anything else I can help you "
    "with today?",
)

SENTENCES: tuple[Sentence, ...] = (
    *(_plain(f"harvard{i:02d}", "harvard", text) for i, text in enumerate(_HARVARD, 1)),
    *_SHORT,
    *_NUMBERS,
    *_TAGS,
    _LONG,
)


def select(names: Sequence[str] | None = None, limit: int | None = None) -> list[Sentence]:
    """The sentences named by id or kind (all for none), in set order, at most `limit` of them."""
    chosen = list(SENTENCES)
    if names:
        known = {s.id for s in SENTENCES} | {s.kind for s in SENTENCES}
        unknown = [n for n in names if n not in known]
        if unknown:
            kinds = ", ".join(dict.fromkeys(s.kind for s in SENTENCES))
            raise ConfigError("--sentences", f"{unknown[0]!r} is neither a sentence id nor a kind ({kinds})")
        chosen = [s for s in SENTENCES if s.id in names or s.kind in names]
    if limit is not None and limit < 1:
        raise ConfigError("--limit", f"must be at least 1, got {limit}")
    return chosen[:limit]
