"""How far bf16 is from fp32 on the Orpheus-3B-shaped random model, for transformers and for the engine.

`bench.engine.run` finds the engine's greedy bf16 tokens equal to transformers' bf16 reference at
only part of the positions (first-step logits ~4% apart). This measures what bf16 alone does to
the same model: transformers bf16 vs transformers fp32 (first-step logits, greedy match rate),
next to the engine's bf16 forward vs fp32. If transformers' own bf16 is as far from fp32 as the
engine is, the mismatch is bf16 on random weights (near-ties everywhere), not a kernel bug.

  python3 -m bench.engine.numerics --out bench/results/numerics_h100.json     # GPU
  python3 -m bench.engine.numerics --tiny --out /tmp/numerics.json           # quick CPU check
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from bench.common import build, command_line
from bench.engine.correctness import (
    correctness,
    engine_first_logits,
    first_difference,
    hf_first_logits,
    relative_error,
)
from pipecat_orpheus import format as fmt
from pipecat_orpheus.engine import SamplingParams
from pipecat_orpheus.engine.model import OrpheusLM
from pipecat_orpheus.reference import generate_tokens

TEXTS = ["Hello there, how are you?", "The quick brown fox.", "One more sentence to check."]


def match(got: list[list[int]], ref: list[list[int]]) -> dict:
    same = sum(sum(x == y for x, y in zip(g, r, strict=False)) for g, r in zip(got, ref, strict=True))
    total = sum(len(r) for r in ref)
    return {
        "position_match_rate": same / max(total, 1),
        "matching_prefix_tokens": [first_difference(g, r) for g, r in zip(got, ref, strict=True)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default="bench/results/numerics_h100.json")
    ap.add_argument("--check-tokens", type=int, default=35)
    args = ap.parse_args()
    args.check_prompts = len(TEXTS)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    llm, tokenizer, _ = build(args.tiny, device, dtype)
    llm32 = copy.deepcopy(llm).float()
    prompts = [fmt.build_prompt(tokenizer, t, "tara") for t in TEXTS]
    greedy = SamplingParams(temperature=0.0, repetition_penalty=1.1, max_tokens=args.check_tokens)

    logits = {"hf_bf16_vs_fp32": [], "engine_bf16_vs_fp32": [], "engine_bf16_vs_hf_bf16": []}
    for p in prompts:
        exact, hf = hf_first_logits(llm32, p, device), hf_first_logits(llm, p, device)
        ours = engine_first_logits(OrpheusLM(llm, max_positions=256), p, device)
        logits["hf_bf16_vs_fp32"].append(relative_error(hf, exact))
        logits["engine_bf16_vs_fp32"].append(relative_error(ours, exact))
        logits["engine_bf16_vs_hf_bf16"].append(relative_error(ours, hf))
    ref32 = [list(generate_tokens(llm32, p, greedy)) for p in prompts]
    ref16 = [list(generate_tokens(llm, p, greedy)) for p in prompts]
    del llm32
    engine_vs_fp32, _ = correctness(llm, tokenizer, device, args, "auto", ref32)
    result = {
        "command": command_line(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "first_step_logits_rel_err": {k: sum(v) / len(v) for k, v in logits.items()},
        "greedy_hf_bf16_vs_hf_fp32": match(ref16, ref32),
        "greedy_engine_bf16_vs_hf_fp32": {
            k: engine_vs_fp32[k] for k in ("position_match_rate", "matching_prefix_tokens")
        },
        "tokens_per_prompt": args.check_tokens,
        "prompts": len(prompts),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
