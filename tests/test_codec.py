"""Streaming SNAC codec on the tiny real-format SNAC: streamed audio equals the offline decode."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch

from pipecat_orpheus.codec import SnacCodec, Window, hashed_normal
from pipecat_orpheus.codec_worker import CodecWorker
from pipecat_orpheus.config import CodecConfig
from pipecat_orpheus.errors import RequestCancelled
from pipecat_orpheus.format import CODEBOOK_SIZE, SAMPLES_PER_FRAME, frames_to_snac_codes
from pipecat_orpheus.loader import load_snac

LENGTHS = [1, 2, 3, 4, 5, 6, 9, 200]


def snr_db(test: np.ndarray, ref: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref**2) / max(np.sum((test - ref) ** 2), 1e-30)))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny decoder's kernels are too small to split: one thread is faster, and much faster under load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def snac(tiny_model_dir):
    return load_snac(str(tiny_model_dir / "snac"), device="cpu")


@pytest.fixture(scope="module")
def codec(snac):
    return SnacCodec(snac, CodecConfig(), "cpu")


def stream_all(codec: SnacCodec, sequences: list[np.ndarray], seeds: list[int]) -> list[list[np.ndarray]]:
    """Push every sequence frame by frame in lockstep, decoding all ready windows in one batch per step."""
    streams = [codec.open_stream(s) for s in seeds]
    chunks: list[list[np.ndarray]] = [[] for _ in sequences]
    for t in range(max(len(s) for s in sequences) + 1):
        ready: list[tuple[int, Window]] = []
        for i, (stream, seq) in enumerate(zip(streams, sequences, strict=False)):
            windows = stream.push(seq[t]) if t < len(seq) else stream.finish()
            ready += [(i, w) for w in windows]
        for (i, _), pcm in zip(ready, codec.decode([w for _, w in ready]), strict=False):
            chunks[i].append(pcm)
    return chunks


def test_streamed_matches_offline_for_many_lengths(codec):
    """Streamed audio of 1..200 frames has n * 2048 samples and is within 40 dB of the offline decode."""
    rng = np.random.default_rng(1)
    sequences = [rng.integers(0, CODEBOOK_SIZE, (n, 7)) for n in LENGTHS]
    seeds = list(range(len(LENGTHS)))
    for seq, seed, chunks in zip(sequences, seeds, stream_all(codec, sequences, seeds), strict=False):
        streamed = np.concatenate(chunks)
        offline = codec.decode_frames(seq, seed)
        assert streamed.dtype == np.float32 and streamed.shape == offline.shape == (len(seq) * SAMPLES_PER_FRAME,)
        assert snr_db(streamed, offline) >= 40, len(seq)


def test_every_frame_emitted_once_in_order(codec):
    """Windows emit frames 0..n-1 exactly once, the first after lookahead + 1 frames, the rest at finish()."""
    lookahead = codec.config.lookahead_frames
    stream = codec.open_stream(0)
    emitted = []
    for t, frame in enumerate(np.zeros((12, 7), dtype=np.int64)):
        windows = stream.push(frame)
        assert len(windows) == (1 if t >= lookahead else 0)
        emitted += [range(w.start + w.left, w.start + w.left + w.emit) for w in windows]
        assert all(w.left <= codec.config.left_context_frames for w in windows)
    tail = stream.finish()
    assert len(tail) == 1 and tail[0].emit == lookahead and stream.finish() == []
    emitted += [range(w.start + w.left, w.start + w.left + w.emit) for w in tail]
    assert [f for r in emitted for f in r] == list(range(12))
    with pytest.raises(RuntimeError):
        stream.push(np.zeros(7, dtype=np.int64))


def test_chunk_boundaries_are_continuous(codec):
    """At every chunk edge the streamed samples match the offline ones, so there is no click."""
    seq = np.random.default_rng(2).integers(0, CODEBOOK_SIZE, (40, 7))
    streamed = np.concatenate(stream_all(codec, [seq], [7])[0])
    offline = codec.decode_frames(seq, 7)
    edges = np.arange(1, len(seq)) * SAMPLES_PER_FRAME
    around = np.concatenate([edges - 2, edges - 1, edges, edges + 1])
    assert np.max(np.abs(streamed[around] - offline[around])) < 1e-2 * np.max(np.abs(offline))


def test_extreme_codes_are_kept(codec):
    """Codes 0 and 4095 decode like any other code; codes outside [0, 4096) or a bad shape are rejected."""
    seq = np.array([[0] * 7, [4095] * 7, [0, 4095, 0, 4095, 0, 4095, 0], [0] * 7])
    streamed = np.concatenate(stream_all(codec, [seq], [3])[0])
    assert streamed.shape == (4 * SAMPLES_PER_FRAME,) and np.all(np.isfinite(streamed))
    assert snr_db(streamed, codec.decode_frames(seq, 3)) >= 40
    stream = codec.open_stream(0)
    for bad in ([0] * 6 + [4096], [-1] + [0] * 6, [0] * 6):
        with pytest.raises(ValueError):
            stream.push(np.array(bad))


def test_noise_is_seeded_and_batch_invariant(codec):
    """Equal seeds give equal audio, different seeds differ, and a window decodes the same alone or batched."""
    seq = np.random.default_rng(4).integers(0, CODEBOOK_SIZE, (8, 7))
    a, b, c = (codec.decode_frames(seq, s) for s in (11, 11, 12))
    assert np.array_equal(a, b) and not np.allclose(a, c)
    streams = [codec.open_stream(s) for s in (1, 2, 3)]
    ready = []
    for frame in seq[:4]:
        ready = [w for st in streams for w in st.push(frame)]
    together = codec.decode(ready)
    alone = [codec.decode([w])[0] for w in ready]
    for x, y in zip(together, alone, strict=False):
        np.testing.assert_allclose(x, y, atol=1e-5)
    keys = torch.tensor([[5]])
    pos = torch.arange(100_000)[None]
    noise = hashed_normal(keys, pos)
    assert abs(float(noise.mean())) < 0.02 and abs(float(noise.std()) - 1) < 0.02


def test_decoder_equals_snac_when_noise_is_off(snac):
    """The codec's functional, cropped decoder computes exactly SNAC's own decode when noise is zero."""
    quiet = copy.deepcopy(snac)
    for module in quiet.modules():
        if type(module).__name__ == "NoiseBlock":
            module.linear.parametrizations.weight.original0.data.zero_()
    seq = np.random.default_rng(5).integers(0, CODEBOOK_SIZE, (9, 7))
    ours = SnacCodec(quiet, CodecConfig(), "cpu").decode_frames(seq, 0)
    with torch.inference_mode():
        ref = quiet.decode([torch.from_numpy(c)[None] for c in frames_to_snac_codes(seq)])[0, 0].numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    streamed = np.concatenate(stream_all(SnacCodec(quiet, CodecConfig(), "cpu"), [seq], [0])[0])
    assert snr_db(streamed, ref) >= 40


class Sink:
    """Collects one request's chunks; optionally blocks in put() until released."""

    def __init__(self, gate: threading.Event | None = None):
        self.chunks: list[np.ndarray] = []
        self.finished: list[BaseException | None] = []
        self.gate = gate
        self.entered = threading.Event()

    def put(self, pcm: np.ndarray) -> None:
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        self.chunks.append(pcm)

    def finish(self, error: BaseException | None = None) -> None:
        self.finished.append(error)


def test_worker_keeps_order_across_concurrent_requests(codec):
    """Eight producer threads feeding one worker each get their whole utterance, in order, finished once."""
    rng = np.random.default_rng(6)
    sequences = [rng.integers(0, CODEBOOK_SIZE, (n, 7)) for n in (1, 3, 5, 8, 13, 21, 30, 2)]
    sinks = [Sink() for _ in sequences]

    def produce(i: int, worker: CodecWorker) -> None:
        stream = codec.open_stream(100 + i)
        for frame in sequences[i]:
            worker.submit(stream, stream.push(frame), sinks[i])
        worker.submit(stream, stream.finish(), sinks[i], final=True)

    with CodecWorker(codec) as worker:
        threads = [threading.Thread(target=produce, args=(i, worker)) for i in range(len(sequences))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert worker.wait_idle(60)
        lookahead = codec.config.lookahead_frames
        assert worker.windows == sum(max(0, len(s) - lookahead) + (min(len(s), lookahead) > 0) for s in sequences)
    for i, (seq, sink) in enumerate(zip(sequences, sinks, strict=False)):
        assert sink.finished == [None]
        streamed = np.concatenate(sink.chunks)
        assert snr_db(streamed, codec.decode_frames(seq, 100 + i)) >= 40


def test_worker_drops_cancelled_requests(codec):
    """Windows of a request cancelled while queued are never decoded or delivered, and others go on."""
    gate = threading.Event()
    blocker, victim, other = Sink(gate), Sink(), Sink()
    seq = np.random.default_rng(7).integers(0, CODEBOOK_SIZE, (6, 7))
    with CodecWorker(codec) as worker:
        s1, s2, s3 = (codec.open_stream(i) for i in range(3))
        worker.submit(s1, s1.push(seq[0]) + [w for f in seq[1:] for w in s1.push(f)], blocker)
        assert blocker.entered.wait(30)  # the worker is now stuck delivering s1's batch
        for frame in seq:
            worker.submit(s2, s2.push(frame), victim)
            worker.submit(s3, s3.push(frame), other)
        worker.submit(s2, s2.finish(), victim, final=True)
        worker.submit(s3, s3.finish(), other, final=True)
        s2.cancel()
        gate.set()
        assert worker.wait_idle(60)
    assert victim.chunks == [] and victim.finished == []
    assert other.finished == [None] and len(np.concatenate(other.chunks)) == len(seq) * SAMPLES_PER_FRAME


def test_worker_reports_decode_errors_and_close_cancels(codec):
    """A failing batch ends its requests with the error; closing ends queued requests with RequestCancelled."""
    sink = Sink()
    stream = codec.open_stream(0)
    broken = Window(stream, np.zeros((3, 6), dtype=np.int64), 0, 0, 3)  # 6 codes a frame: cannot decode
    with CodecWorker(codec) as worker:
        worker.submit(stream, [broken], sink, final=True)
        assert worker.wait_idle(30)
    assert len(sink.finished) == 1 and sink.finished[0] is not None

    blocker, queued = Sink(threading.Event()), Sink()
    worker = CodecWorker(codec)
    s1, s2 = codec.open_stream(1), codec.open_stream(2)
    frames = np.zeros((3, 7), dtype=np.int64)
    worker.submit(s1, [w for f in frames for w in s1.push(f)], blocker)
    assert blocker.entered.wait(30)
    worker.submit(s2, [w for f in frames for w in s2.push(f)], queued, final=True)
    closer = threading.Thread(target=worker.close)
    closer.start()
    while not worker.closed:  # close() has taken the queue before the worker is let go
        closer.join(0.01)
    blocker.gate.set()
    closer.join(30)
    assert not closer.is_alive()
    assert len(queued.finished) == 1 and isinstance(queued.finished[0], RequestCancelled)


def test_warmup_and_gpu_only_options(snac):
    """A worker can warm every window shape up before serving; half precision, compile and graphs are GPU only."""
    cpu = SnacCodec(snac, CodecConfig(dtype="float16", compile=True, cuda_graphs=True), "cpu")
    cpu.capture_graphs()
    assert cpu.dtype == torch.float32 and cpu._steady_fn == cpu._decode_steady and not cpu._graphs
    sink = Sink()
    with CodecWorker(cpu, warmup=True) as worker:
        assert worker.wait_idle(60) and worker.windows == 0
        stream = cpu.open_stream(9)
        worker.submit(stream, stream.push(np.full(7, 4095)), sink)
        worker.submit(stream, stream.finish(), sink, final=True)
        assert worker.wait_idle(60)
    assert sink.finished == [None] and len(np.concatenate(sink.chunks)) == SAMPLES_PER_FRAME


def test_first_lookahead_emits_the_first_frame_early(snac):
    """A smaller first lookahead emits frame 0 sooner; every later frame keeps the full lookahead."""
    codec = SnacCodec(snac, CodecConfig(left_context_frames=2, lookahead_frames=2), "cpu")
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 4096, (8, 7))
    for first, ready_after in (
        (0, [1, 0, 0, 1, 1, 1, 1, 1]),
        (1, [0, 1, 0, 1, 1, 1, 1, 1]),
        (None, [0, 0, 1, 1, 1, 1, 1, 1]),
    ):
        stream = codec.open_stream(5, first_lookahead=first)
        windows = [stream.push(f) for f in frames]
        assert [len(w) for w in windows] == ready_after
        tail = stream.finish()
        pcm = np.concatenate(codec.decode([w for ws in windows for w in ws] + tail))
        assert len(pcm) == len(frames) * SAMPLES_PER_FRAME
