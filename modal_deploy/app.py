# # Orpheus TTS on Modal: the pipecat-orpheus WebSocket server on an H100
#
# This file deploys the very server that `pipecat-orpheus serve` runs (pipecat_orpheus.wire.server,
# imported, not copied) behind a Modal web endpoint, so a Pipecat bot anywhere can point
# `OrpheusTTSService(url=..., api_key=...)` at it. One container holds one GPU and one batched
# engine; every WebSocket connection to that container shares the engine, and Modal adds
# containers as connections grow.
#
#     modal deploy modal_deploy/app.py   # production URL: https://<workspace>--pipecat-orpheus.modal.run
#     modal serve modal_deploy/app.py    # development URL (suffix -dev), reloads on file changes
#
# modal_deploy/README.md has the one-time setup (secrets), the URL, costs and the client side.

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import threading
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import modal

from pipecat_orpheus.config import Config, ModelConfig, load_config

if TYPE_CHECKING:
    from pipecat_orpheus.speech import Synthesizer

# ## Configuration: orpheus_config.yaml, read once, on both sides
#
# Modal imports this file twice: on your machine, where the decorators below are evaluated and
# sent to Modal, and inside every container. Both must see the same configuration, so the YAML
# is copied into the image, and the `ORPHEUS_*` overrides of the deploying shell are copied into
# the image's environment (never the API keys: they travel only in a Modal Secret).
# `ORPHEUS_CONFIG=path/to/other.yaml modal deploy ...` deploys another configuration file.

IN_CONTAINER_CONFIG = Path("/root/orpheus_config.yaml")  # where load_config() looks by default in the container
LOCAL_CONFIG = Path(os.environ.get("ORPHEUS_CONFIG", Path(__file__).resolve().parent.parent / "orpheus_config.yaml"))
CONFIG_PATH = LOCAL_CONFIG if modal.is_local() else IN_CONTAINER_CONFIG
CONFIG: Config = load_config(CONFIG_PATH)


def forwarded_environment(config: Config, environ: dict[str, str]) -> dict[str, str]:
    """The deploying shell's `ORPHEUS_<SECTION>_<KEY>` config overrides, for the image; never the API keys.

    Only config keys travel: a client-side `ORPHEUS_API_KEY` or `ORPHEUS_URL` in the shell stays there.
    """
    sections = tuple(f"ORPHEUS_{f.name.upper()}_" for f in dataclasses.fields(config))
    return {k: v for k, v in sorted(environ.items()) if k.startswith(sections) and k != config.server.api_key_env}


# ## The image: pinned runtime, our package and the config on top
#
# The pins are the versions the project is tested with; tests/test_modal_app.py checks that every
# dependency of pyproject.toml is here. PyPI's Linux torch wheel ships with its CUDA libraries.
# Local files come last, so editing the code does not rebuild the layers above.

PYTHON_VERSION = "3.12"
RUNTIME_PACKAGES = (
    "torch==2.13.0",
    "transformers==5.24.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "huggingface-hub==2.4.0",  # with hf-xet on x86_64: fast, resumable downloads
    "snac==1.2.1",
    "batched==0.1.5",
    "pipecat-ai==1.14.0",
    "websockets==17.4",
    "numpy==2.4.6",
    "loguru==0.7.3",
    "msgpack==1.2.4",
    "pyzmq==27.3.0",
    "pyyaml==6.0.4",
    "prometheus-client==0.26.0",
    "tqdm==4.70.1",
)

WEIGHTS_DIR = Path("/weights")  # the Volume's mount point
HF_HOME = WEIGHTS_DIR / "huggingface"  # the Hugging Face cache lives on the Volume
MANIFEST = WEIGHTS_DIR / "manifest.json"  # hub id -> local snapshot directory, once fully downloaded

image = (
    modal.Image.debian_slim(python_version=PYTHON_VERSION)
    .uv_pip_install(*RUNTIME_PACKAGES)
    .env({"HF_HOME": str(HF_HOME), **forwarded_environment(CONFIG, dict(os.environ))})
    .add_local_python_source("pipecat_orpheus")
    .add_local_file(LOCAL_CONFIG, str(IN_CONTAINER_CONFIG))
)

# ## Weights in a Volume, secrets by name
#
# The first container to start downloads the weights into the Volume (about 6.6 GB; progress bars
# in `modal app logs`) with the `HF_TOKEN` of the Hugging Face secret (Orpheus is gated: accept its
# licence on the hub first). Later starts read them from the Volume with no network. To fill the
# Volume before the first connection: `modal run modal_deploy/app.py::download_weights`.

app = modal.App(CONFIG.modal.app_name, image=image)
weights = modal.Volume.from_name(CONFIG.modal.weights_volume, create_if_missing=True)
hf_secret = modal.Secret.from_name(CONFIG.modal.hf_secret, required_keys=["HF_TOKEN"])
api_keys = modal.Secret.from_name(CONFIG.modal.api_key_secret, required_keys=[CONFIG.server.api_key_env])


def fetch_weights(model: ModelConfig, manifest: Path = MANIFEST) -> tuple[ModelConfig, bool]:
    """`model` with local directories for the LLM and SNAC, downloading what the manifest lacks.

    Returns the ModelConfig (its `llm` and `codec` are directories, so loading never touches the
    hub) and whether anything was downloaded (then the Volume needs a commit).
    """
    from loguru import logger

    from pipecat_orpheus import loader

    known = json.loads(manifest.read_text()) if manifest.is_file() else {}
    found = {name: known.get(name) for name in (model.llm, model.codec)}
    if all(path and Path(path).is_dir() for path in found.values()):
        logger.info(f"Weights found on the Volume: {found}")
        return dataclasses.replace(model, llm=found[model.llm], codec=found[model.codec]), False
    logger.info(f"Fetching {model.llm} and {model.codec} into {HF_HOME} (first start only; several GB)")
    start = time.monotonic()
    llm_dir = loader.resolve_llm_dir(model.llm)  # huggingface_hub shows per-file progress bars
    codec_dir = loader.resolve_snac_files(model.codec)[0].parent
    size_gb = sum(f.stat().st_size for d in (llm_dir, codec_dir) for f in d.rglob("*") if f.is_file()) / 1e9
    logger.info(f"Weights ready: {size_gb:.1f} GB in {time.monotonic() - start:.0f} s")
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({**known, model.llm: str(llm_dir), model.codec: str(codec_dir)}, indent=1))
    return dataclasses.replace(model, llm=str(llm_dir), codec=str(codec_dir)), True


@app.function(volumes={WEIGHTS_DIR: weights}, secrets=[hf_secret], timeout=CONFIG.modal.startup_timeout_s)
def download_weights() -> None:
    """Fill the weights Volume ahead of the first connection (CPU only; run it once)."""
    if fetch_weights(CONFIG.model)[1]:
        weights.commit()


# ## The serving entry: a plain function, also run by the tests
#
# `start_server` loads the process's shared engine, warms it up with one short utterance, starts
# our WebSocket server on a background thread, and returns once `GET /healthz` answers 200. The
# Modal container calls it in `@modal.enter()`; tests/test_modal_app.py calls it on loopback with
# the tiny model and completes a protocol session against it.

WARMUP_TEXT = "Hello."  # one short utterance: first-call allocations and kernel picks before traffic


class RunningServer:
    """Our WebSocket server on its own event loop in a daemon thread; `stop()` shuts it down gracefully."""

    def __init__(self, config: Config, synthesizer: Synthesizer) -> None:
        self.config = config
        self.port: int | None = None
        self._synthesizer = synthesizer
        self._loop = asyncio.new_event_loop()
        self._stopped: asyncio.Event | None = None
        self._listening = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="orpheus-server", daemon=True)

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as e:  # surfaced to the starting thread, which re-raises it
            self._error = e
            self._listening.set()
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        from pipecat_orpheus.wire import server

        self._stopped = asyncio.Event()
        await self._synthesizer.submit(WARMUP_TEXT).read_all()
        async with server.serve(self.config, synthesizer=self._synthesizer) as running:
            self.port = running.port
            self._listening.set()
            await self._stopped.wait()

    def start(self, timeout_s: float) -> RunningServer:
        """Start serving; return once `/healthz` answers 200, or raise what went wrong."""
        self._thread.start()
        if not self._listening.wait(timeout_s):
            raise TimeoutError(f"the Orpheus server did not start listening within {timeout_s} s")
        if self._error is not None:
            raise self._error
        wait_healthy(f"http://127.0.0.1:{self.port}/healthz", timeout_s)
        return self

    def stop(self) -> None:
        """Stop accepting, let in-flight utterances finish (server.shutdown_grace_s), then join the thread.

        The synthesizer stays open: it is the process's shared one, and the process is about to end.
        """
        if self._stopped is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(self.config.server.shutdown_grace_s + 5)


def wait_healthy(url: str, timeout_s: float) -> None:
    """Poll `url` until it answers 200 (the readiness check Modal's port check cannot make)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer 200 within {timeout_s} s")
        time.sleep(0.1)


def start_server(config: Config, synthesizer: Synthesizer | None = None) -> RunningServer:
    """Load the engine (unless `synthesizer` is given), warm it up and serve `config.server`; blocking."""
    from pipecat_orpheus.speech import load_synthesizer

    synth = synthesizer if synthesizer is not None else load_synthesizer(config)
    return RunningServer(config, synth).start(timeout_s=config.modal.startup_timeout_s)


def container_config(config: Config, model: ModelConfig) -> Config:
    """`config` as a container serves it: every interface, the web endpoint's port, weights from the Volume."""
    server = dataclasses.replace(config.server, host="0.0.0.0")
    return dataclasses.replace(config, model=model, server=server)


# ## The Modal class: one engine per container, one WebSocket per input
#
# Each open WebSocket is one Modal input, so `@modal.concurrent(max_inputs=...)` is the number of
# connections one container takes before Modal routes to (or starts) another: the engine's slot
# count, since each connection speaks one utterance at a time. `timeout` bounds a connection's
# life, so it is set for a long conversation; `scaledown_window` keeps an idle container (and its
# loaded engine) around for the next caller. All of it comes from the `modal` section of
# orpheus_config.yaml.

AUTOSCALING = {
    "min_containers": CONFIG.modal.min_containers,
    "max_containers": CONFIG.modal.max_containers,
    "buffer_containers": CONFIG.modal.buffer_containers,
    "scaledown_window": CONFIG.modal.scaledown_window_s,
}
MAX_CONNECTIONS_PER_CONTAINER = CONFIG.engine.max_slots
PORT = CONFIG.server.port


@app.cls(
    gpu=CONFIG.modal.gpu,
    volumes={WEIGHTS_DIR: weights},
    secrets=[hf_secret, api_keys],
    timeout=CONFIG.modal.timeout_s,
    startup_timeout=CONFIG.modal.startup_timeout_s,
    **AUTOSCALING,
)
@modal.concurrent(max_inputs=MAX_CONNECTIONS_PER_CONTAINER)
class OrpheusServer:
    """The Orpheus WebSocket server: `/api/tts_streaming` (alias `/ws`), `/healthz`, `/metrics`."""

    @modal.enter()
    def start(self) -> None:
        """Fetch weights (first start only), load and warm the engine, and listen on PORT."""
        model, downloaded = fetch_weights(CONFIG.model)
        if downloaded:
            weights.commit()  # later containers find the weights without a download
        self.server = start_server(container_config(CONFIG, model))

    @modal.web_server(port=PORT, startup_timeout=CONFIG.modal.startup_timeout_s, label=CONFIG.modal.app_name)
    def serve(self) -> None:
        """Modal sends this endpoint's traffic to PORT, where `start` already has the server listening."""

    @modal.exit()
    def stop(self) -> None:
        """Graceful shutdown when Modal scales the container down."""
        self.server.stop()
