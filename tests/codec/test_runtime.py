"""Streaming SNAC codec on the tiny real-format SNAC: streamed audio equals the offline decode."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from pipecat_orpheus.codec import SnacCodec, hashed_normal
from pipecat_orpheus.codec.stream import FRAME_S, CodecStream, Window, graphed_shapes
from pipecat_orpheus.config import CodecConfig
from pipecat_orpheus.format import CODEBOOK_SIZE, SAMPLES_PER_FRAME, frames_to_snac_codes
from pipecat_orpheus.graphs import window_buckets
from pipecat_orpheus.loader import load_snac
from pipecat_orpheus.pcm import snr_db

LENGTHS = [1, 2, 3, 4, 5, 6, 9, 200]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


def test_a_window_wider_than_the_staging_buffer_decodes(snac, codec):
    """An offline window longer than any live one (here 40 frames, with room for two live rows) decodes as usual."""
    small = SnacCodec(snac, CodecConfig(max_batch=1), "cpu")
    frames = np.random.default_rng(2).integers(0, CODEBOOK_SIZE, (40, 7))
    np.testing.assert_array_equal(small.decode_frames(frames, 5), codec.decode_frames(frames, 5))


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


def test_launch_decodes_mixed_shapes_and_requests_in_order(codec):
    """One launch of windows of several shapes and requests gives each window the PCM its own decode gives."""
    rng = np.random.default_rng(6)
    streams = [codec.open_stream(100 + i) for i in range(6)]
    windows = []
    for i, stream in enumerate(streams):
        for k, frame in enumerate(rng.integers(0, CODEBOOK_SIZE, (i + 1, 7))):
            windows += stream.push(frame, now=k * FRAME_S / 2, wait_s=0.01) if i % 2 else stream.push(frame)
        windows += stream.finish()
    assert len({w.shape_key for w in windows}) >= 4
    order = rng.permutation(len(windows))
    launched = codec.launch([windows[i] for i in order]).wait()
    for pcm, i in zip(launched, order, strict=True):
        np.testing.assert_allclose(pcm, codec.decode([windows[i]])[0], atol=1e-5)
        assert len(pcm) == windows[i].emit * SAMPLES_PER_FRAME


def test_a_new_launch_waits_for_the_last_and_keeps_its_pcm(codec):
    """Host buffers are reused: the PCM of a launch not yet waited for is kept when the next one starts."""
    stream_a, stream_b = codec.open_stream(1), codec.open_stream(2)
    frames = np.random.default_rng(8).integers(0, CODEBOOK_SIZE, (4, 7))
    windows_a = [w for f in frames for w in stream_a.push(f)] + stream_a.finish()
    windows_b = [w for f in frames[::-1] for w in stream_b.push(f)] + stream_b.finish()
    first = codec.launch(windows_a)
    second = codec.launch(windows_b)
    expected = [codec.decode([w])[0] for w in windows_a]
    for got, want in zip(first.wait(), expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert sum(len(p) for p in second.wait()) == len(frames) * SAMPLES_PER_FRAME


def live_stream(left: int, lookahead: int, frames: int, frame_s: float, wait_s: list[float]):
    """Push `frames` silent frames arriving every `frame_s` seconds, the k-th with `wait_s[k]`: (stream, pushes)."""
    stream = CodecStream(0, left, lookahead)
    pushes = [stream.push(np.zeros(7, dtype=np.int64), now=k * frame_s, wait_s=wait_s[k]) for k in range(frames)]
    return stream, pushes


@pytest.mark.parametrize(("left", "lookahead"), [(2, 2), (0, 0), (1, 3), (3, 1)])
def test_graphed_shapes_cover_every_window_of_long_enough_streams(left, lookahead):
    """Every window of a stream of more than `left + lookahead` frames, offline or live at any pace, is graphed."""
    shapes = set(graphed_shapes(left, lookahead))
    if (left, lookahead) == (2, 2):  # one frame with 0-2 frames of context each side, and the two tails
        assert len(shapes) == 10 and (5, 2, 1) in shapes and (4, 2, 2) in shapes  # (3, 2, 1) is also a tail
    seen = set()
    for frames in range(left + lookahead + 1, left + lookahead + 9):
        stream = CodecStream(0, left, lookahead)
        pushes = [stream.push(np.zeros(7, dtype=np.int64)) for _ in range(frames)]  # offline
        seen |= {w.shape_key for w in [*(w for ws in pushes for w in ws), *stream.finish()]}
        for pace in (0.2, 0.4, 0.6, 0.9):  # live: frames arrive at this fraction of their playing time
            for slow in range(lookahead + 2):  # slow first steps: frame 0 waits for 0..lookahead more frames
                waits = [(slow + 0.2) * FRAME_S] * (lookahead + 1) + [0.3 * FRAME_S] * frames
                stream, pushes = live_stream(left, lookahead, frames, pace * FRAME_S, waits)
                seen |= {w.shape_key for w in [*(w for ws in pushes for w in ws), *stream.finish()]}
    assert seen == shapes


def test_buckets_fit_every_batch_with_little_padding():
    """Graph batch buckets cover 1..max_batch, each batch padded by at most half of itself."""
    for max_batch in (1, 5, 16, 256, 300):
        buckets = window_buckets(max_batch)
        assert buckets[0] == 1 and buckets[-1] == max_batch
        for b in range(1, max_batch + 1):
            assert min(x for x in buckets if x >= b) <= max(1.5 * b, 2)


def test_warm_up_and_gpu_only_options(snac):
    """Warm-up decodes every short stream shape; half precision, compile and graphs are GPU only."""
    cpu = SnacCodec(snac, CodecConfig(dtype="float16", compile=True, cuda_graphs=True), "cpu")
    cpu.capture_graphs()
    assert cpu.dtype == torch.float32 and not cpu._compiled and not cpu._graphs
    cpu.warm_up()
    stream = cpu.open_stream(9)
    pcm = cpu.decode(stream.push(np.full(7, 4095)) + stream.finish())
    assert len(np.concatenate(pcm)) == SAMPLES_PER_FRAME


def test_live_frames_wait_for_lookahead_only_until_their_deadline(snac):
    """Live, frame 0 goes out once the frames here outlast the wait for the next, later ones as late as their
    deadlines allow, until one has its full lookahead."""
    codec = SnacCodec(snac, CodecConfig(left_context_frames=2, lookahead_frames=2), "cpu")
    frames = np.random.default_rng(3).integers(0, 4096, (12, 7))
    fast, slow = 0.25 * FRAME_S, 0.8 * FRAME_S  # frames arrive 4x / 1.25x faster than they play
    for frame_s, wait_s, ready_after in (
        (None, 0.0, [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]),  # offline: each frame waits for 2 later ones
        (fast, 0.1 * FRAME_S, [1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1]),  # frame 0 at once, then full lookahead
        (slow, 0.9 * FRAME_S, [1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0, 1]),  # just before each deadline; some gain lookahead
        (fast, 1.1 * FRAME_S, [0, 2, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1]),  # slow steps: frame 0 waits for one more
        (fast, 2.1 * FRAME_S, [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]),  # slower: for two, the full lookahead here
    ):
        stream = codec.open_stream(5)
        live = {} if frame_s is None else {"wait_s": wait_s}
        windows = [stream.push(f, now=None if frame_s is None else k * frame_s, **live) for k, f in enumerate(frames)]
        assert [len(w) for w in windows] == ready_after
        emitted_at = [k for k, ws in enumerate(windows) for _ in ws]
        for j, k in enumerate(emitted_at[1:], start=1):  # frame j went out at push k: before its deadline, if live
            assert (
                frame_s is None
                or wait_s > FRAME_S
                or k * frame_s + wait_s < emitted_at[0] * frame_s + (j + 1) * FRAME_S
            )
        pcm = np.concatenate(codec.decode([w for ws in windows for w in ws] + stream.finish()))
        assert len(pcm) == len(frames) * SAMPLES_PER_FRAME
    # caught up while frames came fast, a stream keeps the full lookahead when they slow down to real time
    stream = codec.open_stream(6)
    times = np.concatenate([np.arange(6) * fast, 6 * fast + np.arange(1, 7) * FRAME_S])
    windows = [w for f, t in zip(frames, times, strict=True) for w in stream.push(f, now=t, wait_s=0.9 * FRAME_S)]
    assert [w.shape_key for w in windows[2:]] == [(5, 2, 1)] * (len(windows) - 2)  # full context both sides
