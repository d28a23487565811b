"""The SNAC 24 kHz decoder as pure math over the loaded modules: seeded noise, cropped windows.

SNAC's `NoiseBlock` draws fresh `torch.randn` at every call, so two decodes of the same codes
differ. Here the decoder runs functionally over the loaded modules with the noise replaced by
a counter-based hash of (request key, block, absolute position): noise no longer depends on
batching or windowing, a seeded request is reproducible, and streamed audio can be compared
with an offline decode sample by sample. The decoder is cropped after every upsampling block
to the emitted frames plus the receptive field of the layers left: the same samples for much
less work at the high-rate layers. No CUDA graphs, staging or compile here (`runtime.py`).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from snac.layers import DecoderBlock, NoiseBlock, Snake1d
from torch import nn
from torch.nn.utils import parametrize

from pipecat_orpheus.errors import ModelLoadError
from pipecat_orpheus.format import FRAME_TOKENS, L1_POSITIONS, L2_POSITIONS, SAMPLES_PER_FRAME
from pipecat_orpheus.noise import hash32, uniform24

WindowShape = tuple[int, int, int]  # (frames, left context frames, emitted frames)


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


def _leaves(layers: list[nn.Module]) -> list[nn.Module]:
    return [m for layer in layers for m in layer.modules() if not list(m.children())]


class SnacDecoder:
    """A private, weight-norm-folded copy of a loaded `snac.SNAC`'s quantizer and decoder.

    Args:
        snac_model: a loaded `snac.SNAC` (left untouched).
        device: where the copy lives.
        dtype: the decoder's dtype (the quantizer stays float32).
    """

    def __init__(self, snac_model: nn.Module, device: torch.device, dtype: torch.dtype):
        strides = list(getattr(snac_model, "vq_strides", []))
        hop = int(np.prod(snac_model.decoder_rates))
        if SAMPLES_PER_FRAME % hop or strides != [SAMPLES_PER_FRAME // hop // 2**i for i in range(3)]:
            raise ModelLoadError(f"SNAC model with vq_strides {strides} and hop {hop} is not the 24 kHz Orpheus codec")
        if getattr(snac_model, "attn_window_size", None) is not None:
            raise ModelLoadError("SNAC models with local attention cannot be decoded in windows")
        self.device, self.dtype = device, dtype
        self.latents_per_frame = SAMPLES_PER_FRAME // hop  # 4: one L0 code per frame
        self.quantizer = self._prepare(snac_model.quantizer, torch.float32)
        self.decoder = self._prepare(snac_model.decoder, dtype)
        self._layers = list(self.decoder.model)
        blocks = [i for i, m in enumerate(self._layers) if isinstance(m, DecoderBlock)]
        self._blocks = set(blocks)
        # crop margin after block i, in that block's output samples: the receptive field of what follows
        self._margins = {i: _receptive_margin(_leaves(self._layers[i + 1 :])) + 1 for i in blocks}
        # frame positions on the device: a Python list index would be a host-to-device copy per call
        self._l1_positions = torch.tensor(L1_POSITIONS, device=device)  # (2,)
        self._l2_positions = torch.tensor(L2_POSITIONS, device=device)  # (4,)

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

    def decode_packed(self, packed: torch.Tensor, *, shape: WindowShape) -> torch.Tensor:
        """Packed rows (B, frames * 7 + 2) of one window shape -> the emitted samples (B, emit * 2048) float32.

        A row is the window's codes in frame order, then its noise key and its first absolute frame.
        """
        frames, left, emit = shape
        codes = packed[:, : frames * FRAME_TOKENS].reshape(-1, frames, FRAME_TOKENS)  # (B, F, 7)
        return self._decode_group(codes, packed[:, -2:-1], packed[:, -1:], left, emit).float()

    def _decode_group(
        self, codes: torch.Tensor, keys: torch.Tensor, starts: torch.Tensor, left: int, emit: int
    ) -> torch.Tensor:
        """Equal-shape windows (B, F, 7) -> the emitted samples (B, emit * 2048)."""
        b, f, _ = codes.shape
        l0 = codes[:, :, 0]  # (B, F)
        l1 = codes.index_select(2, self._l1_positions).reshape(b, 2 * f)  # (B, 2F)
        l2 = codes.index_select(2, self._l2_positions).reshape(b, 4 * f)  # (B, 4F)
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
