"""Helpers shared by several test modules: the wire tests' server helpers, the Pipecat service's
pipeline helpers (and its tiny-model fixtures), and the example voice agent's.

Fixtures defined here are imported explicitly by the modules that use them (`# noqa: F401`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import msgpack
import numpy as np
from pipecat.frames.frames import (
    DataFrame,
    Frame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TTSAudioRawFrame,
)
from pipecat.pipeline.worker import PipelineParams
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.filters.identity_filter import IdentityFilter
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.tests.utils import run_test
from websockets.exceptions import ConnectionClosed

from pipecat_orpheus import format as fmt
from pipecat_orpheus.config import Config, load_config
from pipecat_orpheus.service import OrpheusTTSService
from pipecat_orpheus.speech import Synthesizer, load_synthesizer
from pipecat_orpheus.testing import forced_tokens, tiny_model_overrides
from pipecat_orpheus.text import WordClock
from pipecat_orpheus.wire import protocol as p
from pipecat_orpheus.wire.server import OrpheusServer, serve

ROOT = Path(__file__).resolve().parent.parent
BOT_PATH = ROOT / "examples" / "voice_agent" / "bot.py"


def load_script(path: Path, name: str) -> ModuleType:
    """Import a script that is not in a package (a Modal app file, an example bot) as module `name`."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# -- the server over loopback (tests/wire, the reliability tests) -------------------------------

LONG_TEXT = "One two three four. Five six seven eight. Nine ten eleven twelve. Thirteen fourteen fifteen."


def overrides(tiny_model_dir, **extra):
    return {
        "engine.backend": "reference",
        "engine.core_process": False,  # in this process: fast; tests/core run the engine core process
        **tiny_model_overrides(tiny_model_dir),
        "sampling.max_tokens": 14,  # two 7-token frames per sentence: fast on CPU
        "engine.max_chars_per_piece": 20,
        "server.shutdown_grace_s": 1.0,
        **extra,
    }


def with_(config, **sections):
    """`config` with some keys of some sections replaced: with_(c, limits={"max_connections": 1})."""
    return dataclasses.replace(
        config, **{s: dataclasses.replace(getattr(config, s), **kv) for s, kv in sections.items()}
    )


async def messages(ws):
    """Every server message until the server closes (decoded), and the close code."""
    out = []
    try:
        async for data in ws:
            out.append(p.decode_server(data))
    except ConnectionClosed:
        pass
    return out, ws.close_code


async def until(pred, timeout=5.0):
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.01)


async def http_get(port, path, headers=""):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{headers}\r\n".encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def pack(**body):
    return msgpack.packb(body)


# -- the Pipecat service (test_service, test_pipeline, the fault tests) ---------------------------

MAX_TOKENS = 28  # 4 frames (341 ms) per sentence: enough to stream several chunks, quick on CPU
LONG_TOKENS = 1960  # 280 frames (24 s): still generating when the interruption lands, even on a fast CPU
START_TIMEOUT_S = 60.0  # the first test of the session loads the tiny model inside StartFrame
PROBE_S = 0.5  # a cancelled request must leave the engine this soon (it stops at its next token)
MODES = ("local", "remote")


def tiny_config(model_dir: Path, **overrides: object) -> Config:
    """The tiny model on the reference path, short sentences, reproducible sampling."""
    return load_config(
        overrides={
            "engine.backend": "reference",
            "engine.core_process": False,
            **tiny_model_overrides(model_dir),
            "sampling.max_tokens": MAX_TOKENS,
            "sampling.seed": 7,
            # One request at a time; the queue holds a turn's next sentences, which the service may submit
            # while the slot is still finishing the last one (the busy test passes engine.max_queue=0).
            "engine.max_slots": 1,
            "engine.max_queue": 4,
            **overrides,
        }
    )


@asynccontextmanager
async def orpheus_server(config: Config, **kwargs: object) -> AsyncIterator[OrpheusServer]:
    """Our server on a free loopback port, speaking from the shared synthesizer; open unless api_keys given."""
    kwargs.setdefault("api_keys", [])
    async with serve(config, load_synthesizer(config), host="127.0.0.1", port=0, **kwargs) as server:
        yield server


@asynccontextmanager
async def orpheus_tts(
    mode: str, config: Config, **kwargs: object
) -> AsyncIterator[tuple[OrpheusTTSService, OrpheusServer | None]]:
    """A service in `mode` (and its server); remote runs against a real server whose sampling is `config`'s."""
    if mode == "local":
        yield OrpheusTTSService(config=config, **kwargs), None
        return
    async with orpheus_server(config) as server:
        yield OrpheusTTSService(config=config, url=server.url, **kwargs), server


async def speak(
    processor: FrameProcessor, frames: Sequence[Frame], *, rate: int = fmt.SAMPLE_RATE, metrics: bool = False
) -> tuple[list[Frame], list[Frame]]:
    """Run `frames` through the processor in a pipeline whose output rate is `rate`."""
    params = PipelineParams(audio_out_sample_rate=rate, enable_metrics=metrics, enable_usage_metrics=metrics)
    down, up = await run_test(processor, frames_to_send=frames, pipeline_params=params, start_timeout=START_TIMEOUT_S)
    return list(down), list(up)


def of(frames: Sequence[Frame], kind: type) -> list:
    """The frames of one type, in order."""
    return [f for f in frames if isinstance(f, kind)]


def index(frames: Sequence[Frame], kind: type, last: bool = False) -> int:
    """Position of the first (or last) frame of a type."""
    hits = [i for i, f in enumerate(frames) if isinstance(f, kind)]
    assert hits, f"no {kind.__name__} in {[type(f).__name__ for f in frames]}"
    return hits[-1] if last else hits[0]


def samples(frames: Sequence[Frame]) -> int:
    """Total 16-bit samples in the audio frames."""
    return sum(len(f.audio) // 2 for f in of(frames, TTSAudioRawFrame))


def assert_whole_frames(n: int, max_tokens: int = MAX_TOKENS) -> int:
    """`n` 24 kHz samples are 1..max_tokens/7 whole SNAC frames; return the count."""
    frames, rest = divmod(n, fmt.SAMPLES_PER_FRAME)
    assert rest == 0 and 1 <= frames <= max_tokens // fmt.FRAME_TOKENS, n
    return frames


async def eventually(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    """Whether `condition` becomes true within `timeout_s`."""
    for _ in range(int(timeout_s / 0.02)):
        if condition():
            return True
        await asyncio.sleep(0.02)
    return condition()


def idle(synth: Synthesizer) -> bool:
    """The engine holds no request."""
    return synth.active_requests == 0 and synth.queued_requests == 0


async def wait_idle(synth: Synthesizer) -> None:
    """Wait until the engine holds no request (a cancel frees the slot at its next step)."""
    assert await eventually(lambda: idle(synth)), f"engine busy: {synth.active_requests} active"


def llm_reply(*tokens: str) -> list[Frame]:
    """The frames an LLM service pushes for one streamed reply."""
    return [LLMFullResponseStartFrame(), *(LLMTextFrame(t) for t in tokens), LLMFullResponseEndFrame()]


@dataclass
class Restart(DataFrame):
    """Test marker: the server goes down and comes back here."""


class EngineProbe(FrameProcessor):
    """Passes frames on; at an InterruptionFrame, notes whether the engine frees up while the pipeline still runs."""

    def __init__(self, synth: Synthesizer, server: OrpheusServer | None = None):
        super().__init__()
        self.synth, self.server = synth, server
        self.freed: bool | None = None
        self.streams_open: int | None = None

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InterruptionFrame):
            self.freed = await eventually(lambda: idle(self.synth), timeout_s=PROBE_S)
            self.streams_open = self.server.open_streams if self.server else None
        await self.push_frame(frame, direction)


class BargeIn(FrameProcessor):
    """Passes frames on until `after_s` of audio has gone by, then interrupts: a listener talking over the bot.

    Frames before its InterruptionFrame downstream are exactly what the listener heard.
    """

    def __init__(self, after_s: float):
        super().__init__()
        self.after_s = after_s
        self.heard_s = 0.0

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame) and self.heard_s < self.after_s:
            self.heard_s += len(frame.audio) / 2 / frame.sample_rate
            if self.heard_s >= self.after_s:
                await self.broadcast_interruption()


@dataclass
class Hold(DataFrame):
    """Test marker: `HoldUntilInterrupted` keeps the frames after it (the EndFrame too) until an interruption."""


class HoldUntilInterrupted(FrameProcessor):
    """Upstream of the service: at `Hold`, waits (30 s at most) until an interruption cancels the wait.

    So an interruption raised downstream (`BargeIn`) reaches the service before the EndFrame does:
    Pipecat 1.14's TTSService loses an EndFrame queued behind a sentence when an interruption
    lands before the EndFrame is processed (its process task dies awaiting the cancelled playback).
    """

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, Hold):
            await asyncio.sleep(30)
        else:
            await self.push_frame(frame, direction)


def heard_words(text: str, heard_s: float) -> list[str]:
    """The words of `text` whose estimated start lies in the first `heard_s` seconds of its audio."""
    return [word for word, _, _ in WordClock(text).advance(heard_s)]


# -- the example voice agent (test_voice_agent, test_modal_app) ----------------------------------


def load_bot() -> ModuleType:
    """Import examples/voice_agent/bot.py as a module (it is a script, not a package)."""
    return load_script(BOT_PATH, "voice_agent_bot")


def whisper_flags(whisper: Path | None) -> list[str]:
    """The flags that point the bot's Whisper at the tiny model (none without the example extra)."""
    if whisper is None:
        return []
    return ["--whisper-model", str(whisper), "--whisper-device", "cpu", "--whisper-compute-type", "float32"]


async def run_agent(
    bot: ModuleType, argv: list[str], frames: list[Frame], *, whisper: bool
) -> tuple[list[Frame], LLMContext]:
    """Run the bot's own pipeline, built from its own services, with identity transports at both ends.

    Without the example extra (no faster-whisper), a pass-through holds Whisper's place: the STT
    only ever sees text frames here, and the services test skips with the reason.
    """
    options = bot.parse_options(argv, environ={})
    if whisper:
        services = bot.create_services(options)
    else:
        services = bot.Services(stt=IdentityFilter(), llm=bot.create_llm(options), tts=bot.create_tts(options))
    context = LLMContext()
    pipeline = bot.build_pipeline(IdentityFilter(), IdentityFilter(), services=services, context=context)
    params = PipelineParams(audio_out_sample_rate=fmt.SAMPLE_RATE)
    down, _ = await run_test(pipeline, frames_to_send=frames, pipeline_params=params, start_timeout=START_TIMEOUT_S)
    return list(down), context


# -- the integrity guard driven by forced tokens (tests/engine, tests/wire) -----------------------

# A guard that fires soon: loops of 4 frames, a budget of the text's letters at 12.5/s plus 0.5 s.
GUARD = {"guard.loop_frames": 4, "guard.duration_factor": 1.0, "guard.duration_margin_s": 0.5}
GUARD_LOOP = 3 + 2 + 4  # frames "It loops." speaks: 3, then 2 repeated, until 4 equal the ones 2 before


def speaking(codes: np.ndarray, end: bool) -> Callable[[int], int]:
    """index -> token: the frames `codes` (n, 7) in order, then END_OF_SPEECH (`end`) or the same frames again."""
    ids = fmt.codes_to_tokens(codes)
    return lambda i: fmt.END_OF_SPEECH if end and i >= len(ids) else ids[i % len(ids)]


def guard_scripts() -> dict[str, Callable[[int], int]]:
    """A loop, a runaway and a normal utterance, by text."""
    varied = np.random.default_rng(0).integers(0, fmt.CODEBOOK_SIZE, (80, fmt.FRAME_TOKENS))  # (80, 7), no repeats
    loop = np.concatenate(
        [varied[:3], np.resize(varied[3:5], (60, fmt.FRAME_TOKENS))]
    )  # 3 frames, then 2 over and over
    return {
        "It loops.": speaking(loop, end=False),
        "Hi.": speaking(varied, end=False),
        "All fine.": speaking(varied[:5], end=True),
    }


def forced_by_text(tokenizer, voice: str, scripts: dict[str, Callable[[int], int]]):
    """An `OrpheusEngine.rewrite_tokens` hook forcing each text's script; requests of other texts keep their tokens."""
    by_prompt = {tuple(fmt.build_prompt(tokenizer, text, voice)): script for text, script in scripts.items()}

    def script(request, index: int) -> int | None:
        forced = by_prompt.get(tuple(request.prompt))
        return None if forced is None else forced(index)

    return forced_tokens(script)
