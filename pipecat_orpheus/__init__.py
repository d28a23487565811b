"""pipecat-orpheus: Orpheus TTS for Pipecat voice agents (local batched engine or remote server)."""

from pipecat_orpheus.config import Config, load_config
from pipecat_orpheus.engine.request import SamplingParams
from pipecat_orpheus.service import OrpheusTTSService, OrpheusTTSSettings

__all__ = ["Config", "OrpheusTTSService", "OrpheusTTSSettings", "SamplingParams", "load_config"]
