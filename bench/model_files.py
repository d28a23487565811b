"""The random real-size models written in the real on-disk format, for benches that load through the loader.

A server whose engine runs in its own process (`engine.core_process`) cannot be handed a model
built in memory: the core loads `model.llm` and `model.codec` itself. `write_random_models`
saves the random Orpheus-3B-shaped Llama (safetensors), the Orpheus tokenizer layout and a
real-size SNAC where the loader expects them; the compute is the real models', the sound is noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bench.common import REAL_SNAC, build


def write_random_models(root: Path | str, *, tiny: bool = False, device: str = "cuda") -> dict[str, object]:
    """Write `root/llm` and `root/snac` once; returns the config overrides that point at them."""
    from pipecat_orpheus.testing import make_tiny_model, make_tiny_tokenizer

    root = Path(root)
    if tiny:
        make_tiny_model(root)
    elif not (root / "llm" / "config.json").exists():
        llm, _, snac = build(False, torch.device(device), torch.bfloat16)
        llm.save_pretrained(root / "llm", safe_serialization=True)
        make_tiny_tokenizer(root / "llm")
        (root / "snac").mkdir(parents=True, exist_ok=True)
        (root / "snac" / "config.json").write_text(json.dumps(REAL_SNAC))
        torch.save(snac.state_dict(), root / "snac" / "pytorch_model.bin")
        del llm, snac
        torch.cuda.empty_cache()
    paths = {"model.llm": str(root / "llm"), "model.codec": str(root / "snac")}
    return paths | ({"engine.busy_below_speed": 0.0} if tiny else {})  # CPU checks admit what they ask for
