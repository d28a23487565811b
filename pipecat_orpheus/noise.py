"""Counter-based random numbers: pure functions of (request key, position), for the GPU.

Both the sampler (Gumbel noise per token) and the codec (SNAC's noise per sample) need noise
that depends only on a request's seed and an absolute position, never on batching, slot or
window: a seeded request is then reproducible whatever else runs beside it, and nothing is
drawn from a stateful generator inside a CUDA graph.
"""

from __future__ import annotations

import torch

M32 = 0xFFFFFFFF  # the hash works on 32-bit words held in int64 (no overflow, no unsigned dtype)


def _mul32(x: torch.Tensor | int, c: int) -> torch.Tensor | int:
    """(x * c) mod 2**32 for x < 2**32 without int64 overflow: c split into 16-bit halves."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & M32


def hash32(x: torch.Tensor | int) -> torch.Tensor | int:
    """Chris Wellons' lowbias32 integer hash; works on Python ints and int64 tensors alike."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def noise_key(seed: int) -> int:
    """The 32-bit noise key of a request seed (any non-negative int)."""
    return hash32(hash32(seed & M32) ^ ((seed >> 32) & M32))


def uniform24(h: torch.Tensor) -> torch.Tensor:
    """Hashed words (int64 in [0, 2**32)) -> float32 uniforms in (0, 1), 24 exact bits."""
    return ((h >> 8).float() + 0.5) / 2**24
