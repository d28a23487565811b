"""The measuring chain: known speech scores a low WER, the tiny model's noise scores near 1.0, transcripts normalize."""

from __future__ import annotations

import asyncio
import io
import shutil
import subprocess
import sys
import wave

import numpy as np
import pytest

from pipecat_orpheus.engine.request import SamplingParams
from pipecat_orpheus.errors import ConfigError
from pipecat_orpheus.eval.asr import FasterWhisper, PocketSphinx, load_transcriber, normalize, score, to_asr_rate
from pipecat_orpheus.eval.sentences import SENTENCES
from pipecat_orpheus.pcm import int16_to_float
from pipecat_orpheus.speech import speak

KNOWN = [s for s in SENTENCES if s.kind == "harvard"][:4]
ESPEAK_VOICE = ["-v", "en-us+klatt3", "-s", "150"]  # the Klatt voice PocketSphinx's acoustic model hears best


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sphinx() -> PocketSphinx:
    return PocketSphinx()


def espeak(text: str) -> tuple[np.ndarray, int]:
    """`text` spoken by espeak-ng: float32 PCM and its sample rate."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is missing: apt-get install espeak-ng (.ci/run installs it)")
    wav = subprocess.run(["espeak-ng", *ESPEAK_VOICE, "--stdout", text], capture_output=True, check=True).stdout
    with wave.open(io.BytesIO(wav)) as w:
        return int16_to_float(np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")), w.getframerate()


def test_speech_of_known_sentences_scores_a_low_wer_and_the_tiny_models_noise_near_one(sphinx, synth):
    """espeak-ng's Harvard sentences through the offline ASR and the WER code score <= 0.25; the tiny model's >= 0.9."""
    speech = [sphinx.transcribe(to_asr_rate(*espeak(s.text))) for s in KNOWN]
    speech_wer = np.mean([score(s, heard).wer for s, heard in zip(KNOWN, speech, strict=True)])
    sampling = SamplingParams(max_tokens=70, seed=1)  # 10 frames: 0.85 s of noise each

    async def noise() -> list[np.ndarray]:
        return [(await speak(synth, s.text, sampling=sampling)).audio for s in KNOWN]

    heard_noise = [sphinx.transcribe(to_asr_rate(pcm)) for pcm in asyncio.run(noise())]
    noise_wer = np.mean([score(s, heard).wer for s, heard in zip(KNOWN, heard_noise, strict=True)])
    assert speech_wer <= 0.25, speech
    assert noise_wer >= 0.9, heard_noise


def test_transcripts_normalize_numbers_tags_and_punctuation():
    """Digits or words, ASR annotations of a tag, case and punctuation all score as the same words."""
    by_id = {s.id: s for s in SENTENCES}
    assert normalize("It's 3 P.M., <laugh> (laughs) [Laughter] OK!") == "its 3 pm ok"
    assert score(by_id["number02"], "Your total comes to $42.").wer == 0
    assert score(by_id["number02"], "your total comes to forty two dollars").wer == 0
    assert score(by_id["tag01"], "That is the funniest thing I have heard all week. (laughs)").wer == 0
    assert score(by_id["short01"], "OK.").wer == 0
    skipped = score(by_id["harvard01"], "the birch canoe slid on the planks")
    assert skipped.wer == pytest.approx(1 / 8) and skipped.cer == pytest.approx(len("smooth ") / 41)
    assert score(by_id["harvard01"], "").wer == 1.0


def test_faster_whisper_transcribes_through_the_library(whisper_dir):
    """The faster-whisper backend runs a (tiny, random) CTranslate2 Whisper offline and returns its text."""
    if whisper_dir is None:
        pytest.skip("faster-whisper is not installed: pip install -e '.[eval]'")
    heard = FasterWhisper(str(whisper_dir), "cpu").transcribe(np.zeros(8000, dtype=np.float32))
    assert isinstance(heard, str)


def test_a_missing_asr_says_which_extra_to_install(monkeypatch, config):
    """Without faster-whisper installed, eval.asr=faster-whisper fails at once naming the eval extra."""
    monkeypatch.setitem(sys.modules, "faster_whisper", None)  # what an import of an absent package raises
    with pytest.raises(ConfigError, match=r"eval\.asr.*\[eval\]"):
        load_transcriber(config.eval)
