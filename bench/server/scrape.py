"""The server's own figures for a bench run: `/metrics` read over HTTP before and after, as a delta.

Counters and histograms are differenced; histogram quantiles are interpolated inside the bucket
that holds them, as Prometheus' `histogram_quantile` does, so they are only as fine as the
buckets of `pipecat_orpheus/wire/metrics.py`. Gauges are sampled while the run goes (`Peaks`).
"""

from __future__ import annotations

import asyncio
import math

from prometheus_client.parser import text_string_to_metric_families

from pipecat_orpheus.wire.metrics import ENGINE_COUNTERS

Sample = tuple[str, tuple[tuple[str, str], ...]]  # (name, sorted labels)
GAUGES = (
    "orpheus_open_connections",
    "orpheus_streams",
    "orpheus_engine_active_requests",
    "orpheus_engine_queued_requests",
)
AUDIO = ("orpheus_audio_seconds_total", ())
HISTOGRAMS = {"ttfa": "orpheus_time_to_first_audio_seconds", "chunk_gap": "orpheus_chunk_gap_seconds"}
COUNTERS = {
    "pieces": "orpheus_pieces_total",
    "errors": "orpheus_errors_total",
    "connections": "orpheus_connections_total",
}


async def scrape(port: int, host: str = "127.0.0.1") -> dict[Sample, float]:
    """Every sample of the server's `/metrics`."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
    raw = await reader.read()  # the server closes after the answer
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"/metrics answered {head[:40]!r}")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def _quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' `histogram_quantile` over (upper bound, cumulative count) pairs, +Inf last."""
    total = buckets[-1][1]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower  # past the last finite bound: that bound is all one can say
            return lower + (upper - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = upper, count
    return lower


def _histogram(name: str, before: dict, after: dict) -> dict:
    delta = {k: v - before.get(k, 0.0) for k, v in after.items() if k[0].startswith(name)}
    buckets = sorted((float(dict(labels)["le"]), v) for (n, labels), v in delta.items() if n == name + "_bucket")
    count, total = delta.get((name + "_count", ()), 0.0), delta.get((name + "_sum", ()), 0.0)
    ms = lambda x: None if x is None else round(x * 1e3, 2)  # noqa: E731
    return {
        "n": int(count),
        "mean_ms": ms(total / count) if count else None,
        **{f"p{q}_ms": ms(_quantile(q / 100, buckets)) if buckets else None for q in (50, 95, 99)},
    }


def _counter(name: str, before: dict, after: dict) -> dict:
    out = {}
    for (n, labels), v in after.items():
        if n == name and v - before.get((n, labels), 0.0):
            out[",".join(val for _, val in labels) or "all"] = v - before.get((n, labels), 0.0)
    return out


def delta(before: dict[Sample, float], after: dict[Sample, float]) -> dict:
    """What the server counted between two scrapes."""
    return {
        **{key: _histogram(name, before, after) for key, name in HISTOGRAMS.items()},
        **{key: _counter(name, before, after) for key, name in COUNTERS.items()},
        "audio_s": round(after.get(AUDIO, 0.0) - before.get(AUDIO, 0.0), 2),
    }


def engine_counters(samples: dict[Sample, float]) -> list[dict[str, float]]:
    """Each engine core's counters in a scrape, by `EngineStats` field, in core order."""
    cores: dict[int, dict[str, float]] = {}
    for field, gauge in ENGINE_COUNTERS.items():
        for (name, labels), value in samples.items():
            if name == gauge._name and labels and labels[0][0] == "core":
                cores.setdefault(int(labels[0][1]), {})[field] = value
    return [cores[i] for i in sorted(cores)]


class Peaks:
    """The largest value of each gauge, sampled every `interval_s` while the context is open."""

    def __init__(self, port: int, interval_s: float = 0.5):
        self.port, self.interval_s = port, interval_s
        self.peaks = dict.fromkeys(GAUGES, 0.0)
        self._task: asyncio.Task | None = None

    async def _poll(self) -> None:
        while True:
            try:
                samples = await scrape(self.port)
            except (OSError, RuntimeError):
                samples = {}  # a busy moment is a missed sample, not a failed run
            for name in GAUGES:
                self.peaks[name] = max(self.peaks[name], samples.get((name, ()), 0.0))
            await asyncio.sleep(self.interval_s)

    async def __aenter__(self) -> Peaks:
        self._task = asyncio.create_task(self._poll())
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
