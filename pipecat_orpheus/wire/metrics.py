"""Every Prometheus metric of the server, with explicit buckets, in one registry served at `/metrics`.

Buckets are chosen for a voice agent: time to first audio matters between ~20 ms and a few
seconds, chunk gaps around the 80 ms message period.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

REGISTRY = CollectorRegistry()
# `serve --workers N` sets it for its workers: each writes its own values there, any of them renders all.
MULTIPROCESS = "PROMETHEUS_MULTIPROC_DIR" in os.environ

# Seconds; from submitting a piece of text to its first audio chunk.
_TTFA_BUCKETS = (0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)
# Seconds between two audio chunks of one piece (real time is one 2048-sample frame per 85 ms).
_GAP_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.085, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
# Seconds of audio in one piece of text.
_AUDIO_BUCKETS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)

CONNECTIONS = Gauge(
    "orpheus_open_connections", "Open WebSocket streams.", multiprocess_mode="livesum", registry=REGISTRY
)
CONNECTIONS_TOTAL = Counter(
    "orpheus_connections_total",
    "WebSocket connections by outcome (accepted, busy, unauthorized, shutting_down).",
    ["outcome"],
    registry=REGISTRY,
)
STREAMS = Gauge(
    "orpheus_streams",
    "Pieces of text being synthesized for clients now.",
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
# The one engine every worker sees: the value set last (at render) is the value.
ENGINE_ACTIVE = Gauge(
    "orpheus_engine_active_requests", "Requests holding an engine slot.", multiprocess_mode="mostrecent",
    registry=REGISTRY,
)  # fmt: skip
ENGINE_QUEUED = Gauge(
    "orpheus_engine_queued_requests", "Requests waiting for an engine slot.", multiprocess_mode="mostrecent",
    registry=REGISTRY,
)  # fmt: skip
# Each engine core's own counters since it started, as its last beat said, by `EngineStats` field;
# label: the core's index in `engine.devices`.
ENGINE_COUNTERS = {
    field: Gauge(f"orpheus_engine_{name}", help_text, ["core"], multiprocess_mode="mostrecent", registry=REGISTRY)
    for field, name, help_text in (
        ("steps", "steps", "Engine steps run."),
        ("busy_s", "busy_seconds", "Seconds the engine spent in steps."),
        ("decode_tokens", "decode_tokens", "Audio tokens generated."),
        ("prefill_tokens", "prefill_tokens", "Prompt tokens prefilled."),
        ("codec_windows", "codec_windows", "SNAC windows decoded."),
        ("headroom", "headroom_streams", "Streams the engine can admit now and stay real time (its step-time model)."),
    )
}
PIECES_TOTAL = Counter(
    "orpheus_pieces_total", "Pieces of text by outcome (done, cancelled, error, busy).", ["outcome"], registry=REGISTRY
)
TIME_TO_FIRST_AUDIO = Histogram(
    "orpheus_time_to_first_audio_seconds",
    "From submitting a piece of text to its first audio.",
    buckets=_TTFA_BUCKETS,
    registry=REGISTRY,
)
CHUNK_GAP = Histogram(
    "orpheus_chunk_gap_seconds", "Time between audio chunks of one piece.", buckets=_GAP_BUCKETS, registry=REGISTRY
)
PIECE_STOPS = Counter(
    "orpheus_piece_stops_total",
    "Pieces spoken to their end, by why the audio ended (end_of_speech, max_tokens, and the guard's duration, loop).",
    ["reason"],
    registry=REGISTRY,
)
PIECE_AUDIO = Histogram(
    "orpheus_piece_audio_seconds", "Audio generated per piece of text.", buckets=_AUDIO_BUCKETS, registry=REGISTRY
)
AUDIO_SECONDS_TOTAL = Counter(
    "orpheus_audio_seconds_total", "Audio generated (its rate is audio seconds per second).", registry=REGISTRY
)
ERRORS_TOTAL = Counter("orpheus_errors_total", "Error messages sent, by code.", ["code"], registry=REGISTRY)


def render(active_requests: int, queued_requests: int, engine_stats: list) -> tuple[bytes, str]:
    """The exposition text of every metric (of every worker) and its content type, with the engines' figures now.

    `engine_stats`: each engine core's `EngineStats`, in device order.
    """
    ENGINE_ACTIVE.set(active_requests)
    ENGINE_QUEUED.set(queued_requests)
    for core, stats in enumerate(engine_stats):
        for field, gauge in ENGINE_COUNTERS.items():
            gauge.labels(core=str(core)).set(getattr(stats, field))
    if not MULTIPROCESS:
        return generate_latest(REGISTRY), CONTENT_TYPE
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry), CONTENT_TYPE
