"""Streaming SNAC decoding: every frame emitted, context on both sides, batched across requests.

Each request's frames become `Window`s in its `codec_stream.CodecStream`. `SnacCodec.decode`
runs all ready windows of every request in one SNAC call per window shape and returns exactly
the samples to emit.

SNAC's `NoiseBlock` draws fresh `torch.randn` at every call, so two decodes of the same codes
differ. Here the decoder is run functionally over the loaded modules with the noise replaced
by a counter-based hash of (request key, block, absolute position): noise no longer depends
on batching or windowing, a seeded request is reproducible, and streamed audio can be compared
with an offline decode sample by sample. The decoder is also cropped after every upsampling
block to the emitted frames plus the receptive field of the layers left, which gives the same
samples for much less work at the high-rate layers.

On a GPU every window shape of a stream longer than its context (its first frames, frames
sent early for their playback deadline, the steady state, its tail) is decoded by CUDA graphs,
one per batch bucket. `launch` queues a batch of windows on the caller's CUDA stream and returns
at once; the engine launches each step's windows on its own stream just before the next decode
step, so SNAC and the LLM never compete for the GPU or the GIL, and the PCM is read back while
the next step runs.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import secrets

import numpy as np
import torch
from loguru import logger
from snac.layers import DecoderBlock, NoiseBlock, Snake1d
from torch import nn
from torch.nn.utils import parametrize
from tqdm import tqdm

from pipecat_orpheus.codec_stream import FRAME_S, CodecStream, Window, graphed_shapes
from pipecat_orpheus.config import CodecConfig
from pipecat_orpheus.errors import ModelLoadError
from pipecat_orpheus.format import FRAME_TOKENS, SAMPLES_PER_FRAME
from pipecat_orpheus.noise import hash32, noise_key, uniform24


def _buckets(max_batch: int) -> list[int]:
    """Batch sizes that get a CUDA graph: 1, 2, 3, 4, 6, 8, 12, ... (powers of two and 1.5x them), and `max_batch`."""
    sizes = {m << i for i in range(max_batch.bit_length()) for m in (2, 3)} | {1}
    return sorted({s for s in sizes if s < max_batch} | {max_batch})


_EDGE_MAX_BATCH = 16  # largest graphed batch of first-frame and tail windows: few streams start or end per step
_L1_COLS = [1, 4]  # frame positions of the two L1 codes (format.FRAME_LAYOUT)
_L2_COLS = [2, 3, 5, 6]  # frame positions of the four L2 codes


def hashed_normal(keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Standard normal noise that is a pure function of (key, position), by Box-Muller.

    keys: (B, 1) int64 in [0, 2**32); positions: (B, T) int64 >= 0. Returns (B, T) float32.
    """
    h = hash32(keys ^ hash32(positions))  # (B, T)
    u1 = uniform24(hash32(h ^ 0x68E31DA4))  # (B, T) in (0, 1)
    u2 = uniform24(hash32(h ^ 0xB5297A4D))  # (B, T) in (0, 1), independent of u1
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * math.pi * u2)


def _snake(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """SNAC's Snake activation, written in plain torch so torch.compile can fuse it."""
    return x + (alpha + 1e-9).reciprocal() * torch.sin(alpha * x).pow(2)


def _receptive_margin(layers: list[nn.Module]) -> int:
    """Samples of context (each side, in the first layer's input rate) the layers need."""
    r = 0
    for m in reversed(layers):
        if isinstance(m, nn.ConvTranspose1d):
            r = math.ceil((r + m.kernel_size[0]) / m.stride[0])
        elif isinstance(m, nn.Conv1d):
            r += m.dilation[0] * (m.kernel_size[0] - 1) // 2
    return r


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
        self.dtype = getattr(torch, config.dtype) if gpu else torch.float32  # half precision pays off on GPU only
        strides = list(getattr(snac_model, "vq_strides", []))
        hop = int(np.prod(snac_model.decoder_rates))
        if SAMPLES_PER_FRAME % hop or strides != [SAMPLES_PER_FRAME // hop // 2**i for i in range(3)]:
            raise ModelLoadError(f"SNAC model with vq_strides {strides} and hop {hop} is not the 24 kHz Orpheus codec")
        if getattr(snac_model, "attn_window_size", None) is not None:
            raise ModelLoadError("SNAC models with local attention cannot be decoded in windows")
        self.latents_per_frame = SAMPLES_PER_FRAME // hop  # 4: one L0 code per frame
        self.quantizer = self._prepare(snac_model.quantizer, torch.float32)
        self.decoder = self._prepare(snac_model.decoder, self.dtype)
        layers = list(self.decoder.model)
        blocks = [i for i, m in enumerate(layers) if isinstance(m, DecoderBlock)]
        self._layers = layers
        self._blocks = set(blocks)
        # crop margin after block i, in that block's output samples: the receptive field of what follows
        self._margins = {i: _receptive_margin(self._leaves(layers[i + 1 :])) + 1 for i in blocks}
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # column indices on the device: a Python list index would be a host-to-device copy per call
        self._l1_cols = torch.tensor(_L1_COLS, device=self.device)  # (2,)
        self._l2_cols = torch.tensor(_L2_COLS, device=self.device)  # (4,)
        # Nearly every window is one frame with the full left context and some lookahead (the steady
        # state, or a frame sent early for its deadline): with `compile` (GPU only) those shapes are
        # torch.compiled, one compile each. On GPU every shape of `graphed_shapes` runs as CUDA
        # graphs (one launch, no Python per kernel); other shapes (streams of one or two frames)
        # run eagerly.
        left, ahead = config.left_context_frames, config.lookahead_frames
        self._full_left = {(left + 1 + a, left, 1) for a in range(ahead + 1)}
        self._compiled = {s: self._compile(s) for s in self._full_left} if config.compile and gpu else {}
        self._graphs: dict[tuple[int, int, int], dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]]] = {}
        self._graph_inputs: dict[tuple[int, int, int], torch.Tensor] = {}  # shape -> (N, frames * 7 + 2) int64
        # host staging, reused by every launch (pinned on GPU: copies are asynchronous)
        rows = 2 * config.max_batch
        width = (left + 1 + ahead) * FRAME_TOKENS + 2  # the widest window of a live stream
        self._in_host = torch.zeros(rows * width, dtype=torch.int64, pin_memory=gpu)
        self._out_host = torch.zeros(rows * SAMPLES_PER_FRAME, dtype=torch.float32, pin_memory=gpu)
        self._in_used = self._out_used = 0
        self._inflight: DecodedAudio | None = None
        self._done = torch.cuda.Event() if gpu else None  # recorded after each launch (one is in flight at most)

    def _prepare(self, module: nn.Module, dtype: torch.dtype) -> nn.Module:
        """A private copy with weight norm folded into plain weights, in eval mode on our device."""
        module = copy.deepcopy(module)
        for m in list(module.modules()):
            if parametrize.is_parametrized(m):
                # not remove_parametrizations: it edits the class the caller's model shares
                weights = {name: getattr(m, name).detach().clone() for name in m.parametrizations}
                m.__class__ = parametrize.type_before_parametrizations(m)
                del m.parametrizations
                for name, w in weights.items():
                    m.register_parameter(name, nn.Parameter(w))
        return module.to(self.device, dtype).eval().requires_grad_(False)

    @staticmethod
    def _leaves(layers: list[nn.Module]) -> list[nn.Module]:
        return [m for layer in layers for m in layer.modules() if not list(m.children())]

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
        groups: dict[tuple[int, int, int], list[int]] = {}
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

    def warmup(self) -> None:
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
        pool = None
        cfg = self.config
        shapes = graphed_shapes(cfg.left_context_frames, cfg.lookahead_frames)
        todo = [(shape, b) for shape in shapes for b in self._graph_buckets(shape)[::-1]]  # largest first
        with torch.inference_mode(), torch.cuda.stream(self._stream):
            for shape, bucket in tqdm(todo, desc="SNAC CUDA graphs", unit="graph"):
                if shape not in self._graph_inputs:
                    width = shape[0] * FRAME_TOKENS + 2
                    self._graph_inputs[shape] = torch.zeros((bucket, width), dtype=torch.int64, device=self.device)
                packed = self._graph_inputs[shape][:bucket]  # (bucket, frames * 7 + 2)
                fn = self._decode_fn(shape)
                for _ in range(2):  # warm up (cuDNN plans, compile) outside the capture
                    fn(packed)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=self._stream, capture_error_mode="thread_local"):
                    out = fn(packed)  # (bucket, emit * 2048) float32
                pool = graph.pool()
                self._graphs.setdefault(shape, {})[bucket] = (graph, out)
        self._stream.synchronize()
        logger.info(f"{self}: captured {len(todo)} CUDA graphs of {len(shapes)} window shapes")

    def _graph_buckets(self, shape: tuple[int, int, int]) -> list[int]:
        """Graphed batches of `shape`: many for full left context, few for first frames and tails.

        Every stream has a window with the full left context per frame; few start or end at once.
        Compiled shapes start at 2: their code serves every batch but 1 (one window replays 2's graph).
        """
        full = shape in self._full_left
        buckets = _buckets(self.config.max_batch if full else min(self.config.max_batch, _EDGE_MAX_BATCH))
        return [b for b in buckets if b > 1 or shape not in self._compiled] or buckets

    def _run(self, windows: list[Window], shape: tuple[int, int, int]) -> torch.Tensor:
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
        b = len(windows)
        if self._in_used + b * width > self._in_host.numel():  # more windows than one step ever has
            if self._stream is not None:
                torch.cuda.current_stream(self.device).synchronize()  # the copies queued from it are done
            self._in_used = 0
        packed = self._in_host[self._in_used : self._in_used + b * width].view(b, width)  # (B, frames * 7 + 2)
        self._in_used += b * width
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

    def _decode_fn(self, shape: tuple[int, int, int]):
        """The decode of packed windows of `shape`: the compiled one if there is one, else the eager one."""
        return self._compiled.get(shape) or functools.partial(self._decode_packed, shape=shape)

    def _compile(self, shape: tuple[int, int, int]):
        """`_decode_packed` of `shape` torch.compiled for any batch size above 1 (no recompile per bucket).

        Only the batch is symbolic: the window's sizes stay constants (automatic dynamic shapes
        would turn them symbolic once a second shape compiles, which inductor cannot lower).
        """

        def decode(packed: torch.Tensor) -> torch.Tensor:
            return self._decode_packed(packed, shape=shape)

        compiled = torch.compile(decode)

        def run(packed: torch.Tensor) -> torch.Tensor:
            if packed.shape[0] > 1:
                torch._dynamo.mark_dynamic(packed, 0)  # one compile serves every batch size above 1
            with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
                return compiled(packed)

        return run

    def _decode_packed(self, packed: torch.Tensor, *, shape: tuple[int, int, int]) -> torch.Tensor:
        """Packed rows (B, frames * 7 + 2) of one window shape -> the emitted samples (B, emit * 2048) float32."""
        frames, left, emit = shape
        codes = packed[:, : frames * FRAME_TOKENS].reshape(-1, frames, FRAME_TOKENS)  # (B, F, 7)
        return self._decode_group(codes, packed[:, -2:-1], packed[:, -1:], left, emit).float()

    def _decode_group(
        self, codes: torch.Tensor, keys: torch.Tensor, starts: torch.Tensor, left: int, emit: int
    ) -> torch.Tensor:
        """Equal-shape windows (B, F, 7) -> the emitted samples (B, emit * 2048)."""
        b, f, _ = codes.shape
        l0 = codes[:, :, 0]  # (B, F)
        l1 = codes.index_select(2, self._l1_cols).reshape(b, 2 * f)  # (B, 2F)
        l2 = codes.index_select(2, self._l2_cols).reshape(b, 4 * f)  # (B, 4F)
        x = self._from_codes((l0, l1, l2)).to(self.dtype)  # (B, latent_dim, 4F)
        scale, rel = self.latents_per_frame, 0  # units per frame; window-relative offset of x[..., 0]
        for i, layer in enumerate(self._layers):
            if i not in self._blocks:
                x = _snake(x, layer.alpha) if isinstance(layer, Snake1d) else layer(x)
                continue
            x, scale, rel = self._block(i, layer, x, keys, starts, scale, rel)
            # keep the emitted frames plus what the later layers need of them
            lo = max(0, left * scale - self._margins[i] - rel)
            hi = min(x.shape[-1], (left + emit) * scale + self._margins[i] - rel)
            x, rel = x[..., lo:hi], rel + lo  # (B, C, hi - lo)
        a = left * SAMPLES_PER_FRAME - rel
        return x[:, 0, a : a + emit * SAMPLES_PER_FRAME]  # (B, emit * 2048)

    def _from_codes(self, codes: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """SNAC's `quantizer.from_codes`, graph-capturable: each code repeated `stride` times.

        SNAC's own uses `repeat_interleave`, whose host-side size computation breaks CUDA graph capture.
        """
        z = 0.0
        for quantizer, c in zip(self.quantizer.quantizers, codes, strict=True):
            z_i = quantizer.out_proj(quantizer.decode_code(c))  # (B, latent_dim, T_i)
            b, d, t = z_i.shape
            z = z + z_i[..., None].expand(b, d, t, quantizer.stride).reshape(b, d, t * quantizer.stride)
        return z  # (B, latent_dim, 4F)

    def _block(self, i: int, layer: nn.Module, x, keys, starts, scale: int, rel: int):
        """One SNAC DecoderBlock: Snake, ConvTranspose, seeded noise, residual units."""
        snake, up, *rest = layer.block
        x = up(_snake(x, snake.alpha))  # (B, C_out, T * stride)
        scale, rel = scale * up.stride[0], rel * up.stride[0]
        for m in rest:
            if isinstance(m, NoiseBlock):
                positions = starts * scale + rel + torch.arange(x.shape[-1], device=x.device)  # (B, T) absolute
                noise = hashed_normal(keys ^ hash32(i), positions).to(x.dtype)  # (B, T)
                x = x + noise[:, None, :] * m.linear(x)  # (B, C, T)
            else:  # ResidualUnit
                s1, conv1, s2, conv2 = m.block
                x = x + conv2(_snake(conv1(_snake(x, s1.alpha)), s2.alpha))  # (B, C, T)
        return x, scale, rel
