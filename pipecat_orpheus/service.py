"""`OrpheusTTSService`: Orpheus speech in a Pipecat pipeline, from this process or from a server.

One class over one `Synthesizer`, picked by the constructor: without `url` it is the process-wide
shared engine (`load_synthesizer`: loaded once, shared by every pipeline); with `url` it is a
`RemoteSynthesizer`, an Orpheus server (ours or the Modal deployment) over one kept-open
connection. Either way one sentence is one cancellable stream of 24 kHz float32 PCM, so
everything Pipecat-facing (frames, resampling, metrics, word times, interruption, errors) is
written once; only opening and closing the source differ.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from loguru import logger
from pipecat.audio.utils import create_stream_resampler
from pipecat.frames.frames import CancelFrame, EndFrame, Frame, StartFrame, TTSAudioRawFrame
from pipecat.services.settings import TTSSettings
from pipecat.services.tts_service import TextAggregationMode, TTSService
from pipecat.utils.errors import ErrorCategory
from pipecat.utils.tracing.service_decorators import traced_tts
from pipecat.utils.types import NOT_GIVEN, NotGiven

from pipecat_orpheus import format as fmt
from pipecat_orpheus.config import Config, load_config
from pipecat_orpheus.engine.guard import GUARD_REASONS
from pipecat_orpheus.engine.request import SamplingParams
from pipecat_orpheus.errors import (
    AuthError,
    EngineBusy,
    EngineClosed,
    EngineFailed,
    InvalidRequest,
    ModelLoadError,
    ProtocolError,
    RequestCancelled,
)
from pipecat_orpheus.pcm import PcmFramer, float_to_int16, float_to_pcm16_bytes
from pipecat_orpheus.speech import SpeechStream, Synthesizer, load_synthesizer
from pipecat_orpheus.text import WordClock
from pipecat_orpheus.wire import protocol as p
from pipecat_orpheus.wire.client import OrpheusClient
from pipecat_orpheus.wire.remote import RemoteSynthesizer

_SAMPLING_FIELDS = tuple(p.SAMPLING_FIELDS)


@dataclass
class OrpheusTTSSettings(TTSSettings):
    """Runtime-updatable settings of `OrpheusTTSService` (send a `TTSUpdateSettingsFrame`).

    Remotely, a value left None is the server's own.

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

    Audio is 24 kHz mono, pushed as it is decoded, resampled to the pipeline's output rate when
    that differs, in frames of `audio_frame_ms`. Each word's `TTSTextFrame` goes out no later
    than the audio holding its (estimated) start, so a barge-in leaves the words heard so far in
    the conversation context. An interruption cancels the engine request (or the server
    utterance) at once. Remotely the connection is opened at start and kept open (reconnected
    with backoff), with `on_connected`, `on_disconnected` and `on_connection_error` events;
    voices and sampling defaults are the server's.

    Example::

        tts = OrpheusTTSService(settings=OrpheusTTSService.Settings(voice="leo"))  # local GPU
        tts = OrpheusTTSService(url="wss://you--pipecat-orpheus.modal.run", api_key=key)  # remote
    """

    Settings = OrpheusTTSSettings
    _settings: OrpheusTTSSettings

    def __init__(
        self,
        *,
        url: str | None = None,
        api_key: str | None = None,
        client: OrpheusClient | None = None,
        config: Config | None = None,
        audio_frame_ms: int = 40,
        voice_id: str | None = None,
        model: str | None = None,
        settings: OrpheusTTSSettings | None = None,
        text_aggregation_mode: TextAggregationMode | None = None,
        **kwargs: Any,
    ):
        """Create the service; nothing is loaded or connected until the pipeline starts.

        Args:
            url: Address of an Orpheus server (`ws://host:8000`, or a Modal deployment's
                `wss://...`): remote mode. Without `url` (or `client`), local mode: the model
                runs in this process, on its GPU.
            api_key: The server's API key (remote mode), if it requires one.
            client: Remote mode with a client of your own instead of `url`/`api_key`, e.g. with a
                longer `open_timeout_s` for a deployment that scales to zero (cold starts).
            config: Local mode's model, engine, voices and sampling defaults (default:
                `load_config()`, i.e. orpheus_config.yaml then `ORPHEUS_*` variables). Not used remotely.
            audio_frame_ms: Audio per `TTSAudioRawFrame` (a sentence's last may be shorter), a
                multiple of 10 in [10, 1000]; 40 is what Pipecat's output transports send.
            voice_id: The voice; deprecated (with a warning), as in Pipecat's own services: use
                ``settings=OrpheusTTSService.Settings(voice=...)``.
            model: Local mode's model, a hub id or a directory (default `config.model.llm`);
                deprecated likewise: use ``settings=OrpheusTTSService.Settings(model=...)``.
                Remote mode speaks with the server's model and refuses one.
            settings: Voice, model and sampling, over the defaults (local: the config's; remote:
                the server's). Takes precedence over `voice_id` and `model`.
            text_aggregation_mode: SENTENCE (the default) only: Orpheus speaks whole sentences.
            **kwargs: Passed to `TTSService` (e.g. `sample_rate`, `text_transforms`).

        Raises:
            ValueError: an argument Orpheus cannot honour; the message lists what it can.
        """
        if url is not None and client is not None:
            raise ValueError("pass either url (and api_key) or client, not both")
        if text_aggregation_mode == TextAggregationMode.TOKEN or kwargs.get("aggregate_sentences") is False:
            raise ValueError(
                "OrpheusTTSService speaks whole sentences: text_aggregation_mode=TOKEN would make every LLM "
                "token a request of its own. Leave text_aggregation_mode at TextAggregationMode.SENTENCE (the default)."
            )
        if not (isinstance(audio_frame_ms, int) and 10 <= audio_frame_ms <= 1000 and audio_frame_ms % 10 == 0):
            raise ValueError(
                f"audio_frame_ms must be a multiple of 10 in [10, 1000] (e.g. 20, 40), got {audio_frame_ms!r}"
            )
        remote = url is not None or client is not None
        local = self._config = None if remote else config if config is not None else load_config()
        defaults = self.Settings(
            model=local.model.llm if local else None,
            voice=local.voices.default if local else None,  # remotely: the server's default voice
            language=None,
            **{name: getattr(local.sampling, name) if local else None for name in _SAMPLING_FIELDS},
        )
        if voice_id is not None:
            self._warn_init_param_moved_to_settings("voice_id", "voice")
            defaults.voice = voice_id
        if model is not None:
            self._warn_init_param_moved_to_settings("model", "model")
            defaults.model = model
        if settings is not None:
            defaults.apply_update(settings)
        if remote and defaults.model is not None:
            raise ValueError("remote mode speaks with the server's model (its model.llm): leave out model")
        if local and defaults.model != local.model.llm:
            self._config = dataclasses.replace(local, model=dataclasses.replace(local.model, llm=defaults.model))
        self._remote = None
        if remote:
            client = client or OrpheusClient(url, api_key=api_key)
            self._remote = RemoteSynthesizer(client, on_event=self._on_connection_event)
        try:
            self._check(defaults)
        except InvalidRequest as e:
            raise ValueError(str(e)) from None
        # Word frames come from our own timings, so text reaches the context only once heard.
        super().__init__(
            text_aggregation_mode=text_aggregation_mode,
            push_start_frame=True,
            push_stop_frames=True,
            push_text_frames=False,
            settings=defaults,
            **kwargs,
        )
        self._frame_ms = audio_frame_ms
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
        if self._remote is None:
            logger.info(f"{self}: local mode: Orpheus {self._config.model.llm} in this process (one shared engine)")
            try:
                self._synth = await asyncio.to_thread(load_synthesizer, self._config)
            except ModelLoadError as e:
                await self._report(e, "could not load the Orpheus model")
            return
        logger.info(f"{self}: remote mode: Orpheus server at {self._remote.client.url}")
        try:
            await self._remote.start()
        except AuthError as e:
            await self._report(e, "could not connect to the Orpheus server")
        except (EngineBusy, ConnectionError, ProtocolError) as e:
            await self._report(e, "could not connect to the Orpheus server (reconnecting in the background)")

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

    async def _on_connection_event(self, name: str, detail: object) -> None:
        """Remote: Pipecat's connection events; on each connect, the settings checked against the server's offer."""
        if name == "disconnected":
            await self._call_event_handler("on_disconnected")
        elif name == "connection_error":
            await self._call_event_handler("on_connection_error", str(detail))
        else:
            await self._call_event_handler("on_connected")
            try:
                self._check(self._settings)
            except InvalidRequest as e:  # every sentence would be refused: say so before the first
                msg = f"the server at {self._remote.client.url} cannot speak with these settings: {e}"
                await self.push_error(msg, exception=e, category=ErrorCategory.INVALID_REQUEST)
            else:
                await self.set_usable(True)  # e.g. written off for silence while the server was away

    # -- settings --------------------------------------------------------------------------

    async def _update_settings(self, delta: TTSSettings) -> dict[str, Any]:
        """Apply a runtime delta; a bad value is refused (and reported), not applied."""
        changed = await super()._update_settings(delta)
        try:
            self._check(self._settings)
        except InvalidRequest as e:
            for name, old in changed.items():
                setattr(self._settings, name, old)
            await self.push_error(f"Orpheus setting refused: {e}", exception=e, category=ErrorCategory.APPLICATION)
            return {}
        self._warn_unhandled_updated_settings({"model"} & set(changed))  # one engine (or server) per service
        return changed

    def _check(self, settings: OrpheusTTSSettings) -> None:
        """`InvalidRequest` for a voice the source does not offer or a sampling value it would refuse."""
        voices = self._voices()
        if voices is not None and settings.voice is not None and settings.voice not in voices:
            raise InvalidRequest("voice", f"{settings.voice!r} is not one of {', '.join(voices)}")
        self._sampling(settings)

    def _voices(self) -> list[str] | None:
        """The voices a sentence may name; None where the server has not said (a Kyutai server)."""
        if self._config is not None:
            return list(self._config.voices.available)
        ready = self._remote.client.ready
        return ready.voices if ready is not None else None

    def _sampling(self, settings: OrpheusTTSSettings) -> SamplingParams | None:
        """The sentence's sampling: the source's defaults under `settings`; None leaves a server's own."""
        given = {name: v for name in _SAMPLING_FIELDS if (v := getattr(settings, name)) is not None}
        if self._config is not None:
            return SamplingParams.from_config(self._config.sampling, **given)
        ready = self._remote.client.ready
        server = ready.sampling if ready is not None else None
        if server is None:
            SamplingParams(**given)  # ranges checked now; sent once the server has said its defaults
            return None
        if given.get("max_tokens", 0) > server["max_tokens"]:
            raise InvalidRequest("max_tokens", f"{given['max_tokens']} is over the server's {server['max_tokens']}")
        return SamplingParams(**{**server, **given}) if given else None

    # -- synthesis -------------------------------------------------------------------------

    @traced_tts
    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame | None, None]:
        """Speak one sentence: audio frames as they are decoded, each word just before the audio it starts in.

        Args:
            text: The sentence (the base class aggregates LLM tokens into sentences).
            context_id: The turn's audio context, shared by the sentences of one reply.
        """
        offset_s = self._context_audio_s.get(context_id, 0.0)  # where this sentence starts in the turn
        rate = self.sample_rate
        clock = WordClock(text)
        framer = PcmFramer(max(1, rate * self._frame_ms // 1000), dtype=np.int16)
        pushed = 0  # samples of this sentence pushed, at the output rate
        await self.start_tts_usage_metrics(text)
        await self._out_resampler.reset()
        stream = None
        try:
            if self._synth is None:
                raise ModelLoadError("the Orpheus model is not loaded (see the error reported at start)")
            if self._remote is not None:
                await self._remote.connect()  # one attempt when the server is away; its Ready sets the sampling
            stream = self._synth.submit(text, voice=self._settings.voice, sampling=self._sampling(self._settings))
            self._inflight[stream] = context_id
            async for pcm in stream:  # (n,) float32 at 24 kHz
                await self.stop_ttfb_metrics()
                for audio in framer.push(await self._to_output(pcm)):
                    pushed += len(audio)
                    await self._add_words(clock.advance(pushed / rate), offset_s, context_id)
                    yield TTSAudioRawFrame(audio.astype("<i2").tobytes(), rate, 1, context_id=context_id)
            if stream.cancelled:
                return
            if stream.stop_reason in GUARD_REASONS:
                logger.warning(f"{self}: Orpheus's integrity guard cut {text[:40]!r} short ({stream.stop_reason})")
            tail = [*framer.push(await self._to_output(None)), framer.flush()]
            duration_s = (pushed + sum(map(len, tail))) / rate
            await self._add_words(clock.finish(duration_s), offset_s, context_id)  # the rest, before the last audio
            for audio in tail:
                if len(audio):
                    yield TTSAudioRawFrame(audio.astype("<i2").tobytes(), rate, 1, context_id=context_id)
            self._context_audio_s[context_id] = offset_s + duration_s
        except RequestCancelled:
            pass
        except Exception as e:
            self._context_audio_s[context_id] = offset_s + pushed / rate  # the turn's next words follow what was heard
            await self._report(e, f"Orpheus could not speak {text[:40]!r}")
        finally:
            if stream is not None:
                self._inflight.pop(stream, None)
                await stream.aclose()  # no-op when the stream has finished
            await self.stop_ttfb_metrics()

    async def _to_output(self, pcm: np.ndarray | None) -> np.ndarray:
        """24 kHz float32 (n,) -> int16 at the pipeline's rate; None flushes the resampler."""
        if self.sample_rate == fmt.SAMPLE_RATE:
            return float_to_int16(pcm) if pcm is not None else np.zeros(0, dtype=np.int16)
        if pcm is None:
            data = await self._out_resampler.flush()
        else:
            data = await self._out_resampler.resample(float_to_pcm16_bytes(pcm), fmt.SAMPLE_RATE, self.sample_rate)
        return np.frombuffer(data, dtype="<i2")

    async def _add_words(self, words: list[tuple[str, float, float]], offset_s: float, context_id: str) -> None:
        if words:
            await self.add_word_timestamps([(word, offset_s + start) for word, start, _ in words], context_id)

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
        """One of our typed errors as an `ErrorFrame` whose category (Pipecat's) tells whether retrying helps."""
        if isinstance(error, ModelLoadError):  # names something that cannot be loaded: permanent
            category, msg = ErrorCategory.INVALID_REQUEST, f"{what}: {error}"
        elif isinstance(error, AuthError):
            category, msg = ErrorCategory.AUTHENTICATION, f"{what}: {error}"  # names the URL and the 401
        elif isinstance(error, EngineBusy):
            category, msg = ErrorCategory.RATE_LIMIT, f"{what}: Orpheus is at capacity, try again later ({error})"
        elif isinstance(error, ConnectionError):
            category, msg = ErrorCategory.CONNECTIVITY, f"{what}: {error}"
        elif isinstance(error, InvalidRequest) or (isinstance(error, ProtocolError) and error.code == "bad_request"):
            category, msg = ErrorCategory.APPLICATION, f"{what}: refused: {error}"  # this sentence only
        elif isinstance(error, (ProtocolError, EngineFailed, EngineClosed)):
            category, msg = ErrorCategory.SERVER, f"{what}: {error}"
        else:
            logger.opt(exception=error).error(f"{self}: {what}")
            category, msg = ErrorCategory.UNKNOWN, f"{what}: {error}"
        await self.push_error(msg, exception=error, category=category)
