"""The bundled voice agent (examples/voice_agent/bot.py): its own services and pipeline, on the tiny model.

Text frames stand in for the LLM's streamed reply (no network); the STT and LLM services are built
by the bot's own `create_services`: Whisper from a tiny CTranslate2 model written here (the real
service loads its model in `__init__`, and a model name would be downloaded), the LLM against a
dummy OpenAI-compatible base URL (constructing it sends no request). Without the example extra
(faster-whisper, aiortc), a pass-through holds Whisper's place and the Whisper and WebRTC tests
skip with the reason. The last test runs `python bot.py` under Pipecat's runner and calls it from
an aiortc peer over loopback.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import yaml
from pipecat.frames.frames import (
    Frame,
    InterruptionFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.tests.utils import SleepFrame

from pipecat_orpheus import format as fmt
from pipecat_orpheus.config import load_config
from pipecat_orpheus.service import OrpheusTTSService
from pipecat_orpheus.speech import load_synthesizer
from tests.helpers import (
    BOT_PATH,
    llm_reply,
    run_agent,
    whisper_flags,
)

SHORT_TOKENS = 28  # 4 SNAC frames per sentence: a whole reply in well under a second on CPU
LONG_TOKENS = 2000  # a sentence still generating when the interruption lands (~24 s of audio)
FIRST_AUDIO_WAIT_S = 3.0  # first audio before the barge-in: ~0.2 s on an idle CPU, 10x slower under load
START_TIMEOUT_S = 60.0  # the first pipeline of the session may load the tiny model inside StartFrame
RUNNER_START_TIMEOUT_S = 90.0  # the runner imports Pipecat, then preloads the tiny Orpheus
LOUD = 200  # int16 magnitude above which a received sample is not the transport's silence
REPLY = ("Oh, hello there! ", "<laugh> ", "It is nice ", "to meet you.")


def write_config(path: Path, model_dir: Path, max_tokens: int) -> Path:
    """An orpheus_config.yaml for the tiny model on the reference path, as a user would pass with --orpheus-config."""
    sections = {
        "model": {"llm": str(model_dir / "llm"), "codec": str(model_dir / "snac"), "device": "cpu"},
        "engine": {"backend": "reference"},
        "sampling": {"max_tokens": max_tokens, "seed": 7},
    }
    path.write_text(yaml.safe_dump(sections))
    return path


def agent_argv(config: Path, whisper: Path | None) -> list[str]:
    """Flags for a fully local agent: tiny Orpheus in-process, tiny Whisper, an LLM server that is never called."""
    return [
        *("--tts", "local", "--orpheus-config", str(config), "--voice", "leo"),
        *whisper_flags(whisper),
        *("--llm-base-url", "http://127.0.0.1:9/v1", "--llm-model", "llama3.2"),
    ]


def audio_frames(frames: list[Frame]) -> list[TTSAudioRawFrame]:
    """The audio frames, in order."""
    return [f for f in frames if isinstance(f, TTSAudioRawFrame)]


def first(frames: list[Frame], kind: type) -> int:
    """Position of the first frame of a type."""
    hits = [i for i, f in enumerate(frames) if isinstance(f, kind)]
    assert hits, f"no {kind.__name__} in {[type(f).__name__ for f in frames]}"
    return hits[0]


async def wait_idle(config_path: Path, timeout_s: float = 10.0) -> None:
    """Wait until the shared engine of `config_path` holds no request (a cancel frees its slot at the next step)."""
    synth = load_synthesizer(load_config(config_path))
    for _ in range(int(timeout_s / 0.02)):
        if synth.active_requests == 0 and synth.queued_requests == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"engine still busy: {synth.active_requests} active, {synth.queued_requests} queued")


def test_system_prompt_teaches_every_orpheus_tag(bot: ModuleType) -> None:
    """The LLM is told every emotion tag Orpheus performs, and the greeting uses only those."""
    for tag in fmt.EMOTION_TAGS:
        assert tag in bot.SYSTEM_PROMPT
    used = re.findall(r"<[a-z]+>", bot.GREETING)
    assert used and set(used) <= set(fmt.EMOTION_TAGS)


def test_options_from_environment_and_flags(bot: ModuleType) -> None:
    """ORPHEUS_URL selects remote mode, flags override the environment, and remote mode needs a URL."""
    env = {"ORPHEUS_URL": "wss://me--pipecat-orpheus-orpheusserver-serve.modal.run/api/tts_streaming"}
    remote = bot.parse_options([], environ={**env, "ORPHEUS_API_KEY": "k", "ORPHEUS_VOICE": "mia"})
    assert (remote.tts, remote.orpheus_url, remote.orpheus_api_key, remote.voice) == (
        "remote",
        env["ORPHEUS_URL"],
        "k",
        "mia",
    )
    assert bot.parse_options(["--tts", "local"], environ=env).tts == "local"
    assert bot.parse_options([], environ={}).tts == "local"
    with pytest.raises(SystemExit):
        bot.parse_options(["--tts", "remote"], environ={})


def test_services_are_built_as_the_bot_builds_them(
    bot: ModuleType, tiny_model_dir: Path, whisper_dir: Path | None, tmp_path: Path
) -> None:
    """Whisper, the OpenAI-compatible LLM and Orpheus (local and remote) are constructed offline by the bot's code."""
    if whisper_dir is None:
        pytest.skip("faster-whisper is not installed: the example extra (pip install -e '.[example]') is missing")
    from pipecat.services.openai.llm import OpenAILLMService
    from pipecat.services.whisper.stt import WhisperSTTService

    config = write_config(tmp_path / "orpheus.yaml", tiny_model_dir, SHORT_TOKENS)
    services = bot.create_services(bot.parse_options(agent_argv(config, whisper_dir), environ={}))
    assert isinstance(services.stt, WhisperSTTService)
    assert isinstance(services.llm, OpenAILLMService) and services.llm._settings.model == "llama3.2"
    assert str(services.llm._client.base_url).startswith("http://127.0.0.1:9/v1")
    assert isinstance(services.tts, OrpheusTTSService) and services.tts._settings.voice == "leo"
    assert services.tts._settings.model == str(tiny_model_dir / "llm")  # local mode: the configured model
    remote = bot.create_tts(bot.parse_options(["--orpheus-url", "ws://127.0.0.1:9/api/tts_streaming"], environ={}))
    assert isinstance(remote, OrpheusTTSService) and remote._settings.model is None  # remote: the server's model


async def test_agent_speaks_the_llm_reply(
    bot: ModuleType, tiny_model_dir: Path, whisper_dir: Path | None, tmp_path: Path
) -> None:
    """LLM text through the bot's pipeline comes out as one spoken turn of 24 kHz Orpheus audio, kept in the context."""
    config = write_config(tmp_path / "orpheus.yaml", tiny_model_dir, SHORT_TOKENS)
    argv = agent_argv(config, whisper_dir)
    down, context = await run_agent(bot, argv, llm_reply(*REPLY), whisper=whisper_dir is not None)
    assert first(down, TTSStartedFrame) < first(down, TTSAudioRawFrame) < first(down, TTSStoppedFrame)
    audio = audio_frames(down)
    assert all(f.sample_rate == fmt.SAMPLE_RATE and f.num_channels == 1 for f in audio)
    assert sum(len(f.audio) // 2 for f in audio) >= fmt.SAMPLES_PER_FRAME
    said = " ".join(m["content"] for m in context.get_messages() if m.get("role") == "assistant")
    assert "meet you" in said
    await wait_idle(config)


async def test_agent_stops_speaking_when_interrupted(
    bot: ModuleType, tiny_model_dir: Path, whisper_dir: Path | None, tmp_path: Path
) -> None:
    """A barge-in mid-reply silences the bot at once, keeps the unspoken rest out of the context, frees the engine."""
    config = write_config(tmp_path / "orpheus.yaml", tiny_model_dir, LONG_TOKENS)
    frames = [*llm_reply(*REPLY), SleepFrame(FIRST_AUDIO_WAIT_S), InterruptionFrame(), SleepFrame(0.5)]
    down, context = await run_agent(bot, agent_argv(config, whisper_dir), frames, whisper=whisper_dir is not None)
    cut = first(down, InterruptionFrame)
    assert audio_frames(down[:cut]) and not audio_frames(down[cut:])
    said = " ".join(m["content"] for m in context.get_messages() if m.get("role") == "assistant")
    assert "meet you" not in said
    await wait_idle(config)


async def test_bot_under_the_runner_greets_a_webrtc_client(
    tiny_model_dir: Path, whisper_dir: Path | None, tmp_path: Path
) -> None:
    """`python bot.py` under Pipecat's runner answers a WebRTC offer and greets the caller with Orpheus audio."""
    if whisper_dir is None or importlib.util.find_spec("aiortc") is None:
        pytest.skip("the example extra (pip install -e '.[example]': faster-whisper, aiortc) is not installed")
    from aiortc import RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import AudioStreamTrack

    port = free_port()
    config = write_config(tmp_path / "orpheus.yaml", tiny_model_dir, SHORT_TOKENS)
    argv = [*agent_argv(config, whisper_dir), "--port", str(port), "-t", "webrtc"]
    log = (tmp_path / "bot.log").open("w")
    process = subprocess.Popen([sys.executable, BOT_PATH.name, *argv], cwd=BOT_PATH.parent, stdout=log, stderr=log)
    peer = RTCPeerConnection()
    try:
        await wait_until_serving(f"http://127.0.0.1:{port}/client/", process, timeout_s=RUNNER_START_TIMEOUT_S)
        peer.addTrack(AudioStreamTrack())  # the caller's microphone: silence
        heard: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        @peer.on("track")
        def on_track(track: Any) -> None:
            asyncio.ensure_future(listen(track, heard))

        await peer.setLocalDescription(await peer.createOffer())
        offer = {"sdp": peer.localDescription.sdp, "type": peer.localDescription.type}
        answer = await asyncio.to_thread(post_json, f"http://127.0.0.1:{port}/api/offer", offer)
        await peer.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        loud = await asyncio.wait_for(heard, RUNNER_START_TIMEOUT_S)
        assert loud >= fmt.SAMPLES_PER_FRAME  # at least one SNAC frame of (noise) speech reached the caller
    finally:
        await peer.close()
        process.terminate()
        try:
            await asyncio.to_thread(process.wait, 30)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)
        log.close()


async def listen(track: Any, heard: asyncio.Future[int]) -> None:
    """Count loud samples of the bot's audio until a SNAC frame's worth has arrived."""
    loud = 0
    while not heard.done():
        try:
            frame = await track.recv()
        except Exception as e:  # the track ended: report what arrived
            heard.set_exception(AssertionError(f"the bot's audio track ended ({type(e).__name__}) after {loud} loud"))
            return
        loud += int((np.abs(frame.to_ndarray().astype(np.int32)) > LOUD).sum())
        if loud >= fmt.SAMPLES_PER_FRAME:
            heard.set_result(loud)


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_until_serving(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    """Wait until `url` answers, failing early if the bot process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"bot.py exited with {process.returncode}"
        try:
            await asyncio.to_thread(urllib.request.urlopen, url, timeout=1)
            return
        except OSError:
            await asyncio.sleep(0.5)
    raise AssertionError(f"bot.py did not serve {url} within {timeout_s} s")


def post_json(url: str, body: dict) -> dict:
    """POST `body` as JSON and return the JSON answer."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())
