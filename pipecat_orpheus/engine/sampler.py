"""Batched GPU sampling of audio tokens: a pure function of device tensors, no host sync.

The LM head computes logits only for the 7 * 4096 audio rows plus END_OF_SPEECH ("head rows").
At frame position k a row may only emit one of the 4096 tokens of codebook position k, or
END_OF_SPEECH when k == 0 (a frame boundary) and `min_tokens` are done, so the sampler works on a
(B, 4097) window gathered per row. Per-row temperature, top-p, repetition penalty and seed are
tensors, so one CUDA graph serves any mix of requests. The multinomial draw is the Gumbel-max
trick with noise hashed from (seed, token index, column): reproducible per request whatever the
batch, and no generator state to carry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipecat_orpheus.format import AUDIO_TOKEN_END, AUDIO_TOKEN_OFFSET, CODEBOOK_SIZE, END_OF_SPEECH, FRAME_TOKENS
from pipecat_orpheus.noise import M32, hash32, uniform24

N_AUDIO_ROWS = AUDIO_TOKEN_END - AUDIO_TOKEN_OFFSET  # 28672 = 7 positions * 4096 codes
N_HEAD_ROWS = N_AUDIO_ROWS + 1  # + END_OF_SPEECH, the last head row
EOS_ROW = N_AUDIO_ROWS  # head-row index of END_OF_SPEECH
WINDOW = CODEBOOK_SIZE + 1  # a row's allowed choices: its codebook position's 4096 codes + END_OF_SPEECH


def head_token_ids() -> torch.Tensor:
    """Vocabulary ids of the head rows, in head order: (N_HEAD_ROWS,) int64."""
    audio = torch.arange(AUDIO_TOKEN_OFFSET, AUDIO_TOKEN_END, dtype=torch.int64)  # (28672,)
    return torch.cat([audio, torch.tensor([END_OF_SPEECH])])  # (28673,)


@dataclass(frozen=True, slots=True)
class SamplingRows:
    """Per-row sampling inputs of one batch, all (B,) device tensors."""

    temperature: torch.Tensor  # float32; 0 = greedy
    top_p: torch.Tensor  # float32 in (0, 1]
    repetition_penalty: torch.Tensor  # float32 >= 1
    noise_key: torch.Tensor  # int64 in [0, 2**32): the request's seed, hashed
    noise_step: torch.Tensor  # int64: tokens the request generated before (over every piece)
    num_generated: int | torch.Tensor  # int64: audio tokens of the current piece so far (gives frame position)
    min_tokens: torch.Tensor  # int64: END_OF_SPEECH masked below this many


@dataclass(frozen=True, slots=True)
class Sampled:
    """A sampled token per row: its vocabulary id and its head-row index (for the presence mask)."""

    token_ids: torch.Tensor  # (B,) int64
    head_rows: torch.Tensor  # (B,) int64


def gumbel_noise(noise_key: torch.Tensor, noise_step: torch.Tensor, width: int) -> torch.Tensor:
    """Gumbel(0, 1) noise, a pure function of (key, step, column): (B, width) float32."""
    cols = torch.arange(width, device=noise_key.device)  # (width,)
    counter = (noise_step[:, None] * width + cols[None, :]) & M32  # (B, width)
    u = uniform24(hash32(noise_key[:, None] ^ hash32(counter)))  # (B, width) in (0, 1)
    return -torch.log(-torch.log(u))


def apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Transformers' RepetitionPenaltyLogitsProcessor with a per-row penalty over `seen` tokens."""
    p = penalty[:, None]  # (B, 1)
    penalized = torch.where(scores < 0, scores * p, scores / p)  # (B, W)
    return torch.where(seen, penalized, scores)


def apply_top_p(scores: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Transformers' TopPLogitsWarper with a per-row top_p: the nucleus kept, the rest -inf."""
    sorted_scores, order = torch.sort(scores, descending=False, dim=-1)  # (B, W) ascending
    cum_probs = sorted_scores.softmax(dim=-1).cumsum(dim=-1)  # (B, W)
    remove = cum_probs <= (1 - top_p[:, None])  # (B, W)
    remove[:, -1] = False  # always keep the most likely token
    remove = remove.scatter(1, order, remove)  # (B, W) back in column order
    return scores.masked_fill(remove, -float("inf"))


def sample(logits: torch.Tensor, seen: torch.Tensor, rows: SamplingRows) -> Sampled:
    """Sample one audio token (or END_OF_SPEECH) per row from head-row `logits`.

    Args:
        logits: (B, >= N_HEAD_ROWS) float32 head-row logits (columns past N_HEAD_ROWS are padding).
        seen: (B, N_HEAD_ROWS) bool, head rows this request already generated in this piece.
        rows: per-row sampling inputs.
    """
    frame_pos = torch.as_tensor(rows.num_generated, device=logits.device) % FRAME_TOKENS  # (B,)
    codes = torch.arange(CODEBOOK_SIZE, device=logits.device)  # (4096,)
    audio_cols = frame_pos[:, None] * CODEBOOK_SIZE + codes[None, :]  # (B, 4096) head rows of this position
    eos_col = torch.full_like(frame_pos[:, None], EOS_ROW)  # (B, 1)
    cols = torch.cat([audio_cols, eos_col], dim=1)  # (B, WINDOW)
    scores = logits.gather(1, cols)  # (B, WINDOW)
    eos_ok = (frame_pos == 0) & (torch.as_tensor(rows.num_generated, device=logits.device) >= rows.min_tokens)  # (B,)
    scores[:, -1] = torch.where(eos_ok, scores[:, -1], -float("inf"))
    scores = apply_repetition_penalty(scores, seen.gather(1, cols), rows.repetition_penalty)  # (B, WINDOW)

    greedy = rows.temperature == 0  # (B,)
    greedy_choice = scores.argmax(dim=-1)  # (B,)
    temperature = torch.where(greedy, torch.ones_like(rows.temperature), rows.temperature)  # (B,)
    warped = apply_top_p(scores / temperature[:, None], rows.top_p)  # (B, WINDOW)
    noisy = warped + gumbel_noise(rows.noise_key, rows.noise_step, WINDOW)  # (B, WINDOW)
    choice = torch.where(greedy, greedy_choice, noisy.argmax(dim=-1))  # (B,) window column

    head_rows = cols.gather(1, choice[:, None])[:, 0]  # (B,)
    is_eos = head_rows == EOS_ROW  # (B,)
    token_ids = torch.where(is_eos, END_OF_SPEECH, AUDIO_TOKEN_OFFSET + head_rows)  # (B,)
    return Sampled(token_ids, head_rows)
