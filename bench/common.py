"""What the benches share: the copy bandwidth their floors are measured against, and the random real-size models.

Only torch and numpy at import time, so `bench.experiments.gemv` runs without the package's dependencies.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

REAL_LLAMA = dict(
    hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
    head_dim=128,
)  # fmt: skip
REAL_SNAC = dict(
    sampling_rate=24000, encoder_dim=48, encoder_rates=[2, 4, 8, 8], decoder_dim=1024, decoder_rates=[8, 8, 4, 2],
    attn_window_size=None, codebook_size=4096, codebook_dim=8, vq_strides=[4, 2, 1], noise=True, depthwise=True,
)  # fmt: skip


def command_line() -> str:
    """The command that started this process as it is typed: `python3 -m bench.<part>.<module> ...`."""
    spec = sys.modules["__main__"].__spec__
    return " ".join(["python3", f"-m {spec.name}" if spec else sys.argv[0], *sys.argv[1:]])


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus written."""
    if device.type != "cuda":
        return float("nan")
    x = torch.empty(2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    sync(device)
    return 2 * 10 * x.numel() / (start.elapsed_time(end) / 1e3)


def build(tiny: bool, device, dtype):
    """The random Orpheus-shaped LLM (real sizes unless `tiny`), its tokenizer and a random SNAC."""
    from snac import SNAC
    from transformers import AutoTokenizer, LlamaForCausalLM

    from pipecat_orpheus import format as fmt
    from pipecat_orpheus.testing import make_tiny_tokenizer, tiny_llama_config, tiny_snac_config

    cfg = tiny_llama_config(**({} if tiny else REAL_LLAMA))
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            llm = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    llm.generation_config.eos_token_id = fmt.END_OF_SPEECH
    tok_dir = Path(tempfile.mkdtemp()) / "tok"
    make_tiny_tokenizer(tok_dir)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    snac = SNAC(**(tiny_snac_config() if tiny else REAL_SNAC)).to(device).eval()
    return llm, tokenizer, snac
