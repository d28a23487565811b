"""The batched Orpheus engine: `OrpheusEngine` (continuous batching on the GPU) and `SamplingParams`."""

from pipecat_orpheus.engine.request import SamplingParams

__all__ = ["OrpheusEngine", "SamplingParams"]


def __getattr__(name: str):
    # Lazy: engine.py imports synthesizer.py, which imports this package for SamplingParams.
    if name == "OrpheusEngine":
        from pipecat_orpheus.engine.engine import OrpheusEngine

        return OrpheusEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
