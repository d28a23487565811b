"""The batched Orpheus engine: `OrpheusEngine` (continuous batching on the GPU), `SamplingParams`, `AudioStream`."""

from pipecat_orpheus.engine.engine import OrpheusEngine
from pipecat_orpheus.engine.request import SamplingParams
from pipecat_orpheus.engine.stream import AudioStream

__all__ = ["AudioStream", "OrpheusEngine", "SamplingParams"]
