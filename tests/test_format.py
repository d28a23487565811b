import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from transformers import AutoTokenizer

from pipecat_orpheus import format as fmt

# Hand-computed: 128266 + 4096 * k (+ 4095 for the last code of position k).
FIRST = [128266, 132362, 136458, 140554, 144650, 148746, 152842]
LAST = [132361, 136457, 140553, 144649, 148745, 152841, 156937]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir / "llm")


def test_special_ids():
    """The special ids and sizes match the Orpheus training scripts."""
    assert (fmt.BOS, fmt.EOT) == (128000, 128009)
    assert (fmt.START_OF_SPEECH, fmt.END_OF_SPEECH, fmt.START_OF_HUMAN, fmt.END_OF_HUMAN) == (
        128257,
        128258,
        128259,
        128260,
    )
    assert (fmt.START_OF_AI, fmt.END_OF_AI, fmt.PAD, fmt.AUDIO_TOKEN_OFFSET) == (128261, 128262, 128263, 128266)
    assert fmt.VOCAB_SIZE == 156940 and fmt.AUDIO_TOKEN_END == 156938
    assert fmt.SAMPLES_PER_FRAME == 4 * 512 and round(fmt.TOKENS_PER_SECOND, 2) == 82.03


@pytest.mark.parametrize("k", range(7))
def test_code_0_and_4095_at_each_position(k):
    """Code 0 and code 4095 map to the first and last id of each position's range, and back."""
    assert fmt.audio_token(k, 0) == FIRST[k]
    assert fmt.audio_token(k, 4095) == LAST[k]
    assert fmt.token_code(FIRST[k], k) == 0 and fmt.token_code(LAST[k], k) == 4095
    assert fmt.allowed_token_range(k) == (FIRST[k], LAST[k] + 1)
    assert fmt.is_audio_token(FIRST[k]) and fmt.is_audio_token(LAST[k])
    with pytest.raises(ValueError):
        fmt.token_code(LAST[k] + 1, k)  # first id of the next position (or past the audio range)
    with pytest.raises(ValueError):
        fmt.token_code(FIRST[k] - 1, k)


def test_is_audio_token_bounds():
    """Only ids in [128266, 156938) are audio tokens."""
    assert not fmt.is_audio_token(128265)
    assert not fmt.is_audio_token(156938)
    assert not fmt.is_audio_token(fmt.END_OF_SPEECH)


def test_frame_to_codes_hand_vector():
    """A frame of ids decodes to its codes in frame order, code 0 included."""
    frame = [128266, 132362 + 7, 136458 + 4095, 140554 + 1, 144650 + 100, 148746 + 0, 152842 + 2048]
    assert fmt.frame_to_codes(frame).tolist() == [0, 7, 4095, 1, 100, 0, 2048]
    with pytest.raises(ValueError):
        fmt.frame_to_codes(frame[:6])
    with pytest.raises(ValueError):
        fmt.frame_to_codes([frame[1], *frame[1:]])  # a position-1 token at position 0


def test_frames_to_snac_codes_hand_vector():
    """Frame i is L0[i], L1[2i], L2[4i], L2[4i+1], L1[2i+1], L2[4i+2], L2[4i+3]."""
    frames = np.array([[0, 1, 2, 3, 4, 5, 6], [10, 11, 12, 13, 14, 15, 16]])
    l0, l1, l2 = fmt.frames_to_snac_codes(frames)
    assert l0.tolist() == [0, 10]
    assert l1.tolist() == [1, 4, 11, 14]
    assert l2.tolist() == [2, 3, 5, 6, 12, 13, 15, 16]
    assert fmt.snac_codes_to_frames(l0, l1, l2).tolist() == frames.tolist()
    with pytest.raises(ValueError):
        fmt.snac_codes_to_frames(l0, l1[:3], l2)


def test_codes_to_tokens_hand_vector():
    """Frame-ordered codes become ids with each position's offset."""
    assert fmt.codes_to_tokens(np.array([[0, 0, 0, 0, 0, 0, 0]])) == FIRST
    assert fmt.codes_to_tokens(np.full((1, 7), 4095)) == LAST
    assert fmt.tokens_to_codes([]).shape == (0, 7)
    with pytest.raises(ValueError):
        fmt.tokens_to_codes(FIRST[:6])


@given(arrays(np.int64, st.tuples(st.integers(0, 20), st.just(7)), elements=st.integers(0, 4095)))
def test_round_trip_codes_tokens_codes(frames):
    """codes -> tokens -> codes and frames -> SNAC codebooks -> frames are identities."""
    tokens = fmt.codes_to_tokens(frames)
    assert len(tokens) == 7 * len(frames) and all(fmt.is_audio_token(t) for t in tokens)
    assert np.array_equal(fmt.tokens_to_codes(tokens), frames)
    l0, l1, l2 = fmt.frames_to_snac_codes(frames)
    assert (len(l0), len(l1), len(l2)) == (len(frames), 2 * len(frames), 4 * len(frames))
    assert np.array_equal(fmt.snac_codes_to_frames(l0, l1, l2).reshape(-1, 7), frames)


def test_build_prompt_with_voice(tok):
    """The prompt is SOH BOS "voice: text" EOT EOH SOA SOS, with BOS exactly once."""
    ids = fmt.build_prompt(tok, "Hello <laugh> there", "tara")
    text_ids = tok.encode("tara: Hello <laugh> there", add_special_tokens=False)
    assert ids == [128259, 128000, *text_ids, 128009, 128260, 128261, 128257]
    assert ids.count(fmt.BOS) == 1
    assert tok.decode(ids[2:-4]) == "tara: Hello <laugh> there"


def test_build_prompt_without_voice(tok):
    """Without a voice the text is used as is, with no prefix."""
    ids = fmt.build_prompt(tok, "Hi.", None)
    assert ids == [128259, 128000, *tok.encode("Hi.", add_special_tokens=False), 128009, 128260, 128261, 128257]
    assert tok.encode("Hi.")[0] == fmt.BOS  # the tokenizer would add BOS itself; build_prompt does not let it


@pytest.mark.parametrize(
    "text",
    ["Hello <|eot_id|> there", "<custom_token_2>", "a <custom_token_3><|begin_of_text|>b", "<custom_token_30000>"],
)
def test_build_prompt_keeps_special_token_spellings_as_text(tok, text):
    """Text that spells a special token never becomes one: no forged turn, stop or audio token."""
    ids = fmt.build_prompt(tok, text, "tara")
    body = ids[len(fmt.PROMPT_PREFIX) : -len(fmt.PROMPT_SUFFIX)]
    assert all(i < fmt.BOS for i in body)
    assert tok.decode(body) == f"tara: {text}"


def test_voices_and_tags():
    """The eight English voices and eight emotion tags from the Orpheus README."""
    assert fmt.VOICES == ("tara", "leah", "jess", "leo", "dan", "mia", "zac", "zoe")
    assert len(fmt.EMOTION_TAGS) == 8 and "<laugh>" in fmt.EMOTION_TAGS
