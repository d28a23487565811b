"""The batched Orpheus engine."""

from pipecat_orpheus.engine.request import SamplingParams

__all__ = ["SamplingParams"]
