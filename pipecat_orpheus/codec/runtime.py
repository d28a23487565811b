"""SNAC on the GPU: every ready window of every request decoded in one call per window shape.

Each request's frames become `Window`s in its `stream.CodecStream`. `SnacCodec.launch` runs all
ready windows in one `snac.SnacDecoder` call per window shape and returns exactly the samples to
emit. On a GPU every window shape of a stream longer than its context (its first frames, frames
sent early for their playback deadline, the steady state, its tail) runs as CUDA graphs, one per
batch bucket, and the one-frame windows with the full left context are torch.compiled. `launch`
queues on the caller's CUDA stream and returns at once: the engine launches each step's windows
on its own stream just before the next decode step, and reads the PCM back while it runs.
"""

from __future__ import annotations

import contextlib
import functools
import secrets

import numpy as np
import torch
from loguru import logger
from torch import nn

from pipecat_orpheus.codec.snac import SnacDecoder, WindowShape
from pipecat_orpheus.codec.stream import FRAME_S, CodecStream, Window, graphed_shapes
from pipecat_orpheus.config import CodecConfig
from pipecat_orpheus.format import FRAME_TOKENS, SAMPLES_PER_FRAME
from pipecat_orpheus.graphs import capture, window_buckets
from pipecat_orpheus.noise import noise_key

_EDGE_MAX_BATCH = 16  # largest graphed batch of first-frame and tail windows: few streams start or end per step


class DecodedAudio:
    """The PCM of one `SnacCodec.launch`, one float32 array per window, once the GPU has got there."""

    def __init__(self, chunks: list[torch.Tensor], done: torch.cuda.Event | None):
        self._chunks = chunks  # host tensors, filled by copies queued behind the decode
        self._done = done
        self._pcm: list[np.ndarray] | None = None

    def wait(self) -> list[np.ndarray]:
        """Block until the decode is done (releasing the GIL) and return the PCM, one array per window."""
        if self._pcm is None:
            if self._done is not None:
                self._done.synchronize()
            self._pcm = [c.numpy().copy() for c in self._chunks]  # the host buffer is reused by the next launch
        return self._pcm


class SnacCodec:
    """A SNAC 24 kHz decoder prepared for streaming: seeded noise, cropped, batched.

    Args:
        snac_model: a loaded `snac.SNAC` (left untouched: the codec keeps its own copy).
        config: the `codec` section (context, lookahead, batch size, dtype, compile).
        device: where to decode (a CUDA device gets its own stream).
    """

    def __init__(self, snac_model: nn.Module, config: CodecConfig, device: str | torch.device):
        self.config = config
        self.device = torch.device(device)
        gpu = self.device.type == "cuda"
        dtype = getattr(torch, config.dtype) if gpu else torch.float32  # half precision pays off on GPU only
        self.snac = SnacDecoder(snac_model, self.device, dtype)
        self._stream = torch.cuda.Stream(self.device) if gpu else None
        # Nearly every window is one frame with the full left context and some lookahead (the steady
        # state, or a frame sent early for its deadline): with `compile` (GPU only) those shapes are
        # torch.compiled, one compile each. On GPU every shape of `graphed_shapes` runs as CUDA
        # graphs (one launch, no Python per kernel); other shapes (streams of one or two frames)
        # run eagerly.
        left, ahead = config.left_context_frames, config.lookahead_frames
        self._full_left = {(left + 1 + a, left, 1) for a in range(ahead + 1)}
        self._compiled = {s: self._compile(s) for s in self._full_left} if config.compile and gpu else {}
        self._graphs: dict[WindowShape, dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]]] = {}
        self._graph_inputs: dict[WindowShape, torch.Tensor] = {}  # shape -> (N, frames * 7 + 2) int64
        # host staging, reused by every launch (pinned on GPU: copies are asynchronous)
        rows = 2 * config.max_batch
        width = (left + 1 + ahead) * FRAME_TOKENS + 2  # the widest window of a live stream
        self._in_host = torch.zeros(rows * width, dtype=torch.int64, pin_memory=gpu)
        self._out_host = torch.zeros(rows * SAMPLES_PER_FRAME, dtype=torch.float32, pin_memory=gpu)
        self._in_used = self._out_used = 0
        self._inflight: DecodedAudio | None = None
        self._done = torch.cuda.Event() if gpu else None  # recorded after each launch (one is in flight at most)

    @property
    def dtype(self) -> torch.dtype:
        """The decoder's dtype (float32 on CPU)."""
        return self.snac.dtype

    def open_stream(self, seed: int | None = None) -> CodecStream:
        """A stream for one request; `seed` fixes its noise (None: a random one)."""
        seed = secrets.randbits(63) if seed is None else seed
        return CodecStream(noise_key(seed), self.config.left_context_frames, self.config.lookahead_frames)

    def decode(self, windows: list[Window]) -> list[np.ndarray]:
        """Decode `windows` (any requests, any shapes) on the codec's own stream: float32 PCM per window."""
        with torch.cuda.stream(self._stream) if self._stream else contextlib.nullcontext():
            return self.launch(windows).wait()

    def launch(self, windows: list[Window]) -> DecodedAudio:
        """Queue the decode of `windows` on the current CUDA stream and return without waiting.

        Equal shapes decode together, at most a graph's largest batch per call. On CPU the decode
        runs now. The host buffers are reused, so the previous launch is waited for first.
        """
        if self._inflight is not None:
            self._inflight.wait()
        self._in_used = self._out_used = 0
        chunks: list[torch.Tensor | None] = [None] * len(windows)
        groups: dict[WindowShape, list[int]] = {}
        for i, w in enumerate(windows):
            groups.setdefault(w.shape_key, []).append(i)
        with torch.inference_mode():
            for key, idx in groups.items():
                graphs = self._graphs.get(key)
                cap = max(graphs) if graphs else self.config.max_batch
                for lo in range(0, len(idx), cap):
                    part = idx[lo : lo + cap]
                    pcm = self._to_host(self._run([windows[i] for i in part], key))  # (b, emit * 2048)
                    for j, i in enumerate(part):
                        chunks[i] = pcm[j]
        if self._done is not None:
            self._done.record()
        self._inflight = DecodedAudio(chunks, self._done)  # type: ignore[arg-type]
        return self._inflight

    def warm_up(self) -> None:
        """Decode streams of every short length, offline and live with every lookahead: every window shape.

        Call it from the thread that will decode: a thread's first eager decode builds its cuDNN
        state, and compiled code its guards, which costs seconds (measured 1.4 s for a new thread's
        first fp16 decode); graphed shapes just replay.
        """
        cfg = self.config
        silence = np.zeros(FRAME_TOKENS, dtype=np.int64)
        for frames in range(1, cfg.left_context_frames + cfg.lookahead_frames + 3):
            for live in (False, True):  # live: frames come twice as fast as they play, the lookahead grows
                stream = self.open_stream(frames)
                pushes = [
                    stream.push(silence, now=k * FRAME_S / 2) if live else stream.push(silence) for k in range(frames)
                ]
                self.decode([w for ws in pushes for w in ws] + stream.finish())

    def decode_frames(self, frames: np.ndarray, seed: int) -> np.ndarray:
        """Offline decode of a whole utterance (n, 7) in one window: the streaming reference."""
        stream = self.open_stream(seed)
        codes = np.asarray(frames, dtype=np.int64).reshape(-1, FRAME_TOKENS)  # (n, 7)
        if len(codes) == 0:
            return np.zeros(0, dtype=np.float32)
        return self.decode([Window(stream, codes, 0, 0, len(codes))])[0]

    def capture_graphs(self) -> None:
        """Capture every shape of `graphed_shapes` as CUDA graphs, one per batch bucket (GPU only).

        Call once at start, before other threads use the GPU; without it (and on CPU) every
        window runs eagerly, with the same results. Windows of one frame with the full left
        context are torch.compiled (one compile per shape, ~12 s each on an H100); the others (first frames,
        tails) are graphs of the eager decode.
        """
        if self._stream is None or not self.config.cuda_graphs or self._graphs:
            return
        cfg = self.config
        shapes = graphed_shapes(cfg.left_context_frames, cfg.lookahead_frames)
        keys = [(shape, b) for shape in shapes for b in self._graph_buckets(shape)[::-1]]  # largest first

        def setup(key: tuple[WindowShape, int]) -> None:
            shape, bucket = key
            if shape not in self._graph_inputs:  # the largest bucket comes first: its rows serve the others
                width = shape[0] * FRAME_TOKENS + 2
                self._graph_inputs[shape] = torch.zeros((bucket, width), dtype=torch.int64, device=self.device)

        def body(key: tuple[WindowShape, int]) -> torch.Tensor:
            shape, bucket = key
            return self._decode_fn(shape)(self._graph_inputs[shape][:bucket])  # (bucket, emit * 2048) float32

        with torch.inference_mode(), torch.cuda.stream(self._stream):
            graphs = capture(
                keys, body, device=self.device, desc="SNAC CUDA graphs", setup=setup, stream=self._stream, warm_ups=2
            )
        for (shape, bucket), entry in graphs.items():
            self._graphs.setdefault(shape, {})[bucket] = entry
        logger.info(f"{self}: captured {len(keys)} CUDA graphs of {len(shapes)} window shapes")

    def _graph_buckets(self, shape: WindowShape) -> list[int]:
        """Graphed batches of `shape`: many for full left context, few for first frames and tails.

        Every stream has a window with the full left context per frame; few start or end at once.
        Compiled shapes start at 2: their code serves every batch but 1 (one window replays 2's graph).
        """
        full = shape in self._full_left
        buckets = window_buckets(self.config.max_batch if full else min(self.config.max_batch, _EDGE_MAX_BATCH))
        return [b for b in buckets if b > 1 or shape not in self._compiled] or buckets

    def _run(self, windows: list[Window], shape: WindowShape) -> torch.Tensor:
        """Decode equal-shape windows on the current stream: (B, emit * 2048) float32 on the device."""
        b, width = len(windows), shape[0] * FRAME_TOKENS + 2
        packed = self._stage(windows, width)  # (B, frames * 7 + 2) on the host
        graphs = self._graphs.get(shape)
        if graphs:
            bucket = min(size for size in graphs if size >= b)
            graph, out = graphs[bucket]
            self._graph_inputs[shape][:b].copy_(packed, non_blocking=True)  # rows past b: stale, ignored
            graph.replay()
            return out[:b]
        return self._decode_fn(shape)(packed.to(self.device, non_blocking=True))  # not reused before the wait

    def _stage(self, windows: list[Window], width: int) -> torch.Tensor:
        """Pack each window's codes, noise key and start frame into one int64 row of the host buffer."""
        b, need = len(windows), len(windows) * width
        if need > self._in_host.numel():  # wider than the buffer: a long offline window, or a huge batch
            packed = torch.empty((b, width), dtype=torch.int64, pin_memory=self._stream is not None)
        else:
            if self._in_used + need > self._in_host.numel():  # more windows than one step ever has
                if self._stream is not None:
                    torch.cuda.current_stream(self.device).synchronize()  # the copies queued from it are done
                self._in_used = 0
            packed = self._in_host[self._in_used : self._in_used + need].view(b, width)  # (B, frames * 7 + 2)
            self._in_used += need
        rows = packed.numpy()
        rows[:, :-2] = np.stack([w.codes for w in windows]).reshape(b, -1)
        rows[:, -2] = [w.stream.key for w in windows]
        rows[:, -1] = [w.start for w in windows]
        return packed

    def _to_host(self, pcm: torch.Tensor) -> torch.Tensor:
        """A host copy of `pcm` (B, T) float32, queued behind the decode (a view of the reused buffer if it fits)."""
        if pcm.device.type == "cpu":
            return pcm
        n = pcm.numel()
        if self._out_used + n <= self._out_host.numel():
            host = self._out_host[self._out_used : self._out_used + n].view(pcm.shape)  # (B, T)
            self._out_used += n
        else:
            host = torch.empty(pcm.shape, dtype=torch.float32, pin_memory=True)  # (B, T): a rare oversized batch
        return host.copy_(pcm, non_blocking=True)

    def _decode_fn(self, shape: WindowShape):
        """The decode of packed windows of `shape`: the compiled one if there is one, else the eager one."""
        return self._compiled.get(shape) or functools.partial(self.snac.decode_packed, shape=shape)

    def _compile(self, shape: WindowShape):
        """`SnacDecoder.decode_packed` of `shape` torch.compiled for any batch size above 1 (no recompile per bucket).

        Only the batch is symbolic: the window's sizes stay constants (automatic dynamic shapes
        would turn them symbolic once a second shape compiles, which inductor cannot lower).
        """

        def decode(packed: torch.Tensor) -> torch.Tensor:
            return self.snac.decode_packed(packed, shape=shape)

        compiled = torch.compile(decode)

        def run(packed: torch.Tensor) -> torch.Tensor:
            if packed.shape[0] > 1:
                torch._dynamo.mark_dynamic(packed, 0)  # one compile serves every batch size above 1
            with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
                return compiled(packed)

        return run

    def __repr__(self) -> str:
        graphs = sum(len(g) for g in self._graphs.values())
        return f"SnacCodec({str(self.dtype).removeprefix('torch.')}, {self.device}, {graphs} graphs)"
