"""`OrpheusTTSService`: Orpheus speech in a Pipecat pipeline, from this process or from a server.

One class over one `Synthesizer`, picked by the constructor: without `url` it is the process-wide
shared engine (`load_synthesizer`: loaded once, shared by every pipeline); with `url` it is a
`RemoteSynthesizer`, an Orpheus server (ours or the Modal deployment) over one connection.
Either way one sentence is one cancellable stream of 24 kHz float32 PCM, so everything
Pipecat-facing (frames, resampling, metrics, word times, interruption, errors) is written once;
only opening and closing the source differ.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from loguru import logger
from pipecat.audio.utils import create_stream_resampler
from pipecat.frames.frames import CancelFrame, EndFrame, Frame, StartFrame, TTSAudioRawFrame
from pipecat.services.settings import TTSSettings
from pipecat.services.tts_service import TTSService
from pipecat.utils.errors import ErrorCategory
from pipecat.utils.tracing.service_decorators import traced_tts
from pipecat.utils.types import NOT_GIVEN, NotGiven

from pipecat_orpheus import format as fmt
from pipecat_orpheus.config import Config, load_config
from pipecat_orpheus.engine.request import SamplingParams
from pipecat_orpheus.errors import (
    AuthError,
    EngineBusy,
    InvalidRequest,
    ModelLoadError,
    ProtocolError,
    RequestCancelled,
)
from pipecat_orpheus.pcm import float_to_pcm16_bytes
from pipecat_orpheus.speech import SpeechStream, Synthesizer, load_synthesizer
from pipecat_orpheus.text import word_timings
from pipecat_orpheus.wire.client import OrpheusClient
from pipecat_orpheus.wire.remote import RemoteSynthesizer

_SAMPLING_FIELDS = ("temperature", "top_p", "repetition_penalty", "max_tokens")


@dataclass
class OrpheusTTSSettings(TTSSettings):
    """Runtime-updatable settings of `OrpheusTTSService` (send a `TTSUpdateSettingsFrame`).

    Attributes:
        temperature: Sampling temperature (0 = greedy); Orpheus sounds best near 0.6.
        top_p: Nucleus sampling mass, in (0, 1].
        repetition_penalty: >= 1.1 keeps Orpheus from looping.
        max_tokens: Audio tokens per sentence at most (82 tokens = 1 s of audio).
    """

    temperature: float | None | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    top_p: float | None | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    repetition_penalty: float | None | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    max_tokens: int | None | NotGiven = field(default_factory=lambda: NOT_GIVEN)


class OrpheusTTSService(TTSService):
    """Orpheus TTS, local (the in-process shared engine) or remote (an Orpheus WebSocket server).

    Audio is 24 kHz mono, pushed as it is decoded and resampled to the pipeline's output rate
    when that differs. Word times are estimated from the audio actually generated and are
    cumulative over the sentences of a turn, so only words the listener heard reach the
    conversation context. An interruption cancels the engine request (or the server utterance)
    at once; every sentence has its own request id, since a turn's sentences share a context id.

    Example::

        tts = OrpheusTTSService(settings=OrpheusTTSService.Settings(voice="leo"))  # local GPU
        tts = OrpheusTTSService(url="wss://you--pipecat-orpheus.modal.run", api_key=key)  # remote
    """

    Settings = OrpheusTTSSettings
    _settings: OrpheusTTSSettings

    def __init__(
        self,
        *,
        config: Config | None = None,
        url: str | None = None,
        api_key: str | None = None,
        client: OrpheusClient | None = None,
        settings: OrpheusTTSSettings | None = None,
        **kwargs: Any,
    ):
        """Create the service; nothing is loaded or connected until the pipeline starts.

        Args:
            config: Model, engine, voice and sampling defaults (default: `load_config()`, i.e.
                orpheus_config.yaml then `ORPHEUS_*` variables). Local mode loads `config.model`.
            url: Address of an Orpheus server (`ws://host:8000`, or a Modal deployment's
                `wss://...`). Given: remote mode, whose sampling is the server's own. None: local mode.
            api_key: The server's API key (remote mode), if it requires one.
            client: Remote mode with a client of your own instead of `url`/`api_key`, e.g. with a
                longer `open_timeout_s` for a deployment that scales to zero (cold starts).
            settings: Voice and sampling overrides, applied over the config's defaults.
            **kwargs: Passed to `TTSService` (e.g. `sample_rate`, `text_transforms`).
        """
        self._config = config if config is not None else load_config()
        sampling = self._config.sampling
        local = url is None and client is None
        defaults = self.Settings(
            model=self._config.model.llm if local else None,
            voice=self._config.voices.default,
            language=None,
            temperature=sampling.temperature if local else None,
            top_p=sampling.top_p if local else None,
            repetition_penalty=sampling.repetition_penalty if local else None,
            max_tokens=sampling.max_tokens if local else None,
        )
        if settings is not None:
            defaults.apply_update(settings)
        self._check_settings(defaults)
        # Word frames come from our own timings, so text reaches the context only once heard.
        super().__init__(
            push_start_frame=True, push_stop_frames=True, push_text_frames=False, settings=defaults, **kwargs
        )
        if not local and settings is not None:
            self._warn_unhandled_updated_settings(set(_SAMPLING_FIELDS) & set(settings.given_fields()))
        self._remote = None if local else RemoteSynthesizer(client or OrpheusClient(url, api_key=api_key))
        self._synth: Synthesizer | None = self._remote  # local: the shared engine, once loaded at start
        self._inflight: dict[SpeechStream, str] = {}  # stream of a sentence being spoken -> its context id
        self._context_audio_s: dict[str, float] = {}  # audio already generated in each context (turn)
        # Never cleared on a timer: a slow chunk must not lose the filter's history mid-sentence.
        self._out_resampler = create_stream_resampler(clear_after_secs=None)

    def can_generate_metrics(self) -> bool:
        """TTFB, processing and usage (characters) metrics are reported."""
        return True

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, frame: StartFrame):
        """Load the shared engine off the event loop (local), or connect to the server (remote)."""
        await super().start(frame)
        try:
            if self._remote is None:
                self._synth = await asyncio.to_thread(load_synthesizer, self._config)
            else:
                await self._remote.connect()
        except ModelLoadError as e:
            await self._report(e, "could not load the Orpheus model")
        except (AuthError, EngineBusy, ConnectionError, ProtocolError) as e:
            await self._report(e, f"could not connect to {self._remote.client.url}")

    async def stop(self, frame: EndFrame):
        """Finish the queued audio, then release this service's requests and connection."""
        await super().stop(frame)
        await self._shutdown()

    async def cancel(self, frame: CancelFrame):
        """Stop at once: cancel in-flight requests and close the connection."""
        await super().cancel(frame)
        await self._shutdown()

    async def cleanup(self):
        """Always runs at teardown, even when no EndFrame or CancelFrame came: release everything."""
        await super().cleanup()
        await self._shutdown()

    async def _shutdown(self) -> None:
        """Cancel this service's sentences (never the shared engine itself) and close the connection."""
        for stream in list(self._inflight):
            stream.cancel()
        self._inflight.clear()
        if self._remote is not None:
            await self._remote.aclose()  # the server cancels whatever the connection still had running

    # -- settings --------------------------------------------------------------------------

    async def _update_settings(self, delta: TTSSettings) -> dict[str, Any]:
        """Apply a runtime delta; a bad value is refused (and reported), not applied."""
        changed = await super()._update_settings(delta)
        try:
            self._check_settings(self._settings)
        except InvalidRequest as e:
            for name, old in changed.items():
                setattr(self._settings, name, old)
            await self.push_error(f"Orpheus setting refused: {e}", exception=e, category=ErrorCategory.APPLICATION)
            return {}
        fixed = {"model"} | (set(_SAMPLING_FIELDS) if self._remote is not None else set())
        self._warn_unhandled_updated_settings(fixed & set(changed))  # the server samples as it is configured
        return changed

    def _check_settings(self, settings: OrpheusTTSSettings) -> None:
        self._config.voices.check(settings.voice)
        self._sampling(settings)

    def _sampling(self, settings: OrpheusTTSSettings) -> SamplingParams:
        overrides = {name: getattr(settings, name) for name in _SAMPLING_FIELDS}
        return SamplingParams.from_config(self._config.sampling, **overrides)

    # -- synthesis -------------------------------------------------------------------------

    @traced_tts
    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame | None, None]:
        """Speak one sentence: audio frames as they are decoded, then its word times.

        Args:
            text: The sentence (the base class aggregates LLM tokens into sentences).
            context_id: The turn's audio context, shared by the sentences of one reply.
        """
        offset_s = self._context_audio_s.get(context_id, 0.0)  # where this sentence starts in the turn
        samples = 0  # 24 kHz samples of this sentence so far
        await self.start_tts_usage_metrics(text)
        await self._out_resampler.reset()
        stream = None
        try:
            if self._synth is None:
                raise ModelLoadError("the Orpheus model is not loaded (see the error reported at start)")
            stream = self._synth.submit(text, voice=self._settings.voice, sampling=self._sampling(self._settings))
            self._inflight[stream] = context_id
            async for pcm in stream:  # (n,) float32 at 24 kHz
                await self.stop_ttfb_metrics()
                samples += len(pcm)
                audio = await self._resample(float_to_pcm16_bytes(pcm))
                if audio:
                    yield TTSAudioRawFrame(audio, self.sample_rate, 1, context_id=context_id)
            if stream.cancelled:
                return
            tail = await self._resample(b"", last=True)
            if tail:
                yield TTSAudioRawFrame(tail, self.sample_rate, 1, context_id=context_id)
            duration_s = samples / fmt.SAMPLE_RATE
            words = [(w, offset_s + start) for w, start, _ in word_timings(text, 0.0, duration_s)]
            await self.add_word_timestamps(words, context_id)
            self._context_audio_s[context_id] = offset_s + duration_s
        except RequestCancelled:
            pass
        except Exception as e:
            await self._report(e, f"Orpheus could not speak {text[:40]!r}")
        finally:
            if stream is not None:
                self._inflight.pop(stream, None)
                await stream.aclose()  # no-op when the stream has finished
            await self.stop_ttfb_metrics()

    async def _resample(self, pcm16: bytes, *, last: bool = False) -> bytes:
        """24 kHz int16 bytes to the pipeline's rate (even length); `last` flushes the filter."""
        if self.sample_rate == fmt.SAMPLE_RATE:
            return pcm16
        if last:
            return await self._out_resampler.flush()
        return await self._out_resampler.resample(pcm16, fmt.SAMPLE_RATE, self.sample_rate)

    # -- interruption ----------------------------------------------------------------------

    async def on_audio_context_interrupted(self, context_id: str):
        """Barge-in: cancel every sentence of the interrupted turn at once (no network wait)."""
        for stream, ctx in list(self._inflight.items()):
            if ctx == context_id:
                del self._inflight[stream]
                stream.cancel()
        self._context_audio_s.pop(context_id, None)

    async def on_audio_context_completed(self, context_id: str):
        """Forget the turn's running audio time once it has played."""
        self._context_audio_s.pop(context_id, None)

    # -- errors ----------------------------------------------------------------------------

    async def _report(self, error: Exception, what: str) -> None:
        """One of our typed errors as an `ErrorFrame` whose category tells whether retrying can help."""
        if isinstance(error, ModelLoadError):
            await self.push_error(f"{what}: {error}", exception=error, force_treat_as_permanent=True)
        elif isinstance(error, AuthError):
            msg = f"{what}: the server refused the API key ({error})"
            await self.push_error(msg, exception=error, category=ErrorCategory.AUTHENTICATION)
        elif isinstance(error, EngineBusy):
            msg = f"{what}: Orpheus is at capacity, try again later ({error})"
            await self.push_error(msg, exception=error, category=ErrorCategory.RATE_LIMIT)
        elif isinstance(error, ConnectionError):
            await self.push_error(f"{what}: {error}", exception=error, category=ErrorCategory.CONNECTIVITY)
        elif isinstance(error, ProtocolError):  # the server refused or failed this one request
            await self.push_error(f"{what}: {error}", exception=error, category=ErrorCategory.SERVER)
        elif isinstance(error, InvalidRequest):  # e.g. a voice the engine does not know
            await self.push_error(f"{what}: {error}", exception=error, category=ErrorCategory.APPLICATION)
        else:
            logger.opt(exception=error).error(f"{self}: {what}")
            await self.push_error(f"{what}: {error}", exception=error, category=ErrorCategory.UNKNOWN)
