"""One client process of `bench.server.load`: many WebSocket streams on one event loop, a record per utterance.

The parent writes one JSON line to stdin (the job: url, mode, format, this process's streams),
this process opens what it must open beforehand and prints `{"ready": ...}`, then waits for the
line `go T0` (T0 on `time.monotonic()`, which every process of the machine shares). It prints one
JSON line per utterance and `{"end": true}` last. Only asyncio, msgpack and websockets are
imported, so a process starts in a fraction of a second and costs the host little.

burst  a stream connects at T0 + its offset, speaks one utterance and reads it to the end.
       `kyutai`: its words as `Text` messages, then `Eos` (the server closes after the audio);
       `speak`: one `Speak{text, id}`, read to `Done`.
churn  a conversation connects before T0, and from T0 + its offset until T0 + duration speaks
       (`Speak`), reads to `Done` and waits until the audio has played, pauses 0.3-2 s, speaks
       again. A fraction of utterances send `Cancel{id}` part-way and time the `Cancelled`.

Lateness: playback of an utterance starts when its first `Audio` arrives; an `Audio` message is
late when it arrives after the audio before it has finished playing (first arrival + the
duration of the samples before it). After a `Cancel` nothing counts: the player has stopped.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time

import msgpack
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

SAMPLE_RATE = 24_000  # pipecat_orpheus.format.SAMPLE_RATE (importing it would import torch)
CONNECT_TIMEOUT_S = 60.0
UTTERANCE_TIMEOUT_S = 300.0  # an utterance that takes longer is recorded as an error, not waited for


class Utterance:
    """The timing of one utterance as its messages arrive."""

    def __init__(self, conv: int, n: int, sent: float):
        self.conv, self.n, self.sent = conv, n, sent
        self.first: float | None = None
        self.last: float | None = None
        self.samples = 0
        self.chunks = 0
        self.late = 0
        self.worst_late = 0.0
        self.cancel_sent: float | None = None
        self.outcome = "open"
        self.error: str | None = None
        self.record: dict = {}

    def audio(self, t: float, samples: int) -> None:
        if self.cancel_sent is not None:
            return  # sent before the Cancel reached the server; the player has stopped
        if self.first is None:
            self.first = t
        else:
            lateness = t - (self.first + self.samples / SAMPLE_RATE)
            if lateness > 0:
                self.late += 1
                self.worst_late = max(self.worst_late, lateness)
        self.samples += samples
        self.chunks += 1
        self.last = t

    def played_at(self) -> float:
        """When the audio received has finished playing."""
        return self.sent if self.first is None else self.first + self.samples / SAMPLE_RATE

    def to_dict(self) -> dict:
        return {
            "conv": self.conv,
            "n": self.n,
            "outcome": self.outcome,
            "error": self.error,
            "ttfa_s": None if self.first is None else self.first - self.sent,
            "ttla_s": None if self.last is None else self.last - self.sent,
            "audio_s": self.samples / SAMPLE_RATE,
            "chunks": self.chunks,
            "late_chunks": self.late,
            "worst_late_s": self.worst_late,
            **self.record,
        }


def samples_of(message: dict, pcm16: bool) -> int:
    return len(message["pcm"]) // 2 if pcm16 else len(message["pcm"])


async def sleep_until(t: float) -> None:
    await asyncio.sleep(max(0.0, t - time.monotonic()))


async def open_stream(url: str):
    """A connected stream past its `Ready` (an `Error` instead, e.g. busy, raises)."""
    ws = await connect(url, compression=None, open_timeout=CONNECT_TIMEOUT_S, max_size=None)
    first = msgpack.unpackb(await ws.recv())
    if first.get("type") != "Ready":
        await ws.close()
        raise RuntimeError(f"expected Ready, got {first}")
    return ws


async def read_utterance(ws, u: Utterance, pcm16: bool, *, until: str, cancel_at_samples: int | None = None) -> None:
    """Read `u`'s messages until `until` ("Done", or "close" for Kyutai's Eos); Cancel part-way if asked."""
    async with asyncio.timeout(UTTERANCE_TIMEOUT_S):
        while True:
            try:
                m = msgpack.unpackb(await ws.recv())
            except ConnectionClosed as e:
                if until == "close" and e.rcvd is not None and e.rcvd.code == 1000:
                    u.outcome = "done"
                else:
                    u.outcome, u.error = "error", f"closed: {e}"
                return
            t = time.monotonic()
            kind = m.get("type")
            if kind == "Audio":
                u.audio(t, samples_of(m, pcm16))
                if cancel_at_samples is not None and u.cancel_sent is None and u.samples >= cancel_at_samples:
                    await ws.send(msgpack.packb({"type": "Cancel", "id": u.n}))
                    u.cancel_sent = time.monotonic()
            elif kind == "Cancelled":
                u.outcome = "cancelled"
                u.record["cancel_rtt_s"] = t - u.cancel_sent
                return
            elif kind == "Done" and until == "Done" and u.cancel_sent is None:
                u.outcome = "done"
                return
            elif kind == "Error":
                u.outcome, u.error = "error", str(m.get("message"))
                return


async def burst_stream(job: dict, s: dict, t0: float, emit) -> None:
    await sleep_until(t0 + s["offset_s"])
    arrived = time.monotonic()
    url = f"{job['url']}?format={job['format']}"
    pcm16 = job["format"] == "Pcm16MessagePack"
    u = Utterance(s["conv"], 0, arrived)
    ws = None
    try:
        ws = await open_stream(url)
        u.record["connect_s"] = time.monotonic() - arrived
        u.sent = time.monotonic()
        text = s["texts"][0]
        if job["protocol"] == "kyutai":
            for word in text.split():
                await ws.send(msgpack.packb({"type": "Text", "text": word}))
            await ws.send(msgpack.packb({"type": "Eos"}))
            await read_utterance(ws, u, pcm16, until="close")
        else:
            await ws.send(msgpack.packb({"type": "Speak", "text": text, "id": 0}))
            await read_utterance(ws, u, pcm16, until="Done")
    except Exception as e:  # noqa: BLE001 - every failure is a record, not a crash of the other streams
        u.outcome, u.error = "error", f"{type(e).__name__}: {e}"
    finally:
        if ws is not None:
            await ws.close()
    emit(u.to_dict())


async def churn_conversation(job: dict, s: dict, ws, t0: float, emit) -> None:
    rng = random.Random(s["seed"])
    pcm16 = job["format"] == "Pcm16MessagePack"
    end = t0 + job["duration_s"]
    lo, hi = job["pause_s"]
    await sleep_until(t0 + s["offset_s"])
    n = 0
    try:
        while time.monotonic() < end:
            text = s["texts"][n % len(s["texts"])]
            cancel_at = None
            if rng.random() < job["cancel_fraction"]:  # part-way: after 1 message up to half the utterance
                cancel_at = rng.randint(1, max(1, job["expected_samples"] // 2))
            u = Utterance(s["conv"], n, time.monotonic())
            await ws.send(msgpack.packb({"type": "Speak", "text": text, "id": n}))
            await read_utterance(ws, u, pcm16, until="Done", cancel_at_samples=cancel_at)
            emit(u.to_dict())
            if u.outcome == "error":
                return
            if u.outcome == "done":
                await sleep_until(u.played_at())
            pause = rng.uniform(lo, hi)
            if time.monotonic() + pause >= end:
                break
            await asyncio.sleep(pause)
            n += 1
    except Exception as e:  # noqa: BLE001
        emit({"conv": s["conv"], "n": n, "outcome": "error", "error": f"{type(e).__name__}: {e}"})
    finally:
        await ws.close()


async def main() -> None:
    job = json.loads(sys.stdin.readline())
    out = sys.stdout

    def emit(record: dict) -> None:
        out.write(json.dumps(record) + "\n")

    sockets = []
    if job["mode"] == "churn":  # conversations are open before the clock starts
        url = f"{job['url']}?format={job['format']}"
        sem = asyncio.Semaphore(32)

        async def opened(_):
            async with sem:
                return await open_stream(url)

        sockets = await asyncio.gather(*(opened(s) for s in job["streams"]))
    out.write(json.dumps({"ready": len(job["streams"])}) + "\n")
    out.flush()
    line = await asyncio.to_thread(sys.stdin.readline)
    t0 = float(line.split()[1])
    if job["mode"] == "burst":
        tasks = [burst_stream(job, s, t0, emit) for s in job["streams"]]
    else:
        tasks = [churn_conversation(job, s, ws, t0, emit) for s, ws in zip(job["streams"], sockets, strict=True)]
    await asyncio.gather(*tasks)
    out.write(json.dumps({"end": True}) + "\n")
    out.flush()


if __name__ == "__main__":
    asyncio.run(main())
