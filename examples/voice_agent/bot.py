"""A voice agent that speaks with Orpheus: Whisper STT -> any OpenAI-compatible LLM -> Orpheus TTS.

Run it with Pipecat's development runner, then open http://localhost:7860/client and talk:

    python bot.py                                   # Orpheus in this process, on this machine's GPU
    python bot.py --tts remote --orpheus-url ws://localhost:8000/api/tts_streaming
    python bot.py --llm-base-url http://localhost:11434/v1 --llm-model llama3.2   # Ollama, no cloud key

Every flag has an environment variable (see .env.example), read from `.env` at start.
The pipeline is built by `build_pipeline()` and the services by `create_services()`, so
tests/test_voice_agent.py runs this very pipeline with a tiny model and text in place of the LLM.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from loguru import logger
from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.frames.frames import TTSSpeakFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair, LLMUserAggregatorParams
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.runner.types import RunnerArguments
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.transports.base_transport import BaseTransport, TransportParams
from pipecat.workers.runner import WorkerRunner

from pipecat_orpheus import format as fmt
from pipecat_orpheus.config import VoiceConfig, load_config
from pipecat_orpheus.service import OrpheusTTSService

SYSTEM_PROMPT = (
    "You are a warm, quick-witted voice assistant. Everything you write is spoken aloud by the "
    "Orpheus text-to-speech model, so answer in one to three short spoken sentences: no markdown, "
    "lists, emoji, URLs or symbols a person would not say. Orpheus performs these tags as sounds "
    f"where you place them: {' '.join(fmt.EMOTION_TAGS)}. Use one now and then where a person would "
    "make that sound, for example 'Oh, that is brilliant <laugh>' or '<sigh> Mondays.' Never use any "
    "other tag, and never describe a tag in words."
)
GREETING = "Hi! I'm a voice agent speaking with Orpheus. <chuckle> What shall we talk about?"


# -- options: flags, with defaults from the environment --------------------------------------


@dataclass(frozen=True)
class AgentOptions:
    """How to build the three services; every field has a flag and an environment variable."""

    tts: str  # "local" (engine in this process) | "remote" (an Orpheus server)
    orpheus_url: str | None  # remote: ws://host:8000/api/tts_streaming or the Modal wss:// URL
    orpheus_api_key: str | None  # remote: the server's API key, if it has one
    orpheus_config: str | None  # local: an orpheus_config.yaml (default: the repository's)
    voice: str | None  # None: the configured default (local) or the server's (remote)
    llm_model: str
    llm_base_url: str | None  # None: OpenAI; else any OpenAI-compatible server (Ollama, vLLM, ...)
    llm_api_key: str | None
    whisper_model: str  # a faster-whisper model name or a local CTranslate2 model directory
    whisper_device: str
    whisper_compute_type: str


def add_arguments(parser: argparse.ArgumentParser, environ: Mapping[str, str] = os.environ) -> None:
    """Add the agent's flags to `parser` (Pipecat's runner adds its own, e.g. --host, --port)."""
    env = environ.get
    group = parser.add_argument_group("voice agent")
    group.add_argument(
        "--tts",
        choices=("local", "remote"),
        default=env("ORPHEUS_TTS"),
        help="local: Orpheus on this machine's GPU; remote: the server at --orpheus-url (default when a URL is set)",
    )
    group.add_argument("--orpheus-url", default=env("ORPHEUS_URL"), help="ws(s)://.../api/tts_streaming")
    group.add_argument("--orpheus-api-key", default=env("ORPHEUS_API_KEY"), help="the Orpheus server's API key")
    group.add_argument("--orpheus-config", default=env("ORPHEUS_CONFIG"), help="orpheus_config.yaml (local mode)")
    voices = ", ".join(VoiceConfig().available)  # a server may offer others: the service checks against its own
    group.add_argument("--voice", default=env("ORPHEUS_VOICE"), help=f"e.g. {voices} (default: tara, or the server's)")
    group.add_argument("--llm-model", default=env("LLM_MODEL", "gpt-4.1-mini"))
    group.add_argument("--llm-base-url", default=env("LLM_BASE_URL"), help="e.g. http://localhost:11434/v1")
    group.add_argument("--llm-api-key", default=env("LLM_API_KEY") or env("OPENAI_API_KEY"))
    group.add_argument("--whisper-model", default=env("WHISPER_MODEL", "Systran/faster-distil-whisper-medium.en"))
    group.add_argument("--whisper-device", default=env("WHISPER_DEVICE", "auto"), help="auto | cuda | cpu")
    group.add_argument("--whisper-compute-type", default=env("WHISPER_COMPUTE_TYPE", "default"))


def options_from_args(args: argparse.Namespace) -> AgentOptions:
    """The `AgentOptions` in parsed flags; fails early on a remote mode without a URL."""
    if args.tts is None:
        args.tts = "remote" if args.orpheus_url else "local"
    if args.tts not in ("local", "remote"):
        raise SystemExit(f"--tts (ORPHEUS_TTS) must be local or remote, not {args.tts!r}")
    if args.tts == "remote" and not args.orpheus_url:
        raise SystemExit(
            "--tts remote needs --orpheus-url (or ORPHEUS_URL), e.g. ws://localhost:8000/api/tts_streaming"
        )
    return AgentOptions(**{name: getattr(args, name) for name in AgentOptions.__dataclass_fields__})


def parse_options(argv: list[str] | None = None, environ: Mapping[str, str] = os.environ) -> AgentOptions:
    """Options from `argv` flags over `environ` (for callers that do not go through the runner)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser, environ)
    return options_from_args(parser.parse_args(argv or []))


# -- services and pipeline -------------------------------------------------------------------


@dataclass
class Services:
    """The agent's three AI services."""

    stt: FrameProcessor
    llm: OpenAILLMService
    tts: OrpheusTTSService


def create_stt(options: AgentOptions) -> FrameProcessor:
    """Whisper on this machine (faster-whisper). It loads, and on first use downloads, the model now."""
    try:
        from pipecat.services.whisper.stt import WhisperSTTService
    except ImportError as e:
        raise SystemExit("Whisper needs the example extra: pip install -e '.[example]'") from e
    return WhisperSTTService(
        settings=WhisperSTTService.Settings(model=options.whisper_model),
        device=options.whisper_device,
        compute_type=options.whisper_compute_type,
    )


def create_llm(options: AgentOptions) -> OpenAILLMService:
    """OpenAI, or any server with an OpenAI-compatible API when a base URL is given (no request is made here)."""
    # Local servers ignore the key, but the OpenAI client insists on one.
    api_key = options.llm_api_key or ("unused" if options.llm_base_url else None)
    return OpenAILLMService(
        api_key=api_key,
        base_url=options.llm_base_url,
        settings=OpenAILLMService.Settings(model=options.llm_model, system_instruction=SYSTEM_PROMPT),
    )


def create_tts(options: AgentOptions) -> OrpheusTTSService:
    """Orpheus, in this process (local) or from a server (remote); nothing loads until the pipeline starts."""
    settings = OrpheusTTSService.Settings(voice=options.voice) if options.voice else None
    if options.tts == "remote":
        return OrpheusTTSService(url=options.orpheus_url, api_key=options.orpheus_api_key, settings=settings)
    return OrpheusTTSService(config=load_config(options.orpheus_config), settings=settings)


def create_services(options: AgentOptions) -> Services:
    """Build STT, LLM and TTS exactly as the running bot does."""
    return Services(stt=create_stt(options), llm=create_llm(options), tts=create_tts(options))


def build_pipeline(
    transport_input: FrameProcessor,
    transport_output: FrameProcessor,
    *,
    services: Services,
    context: LLMContext,
) -> Pipeline:
    """User audio -> STT -> context -> LLM -> Orpheus -> user's speaker, the reply then back into the context.

    Silero VAD in the user aggregator marks speech segments (Whisper transcribes each) and, since the
    default turn-start strategies interrupt, the user speaking over the bot cancels Orpheus at once.
    """
    aggregators = LLMContextAggregatorPair(
        context, user_params=LLMUserAggregatorParams(vad_analyzer=SileroVADAnalyzer())
    )
    return Pipeline(
        [
            transport_input,
            services.stt,
            aggregators.user(),
            services.llm,
            services.tts,
            transport_output,
            aggregators.assistant(),
        ]
    )


# -- running it with Pipecat's runner --------------------------------------------------------


async def run_bot(transport: BaseTransport, options: AgentOptions, runner_args: RunnerArguments) -> None:
    """Run one conversation on `transport` until the client leaves."""
    services = create_services(options)
    context = LLMContext()
    pipeline = build_pipeline(transport.input(), transport.output(), services=services, context=context)
    # 24 kHz out is Orpheus's own rate: no resampling on the way to the browser.
    params = PipelineParams(audio_out_sample_rate=fmt.SAMPLE_RATE, enable_metrics=True, enable_usage_metrics=True)
    worker = PipelineWorker(pipeline, params=params, idle_timeout_secs=runner_args.pipeline_idle_timeout_secs)

    @transport.event_handler("on_client_connected")
    async def on_client_connected(transport: BaseTransport, client: Any) -> None:
        logger.info("Client connected: greeting")
        await worker.queue_frames([TTSSpeakFrame(GREETING)])

    @transport.event_handler("on_client_disconnected")
    async def on_client_disconnected(transport: BaseTransport, client: Any) -> None:
        logger.info("Client disconnected")
        await runner.cancel()

    runner = WorkerRunner(handle_sigint=runner_args.handle_sigint)
    await runner.add_workers(worker)
    await runner.run()


async def bot(runner_args: RunnerArguments) -> None:
    """Pipecat runner entry point: one call per browser session (SmallWebRTC)."""
    from pipecat.runner.utils import create_transport

    if runner_args.cli_args is not None:
        options = options_from_args(runner_args.cli_args)
    else:  # started by another host: environment only
        options = parse_options([])
    transport_params = {"webrtc": lambda: TransportParams(audio_in_enabled=True, audio_out_enabled=True)}
    transport = await create_transport(runner_args, transport_params)
    await run_bot(transport, options, runner_args)


def preload_local_tts(options: AgentOptions) -> None:
    """Load Orpheus before the runner starts, so the first caller does not wait for the model.

    The service finds this same engine at session start: it is cached per process by its config.
    """
    if options.tts == "local":
        from pipecat_orpheus.speech import load_synthesizer

        logger.info("Loading Orpheus (local mode) before accepting sessions...")
        load_synthesizer(load_config(options.orpheus_config))


if __name__ == "__main__":
    from dotenv import load_dotenv
    from pipecat.runner.run import main

    load_dotenv(override=True)
    cli = argparse.ArgumentParser(description="Orpheus voice agent (Pipecat development runner)")
    add_arguments(cli)
    if not {"-h", "--help"} & set(sys.argv[1:]):
        preload_local_tts(options_from_args(cli.parse_known_args()[0]))
    main(cli)
