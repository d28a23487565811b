"""Who listens: ASR backends that turn an utterance back into text, and how far that text is from the sentence.

`faster-whisper` is what users with the weights run: an open-vocabulary recognizer whose WER
means what it says. `pocketsphinx` runs offline anywhere (its wheel ships an English model) but
knows only the eval's sentences (its language model is made from them): it tells speech of these
sentences from noise, silence or skipped words, which is what CI needs to prove the measuring
chain, and says nothing about open speech. Both are imported when chosen (the `eval` extra).
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from pipecat_orpheus.config import EvalConfig
from pipecat_orpheus.errors import ConfigError, ModelLoadError
from pipecat_orpheus.eval.sentences import SENTENCES, Sentence
from pipecat_orpheus.format import SAMPLE_RATE
from pipecat_orpheus.pcm import float_to_pcm16_bytes
from pipecat_orpheus.text import words

ASR_RATE = 16000  # both recognizers take 16 kHz mono
_EXTRA_HINT = "pip install -e '.[eval]' (or pip install 'pipecat-orpheus[eval]')"
_ANNOTATION = re.compile(r"[\[(][^\])]*[\])]")  # "(laughs)", "[LAUGHTER]": what an ASR writes for a tag
_INNER_MARK = re.compile(r"(?<=\w)[.'\u2019](?=\w)")  # it's -> its, p.m. -> pm: joined, on both sides


def normalize(text: str) -> str:
    """Lower-case words and digits only: what WER compares (tags, annotations and punctuation dropped)."""
    text = " ".join(words(_ANNOTATION.sub(" ", text))).lower()
    return " ".join(re.sub(r"[^a-z0-9]+", " ", _INNER_MARK.sub("", text)).split())


@dataclass(frozen=True, slots=True)
class Score:
    """Word and character error rates of one transcript against the closest accepted one."""

    wer: float
    cer: float
    reference: str  # the accepted transcript (normalized) it was scored against


def score(sentence: Sentence, transcript: str) -> Score:
    """WER and CER of `transcript` against the accepted transcript of `sentence` it is closest to (jiwer)."""
    import jiwer

    hypothesis = normalize(transcript)
    return min(
        (
            Score(jiwer.wer(ref, hypothesis), jiwer.cer(ref, hypothesis), ref)
            for ref in map(normalize, sentence.accepted)
        ),
        key=lambda s: (s.wer, s.cer),
    )


def to_asr_rate(pcm: np.ndarray, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Float32 mono PCM at `rate` resampled to 16 kHz (soxr, the resampler made for it)."""
    import soxr

    return soxr.resample(np.asarray(pcm, dtype=np.float32), rate, ASR_RATE).astype(np.float32)


class Transcriber(Protocol):
    """An ASR backend: float32 mono PCM at 16 kHz in, text out."""

    name: str
    model: str  # which model listens, for the report

    def transcribe(self, pcm: np.ndarray) -> str:
        """The words heard in `pcm` (16 kHz)."""
        ...


class PocketSphinx:
    """CMU PocketSphinx with its bundled US English acoustic model and a language model of the sentence set."""

    name = "pocketsphinx"
    model = "bundled US English, with a language model of the eval's sentences"

    def __init__(self, sentences: tuple[Sentence, ...] = SENTENCES):
        try:
            from pocketsphinx import Decoder, get_model_path
            from pocketsphinx.lm import ArpaBoLM
        except ImportError as e:
            raise ConfigError("eval.asr", f"pocketsphinx is not installed: {_EXTRA_HINT}") from e
        corpus = [normalize(s.accepted[0]) for s in sentences]  # accepted[0] is in words
        vocabulary = {w for line in corpus for w in line.split()}
        lm = ArpaBoLM(text="\n".join(corpus), add_start=True)  # sentence-start and -end markers: the decoder needs them
        lm.compute()
        with tempfile.TemporaryDirectory() as tmp:
            lm.write_file(str(Path(tmp) / "sentences.arpa"))
            # the pronunciations of these words only: loading all of CMUdict takes seconds
            cmudict = Path(get_model_path("en-us")) / "cmudict-en-us.dict"
            lines = [
                line for line in cmudict.read_text().splitlines() if line.split(" ", 1)[0].split("(")[0] in vocabulary
            ]
            (Path(tmp) / "sentences.dict").write_text("\n".join(lines) + "\n")
            self._decoder = Decoder(lm=f"{tmp}/sentences.arpa", dict=f"{tmp}/sentences.dict", loglevel="ERROR")

    def transcribe(self, pcm: np.ndarray) -> str:
        """Decode one whole utterance."""
        decoder = self._decoder
        decoder.start_utt()
        decoder.process_raw(float_to_pcm16_bytes(pcm), full_utt=True)
        decoder.end_utt()
        hyp = decoder.hyp()
        return hyp.hypstr if hyp is not None else ""


class FasterWhisper:
    """Whisper through faster-whisper (CTranslate2): English, beam search, no context between utterances.

    No sampled fallbacks (temperature 0 only): the same audio always gives the same transcript.
    """

    name = "faster-whisper"

    def __init__(self, model: str, device: str):
        try:
            from faster_whisper import WhisperModel
        except ImportError as e:
            raise ConfigError(
                "eval.asr", f"faster-whisper is not installed: {_EXTRA_HINT}, or set eval.asr=pocketsphinx"
            ) from e
        try:
            self._model = WhisperModel(model, device=device)
            self.model = model
        except (OSError, RuntimeError, ValueError) as e:
            raise ModelLoadError(
                f"cannot load the faster-whisper model {model!r} (eval.asr_model: a model name such as large-v3, "
                f"downloaded once, or a local CTranslate2 directory): {e}"
            ) from e

    def transcribe(self, pcm: np.ndarray) -> str:
        """Transcribe one utterance as English."""
        segments, _ = self._model.transcribe(
            pcm, language="en", beam_size=5, temperature=0.0, condition_on_previous_text=False, vad_filter=False
        )
        return " ".join(segment.text.strip() for segment in segments)


def load_transcriber(config: EvalConfig) -> Transcriber:
    """The ASR backend `eval.asr` names, loaded (blocking: a model may be downloaded)."""
    if config.asr == "pocketsphinx":
        return PocketSphinx()
    return FasterWhisper(config.asr_model, config.asr_device)
