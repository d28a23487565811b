"""modal_deploy/app.py: what it declares to Modal (read offline), and its serving entry run on loopback.

Nothing here talks to Modal: `Function.info()` of a locally defined app is filled at decoration
time. The serving entry (`start_server`) is the one the container runs in `@modal.enter()`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import websockets
from pipecat.frames.frames import ErrorFrame, TTSAudioRawFrame

from pipecat_orpheus import format as fmt
from pipecat_orpheus.config import Config, ModelConfig, load_config
from pipecat_orpheus.testing import tiny_model_overrides
from pipecat_orpheus.wire import protocol as p
from tests.helpers import llm_reply, load_script, run_agent, whisper_flags

pytest.importorskip("modal", reason="modal is not installed: pip install -e '.[modal]'")

ROOT = Path(__file__).resolve().parent.parent
APP_PATH = ROOT / "modal_deploy" / "app.py"
API_KEY = "test-key-123"
KEYS_ENV = "ORPHEUS_TEST_MODAL_KEYS"  # a variable of this test only, so a developer's own keys never leak in


def load_app() -> ModuleType:
    """Import modal_deploy/app.py as Modal does (a file, not a package)."""
    return load_script(APP_PATH, "modal_deploy_app")


@pytest.fixture(scope="module")
def app() -> ModuleType:
    """The Modal app module, imported offline."""
    return load_app()


@pytest.fixture(scope="module")
def config() -> Config:
    """The repository's configuration, which the app is built from."""
    return load_config(ROOT / "orpheus_config.yaml")


def test_gpu_concurrency_timeouts_from_config(app: ModuleType, config: Config) -> None:
    """The server class asks for the configured GPU, timeouts, and one connection per engine slot."""
    info = app.OrpheusServer().serve.info()
    assert info.gpus == [(config.modal.gpu, 1)]
    assert info.timeout == config.modal.timeout_s
    assert info.startup_timeout == config.modal.startup_timeout_s
    assert info.concurrency_info.max_inputs == config.engine.max_slots
    assert info.method_names == ["serve"] and info.method_details["serve"] is not None
    assert app.PORT == config.server.port
    assert app.AUTOSCALING == {
        "min_containers": config.modal.min_containers,
        "max_containers": config.modal.max_containers,
        "buffer_containers": config.modal.buffer_containers,
        "scaledown_window": config.modal.scaledown_window_s,
    }


def test_volume_and_secrets(app: ModuleType, config: Config) -> None:
    """Weights come from the named Volume; the Hugging Face token and the API keys from the named Secrets."""
    info = app.OrpheusServer().serve.info()
    assert {path: mount.name for path, mount in info.volumes.items()} == {"/weights": config.modal.weights_volume}
    secrets = " ".join(info.secrets)
    assert config.modal.hf_secret in secrets and config.modal.api_key_secret in secrets
    download = app.download_weights.info()
    assert download.gpus == [] and download.volumes["/weights"].name == config.modal.weights_volume
    assert app.app.name == config.modal.app_name


def test_image_pins_every_dependency(app: ModuleType) -> None:
    """Every runtime dependency of pyproject.toml is pinned to an exact version in the image."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.match(r"[A-Za-z0-9_.-]+", d).group(0).lower() for d in deps}
    pins = dict(re.match(r"([A-Za-z0-9_.-]+)(?:\[.*\])?==(.+)", pkg).groups() for pkg in app.RUNTIME_PACKAGES)
    assert names <= {n.lower() for n in pins}, names - {n.lower() for n in pins}


def test_forwarded_environment_keeps_keys_out_of_the_image(app: ModuleType, config: Config) -> None:
    """Deploy-time config overrides reach the container; server keys, client settings and the rest do not."""
    environ = {
        "ORPHEUS_ENGINE_MAX_SLOTS": "64",
        config.server.api_key_env: "server-secret",
        "ORPHEUS_API_KEY": "client-secret",
        "ORPHEUS_URL": "wss://x",
        "HOME": "/root",
    }
    assert app.forwarded_environment(config, environ) == {"ORPHEUS_ENGINE_MAX_SLOTS": "64"}


def test_fetch_weights_uses_the_manifest(app: ModuleType, tiny_model_dir: Path, tmp_path: Path) -> None:
    """Weights already on the Volume are used by directory, with no download and no hub access."""
    model = ModelConfig(llm="canopylabs/orpheus-3b-0.1-ft", codec="hubertsiuzdak/snac_24khz")
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({model.llm: str(tiny_model_dir / "llm"), model.codec: str(tiny_model_dir / "snac")}))
    resolved, downloaded = app.fetch_weights(model, manifest)
    assert (resolved.llm, resolved.codec, downloaded) == (
        str(tiny_model_dir / "llm"),
        str(tiny_model_dir / "snac"),
        False,
    )


def test_fetch_weights_records_new_weights(app: ModuleType, tiny_model_dir: Path, tmp_path: Path) -> None:
    """Weights not in the manifest are fetched through the loader and recorded for the next container."""
    model = ModelConfig(llm=str(tiny_model_dir / "llm"), codec=str(tiny_model_dir / "snac"))
    manifest = tmp_path / "volume" / "manifest.json"
    resolved, downloaded = app.fetch_weights(model, manifest)
    assert (
        downloaded and Path(resolved.llm) == tiny_model_dir / "llm" and Path(resolved.codec) == tiny_model_dir / "snac"
    )
    assert json.loads(manifest.read_text()) == {model.llm: resolved.llm, model.codec: resolved.codec}
    assert app.fetch_weights(model, manifest)[1] is False


def test_container_config_listens_everywhere(app: ModuleType, config: Config, tiny_model_dir: Path) -> None:
    """In the container the server listens on every interface, on the web endpoint's port, with Volume weights."""
    model = ModelConfig(llm=str(tiny_model_dir / "llm"), codec=str(tiny_model_dir / "snac"))
    served = app.container_config(config, model)
    assert (served.server.host, served.server.port, served.model) == ("0.0.0.0", app.PORT, model)


def serving_config(tiny_model_dir: Path) -> Config:
    """The tiny model on the reference path, served on a free loopback port with this test's key variable."""
    return load_config(
        overrides={
            "engine.backend": "reference",
            **tiny_model_overrides(tiny_model_dir),
            "sampling.max_tokens": 28,
            "sampling.seed": 7,
            "server.host": "127.0.0.1",
            "server.port": 0,
            "server.api_key_env": KEYS_ENV,
            "modal.startup_timeout_s": 120,
        },
        environ={},
    )


def healthz(port: int) -> int:
    """HTTP status of GET /healthz."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


async def test_serving_entry_completes_a_session(
    app: ModuleType, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The container's serving entry, on loopback with the tiny model: healthy, key-protected, and it speaks."""
    monkeypatch.setenv(KEYS_ENV, API_KEY)
    running = await _to_thread(app.start_server, serving_config(tiny_model_dir))
    try:
        assert running.port and await _to_thread(healthz, running.port) == 200
        url = f"ws://127.0.0.1:{running.port}/api/tts_streaming?voice=leo"
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(url):
                pass
        assert refused.value.response.status_code == 401
        async with websockets.connect(url, additional_headers={"kyutai-api-key": API_KEY}) as ws:
            assert isinstance(p.decode_server(await ws.recv()), p.Ready)
            await ws.send(p.encode(p.Text("Hello from Modal. ")))
            await ws.send(p.encode(p.Eos()))
            messages = [p.decode_server(m) async for m in ws]
        assert ws.close_code == 1000
        pcm = np.concatenate([m.pcm for m in messages if isinstance(m, p.Audio)])
        assert pcm.dtype == np.float32 and len(pcm) >= fmt.SAMPLES_PER_FRAME and np.abs(pcm).max() <= 1.0
        assert [m.text for m in messages if isinstance(m, p.Word)] == ["Hello", "from", "Modal."]
    finally:
        await _to_thread(running.stop)
    assert not running._thread.is_alive()


async def test_voice_agent_speaks_through_the_serving_entry(
    app: ModuleType,
    bot: ModuleType,
    whisper_dir: Path | None,
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The example bot in remote mode, pointed at the container's serving entry with a key, speaks the LLM's reply."""
    monkeypatch.setenv(KEYS_ENV, API_KEY)
    running = await _to_thread(app.start_server, serving_config(tiny_model_dir))
    try:
        url = f"ws://127.0.0.1:{running.port}/api/tts_streaming"
        argv = [
            *("--orpheus-url", url, "--orpheus-api-key", API_KEY, "--voice", "zoe"),
            *whisper_flags(whisper_dir),
            *("--llm-base-url", "http://127.0.0.1:9/v1", "--llm-model", "llama3.2"),
        ]
        reply = llm_reply("Hello from ", "the cloud. ", "Nice to meet you.")
        down, context = await run_agent(bot, argv, reply, whisper=whisper_dir is not None)
    finally:
        await _to_thread(running.stop)
    audio = [f for f in down if isinstance(f, TTSAudioRawFrame)]
    assert sum(len(f.audio) // 2 for f in audio) >= 2 * fmt.SAMPLES_PER_FRAME  # two sentences, whole frames each
    assert not [f for f in down if isinstance(f, ErrorFrame)]
    said = " ".join(m["content"] for m in context.get_messages() if m.get("role") == "assistant")
    assert "meet you" in said


async def _to_thread(fn, *args):
    """Run blocking `fn` off the test's event loop."""
    import asyncio

    return await asyncio.to_thread(fn, *args)


def test_config_section_keys_are_documented(config: Config) -> None:
    """Every key of the modal section has a comment in orpheus_config.yaml (the README's reference table reads them)."""
    text = (ROOT / "orpheus_config.yaml").read_text()
    section = text.split("\nmodal:\n", 1)[1]
    for f in dataclasses.fields(config.modal):
        line = next(line for line in section.splitlines() if line.strip().startswith(f"{f.name}:"))
        assert "#" in line, f.name
