"""Every Orpheus fact in one place: special token ids, the prompt, the 7-token audio frame.

Pure Python and numpy, no torch. Sources: Canopy Labs' Orpheus-TTS repository (the data-prep
scripts define `<custom_token_N>` = id 128256 + N and the training sequence
`SOH BOS text EOT EOH SOA SOS audio EOS EOA`; its `orpheus_tts/decoder.py` gives the frame layout) and the
model's `config.json` (Llama-3.2 3B: vocabulary 156,940).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

# Llama-3 specials and Orpheus's <custom_token_N> (id 128256 + N).
BOS = 128000  # <|begin_of_text|>
EOT = 128009  # <|eot_id|>
START_OF_SPEECH = 128257  # <custom_token_1>
END_OF_SPEECH = 128258  # <custom_token_2>: the only stop token that matters
START_OF_HUMAN = 128259  # <custom_token_3>
END_OF_HUMAN = 128260  # <custom_token_4>
START_OF_AI = 128261  # <custom_token_5>
PAD = 128263  # <custom_token_7>
AUDIO_TOKEN_OFFSET = 128266  # <custom_token_10>: code 0 of frame position 0
VOCAB_SIZE = 156940  # 128256 Llama-3 ids + 28684 custom tokens (7 * 4096 audio + 12 specials)
TEXT_VOCAB_SIZE = 128256  # ids below this are the Llama-3 tokenizer's own

CODEBOOK_SIZE = 4096  # SNAC 24 kHz codebook size
FRAME_TOKENS = 7  # one frame = L0[i], L1[2i], L2[4i], L2[4i+1], L1[2i+1], L2[4i+2], L2[4i+3]
AUDIO_TOKEN_END = AUDIO_TOKEN_OFFSET + FRAME_TOKENS * CODEBOOK_SIZE  # 156938, exclusive
SAMPLE_RATE = 24000  # SNAC 24 kHz
SAMPLES_PER_FRAME = 2048  # 4 latent steps of hop 512 = 85.33 ms
TOKENS_PER_SECOND = FRAME_TOKENS * SAMPLE_RATE / SAMPLES_PER_FRAME  # 82.03: real time

# Frame position k -> (codebook level, index within the frame's codes of that level).
FRAME_LAYOUT = ((0, 0), (1, 0), (2, 0), (2, 1), (1, 1), (2, 2), (2, 3))
L1_POSITIONS = tuple(k for k, (level, _) in enumerate(FRAME_LAYOUT) if level == 1)  # (1, 4)
L2_POSITIONS = tuple(k for k, (level, _) in enumerate(FRAME_LAYOUT) if level == 2)  # (2, 3, 5, 6)
FRAME_OFFSETS = AUDIO_TOKEN_OFFSET + CODEBOOK_SIZE * np.arange(FRAME_TOKENS)  # (7,) token id - code at position k

EMOTION_TAGS = ("<laugh>", "<chuckle>", "<sigh>", "<cough>", "<sniffle>", "<groan>", "<yawn>", "<gasp>")

PROMPT_PREFIX = (START_OF_HUMAN, BOS)
PROMPT_SUFFIX = (EOT, END_OF_HUMAN, START_OF_AI, START_OF_SPEECH)


class TextTokenizer(Protocol):
    """The part of a Hugging Face tokenizer that prompt building needs."""

    def encode(self, text: str, add_special_tokens: bool = ..., split_special_tokens: bool = ...) -> list[int]:
        """Token ids of `text`."""
        ...


def build_prompt(tokenizer: TextTokenizer, text: str, voice: str | None) -> list[int]:
    """Token ids of the Orpheus prompt `SOH BOS "{voice}: {text}" EOT EOH SOA SOS`.

    The text is encoded without special tokens so that BOS appears exactly once, and text that
    spells a special token (`<|eot_id|>`, `<custom_token_2>`) stays text: a client or an LLM's
    output cannot forge the model's turn or insert audio tokens. Emotion tags such as `<laugh>` are
    plain text to the Llama-3 tokenizer, so they are unaffected.
    """
    spoken = f"{voice}: {text}" if voice else text
    ids = tokenizer.encode(spoken, add_special_tokens=False, split_special_tokens=True)
    return [*PROMPT_PREFIX, *ids, *PROMPT_SUFFIX]


def audio_token(position: int, code: int) -> int:
    """Token id of SNAC `code` at frame position `position` (0..6)."""
    return AUDIO_TOKEN_OFFSET + CODEBOOK_SIZE * position + code


def is_audio_token(token: int) -> bool:
    """Whether `token` is one of the 7 * 4096 audio tokens."""
    return AUDIO_TOKEN_OFFSET <= token < AUDIO_TOKEN_END


def frame_codes(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    """Audio token ids (a whole number of 7-token frames) -> frame-ordered codes (n, 7) int64.

    ValueError if the count is not a whole number of frames or a token is not the audio token of its position.
    """
    ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if len(ids) % FRAME_TOKENS:
        raise ValueError(f"{len(ids)} tokens is not a whole number of {FRAME_TOKENS}-token frames")
    codes = ids.reshape(-1, FRAME_TOKENS) - FRAME_OFFSETS  # (n, 7)
    if codes.size and (codes.min() < 0 or codes.max() >= CODEBOOK_SIZE):
        k = int(np.argmax((codes < 0) | (codes >= CODEBOOK_SIZE)))
        raise ValueError(f"token {int(ids[k])} is not an audio token of frame position {k % FRAME_TOKENS}")
    return codes


def frames_to_snac_codes(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split frame-ordered codes (n, 7) into SNAC's three codebooks of lengths n, 2n and 4n."""
    frames = np.asarray(frames, dtype=np.int64).reshape(-1, FRAME_TOKENS)  # (n, 7)
    l0 = frames[:, 0]  # (n,)
    l1 = frames[:, L1_POSITIONS].reshape(-1)  # (2n,)
    l2 = frames[:, L2_POSITIONS].reshape(-1)  # (4n,)
    return l0, l1, l2


def snac_codes_to_frames(l0: np.ndarray, l1: np.ndarray, l2: np.ndarray) -> np.ndarray:
    """Inverse of `frames_to_snac_codes`: three codebooks -> frame-ordered codes (n, 7)."""
    n = len(l0)
    if len(l1) != 2 * n or len(l2) != 4 * n:
        raise ValueError(f"codebook lengths must be n, 2n, 4n; got {len(l0)}, {len(l1)}, {len(l2)}")
    frames = np.zeros((n, FRAME_TOKENS), dtype=np.int64)
    frames[:, 0] = l0
    frames[:, L1_POSITIONS] = np.asarray(l1).reshape(n, 2)
    frames[:, L2_POSITIONS] = np.asarray(l2).reshape(n, 4)
    return frames


def codes_to_tokens(frames: np.ndarray) -> list[int]:
    """Frame-ordered codes (n, 7) -> the 7n audio token ids the model emits."""
    frames = np.asarray(frames, dtype=np.int64).reshape(-1, FRAME_TOKENS)
    return (frames + FRAME_OFFSETS).reshape(-1).tolist()


def allowed_token_range(position: int) -> tuple[int, int]:
    """[start, end) of the token ids allowed at frame position `position` (0..6)."""
    start = audio_token(position, 0)
    return start, start + CODEBOOK_SIZE
