"""Where late chunks come from: a trace of one sweep level, and its diagnosis.

`LevelTrace` records, while a level runs, every engine step (start, seconds, decode rows, prompt
tokens), every garbage collection (start, seconds, generation) and, per stream, when the engine
handed each chunk out (`AudioStream.put`, on the engine thread). `diagnose` then splits each
late chunk into engine lateness (the engine handed it out after its playback time, counted from
the engine's first hand-out) and delivery lateness (handed out in time, but the consumer's event
loop saw it late), and says what ran just before it: the slowest step, the steps' mean, the
batch, prompt tokens and collections in the 2 frames (171 ms) before the hand-out.
"""

from __future__ import annotations

import gc
import time

import numpy as np

SAMPLE_RATE = 24000
WINDOW_S = 2 * 2048 / SAMPLE_RATE  # look back two frames of audio before a late hand-out


class LevelTrace:
    """Context manager: engine steps, GC pauses and per-stream hand-out times while a level runs."""

    def __init__(self, engine):
        self.engine = engine
        self.steps: list[tuple[float, float, int, int]] = []  # (start, seconds, decode rows, prompt tokens)
        self.gc: list[tuple[float, float, int]] = []  # (start, seconds, generation)
        self._gc_start = 0.0

    def watch(self, stream) -> list[float]:
        """Record when the engine hands each of `stream`'s chunks out; returns the list it fills."""
        puts: list[float] = []
        put = stream.put

        def timed_put(pcm):
            puts.append(time.perf_counter())
            put(pcm)

        stream.put = timed_put
        return puts

    def _timed_step(self, step, in_flight):
        t = time.perf_counter()
        out = type(self.engine)._step(self.engine, step, in_flight)
        self.steps.append((t, time.perf_counter() - t, len(step.decode), sum(c.end - c.start for c in step.prefill)))
        return out

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self.gc.append((self._gc_start, time.perf_counter() - self._gc_start, info["generation"]))

    def __enter__(self) -> LevelTrace:
        self.engine._step = self._timed_step  # the instance attribute shadows the method for the step thread
        gc.callbacks.append(self._on_gc)
        return self

    def __exit__(self, *exc) -> None:
        del self.engine._step
        gc.callbacks.remove(self._on_gc)


def diagnose(streams: list[tuple], puts: list[list[float]], trace: LevelTrace, level_start: float) -> dict:
    """Late chunks split into engine and delivery lateness, with what ran before each engine-late one."""
    steps = np.array(trace.steps or [(0, 0, 0, 0)], dtype=np.float64)  # (steps, 4)
    pauses = np.array(trace.gc or [(0, 0, 0)], dtype=np.float64)  # (collections, 3)
    late_engine, late_delivery = [], 0
    for (_, arr, sizes, _), put in zip(streams, puts, strict=True):
        put = np.array(put[: len(arr)])
        if len(put) < len(arr):
            continue  # a chunk handed out before the stream was watched: cannot split this stream
        offset_s = np.concatenate([[0], np.cumsum(sizes)[:-1]]) / SAMPLE_RATE
        late = arr - (arr[0] + offset_s)
        engine_late = put - (put[0] + offset_s)
        for k in np.nonzero(late[1:] > 0)[0] + 1:
            if engine_late[k] <= 0:
                late_delivery += 1
                continue
            t = put[k]
            near = steps[(steps[:, 0] >= t - WINDOW_S) & (steps[:, 0] < t)]
            gcs = pauses[(pauses[:, 0] >= t - WINDOW_S) & (pauses[:, 0] < t)]
            late_engine.append({
                "ms_late": engine_late[k] * 1e3, "chunk": int(k), "audio_s": float(offset_s[k]),
                "at_s": t - level_start, "max_step_ms": near[:, 1].max(initial=0) * 1e3,
                "mean_step_ms": near[:, 1].mean() * 1e3 if len(near) else 0.0,
                "rows": int(near[:, 2].max(initial=0)), "prompt_tokens": int(near[:, 3].sum()),
                "gc_ms": gcs[:, 1].sum() * 1e3,
            })  # fmt: skip
    step_ms = steps[:, 1] * 1e3
    worst = sorted(late_engine, key=lambda d: -d["ms_late"])
    return {
        "late_engine": len(late_engine),
        "late_delivery": late_delivery,
        "late_engine_in_first_s": sum(1 for d in late_engine if d["audio_s"] < 1.0),
        "late_engine_worst": worst[:8],
        "step_ms_p50": float(np.percentile(step_ms, 50)),
        "step_ms_p99": float(np.percentile(step_ms, 99)),
        "step_ms_max": float(step_ms.max()),
        "slowest_steps": [
            {"at_s": s[0] - level_start, "ms": s[1] * 1e3, "rows": int(s[2]), "prompt_tokens": int(s[3])}
            for s in steps[np.argsort(-steps[:, 1])[:6]]
        ],
        "gc_count": len(trace.gc),
        "gc_ms_max": float(pauses[:, 1].max() * 1e3),
        "gc_gen2": int((pauses[:, 2] == 2).sum()) if trace.gc else 0,
    }
