"""pipecat-orpheus: Orpheus TTS for Pipecat voice agents (local batched engine or remote server)."""

from pipecat_orpheus.config import Config, load_config
from pipecat_orpheus.engine.request import SamplingParams

__all__ = ["Config", "OrpheusTTSService", "OrpheusTTSSettings", "SamplingParams", "load_config"]


def __getattr__(name: str):
    # Lazy: the service pulls in Pipecat, which the server, the CLI and the engine do not need.
    if name in ("OrpheusTTSService", "OrpheusTTSSettings"):
        from pipecat_orpheus import service

        return getattr(service, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
