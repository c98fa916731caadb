"""The kit check: each expert's mean score on every dimension, on instructions kept out of training.

Responses are sampled (temperature 1, seeded) with transformers' own `generate`, independently of
the engine, so the table vouches for the experts themselves (LoRA adapters over the base, by
train_lm.load_lm, which needs no peft).
"""

import json

import torch
from transformers import AutoTokenizer

from mope.demo.corpus import expert_prompt
from mope.demo.kit import KitPaths
from mope.demo.scorers import SCORERS
from mope.demo.train_lm import load_lm
from mope.preferences import default_registry


@torch.inference_mode()
def sample_responses(
    model_dir, instructions: list[str], samples: int, max_new_tokens: int, seed: int
) -> list[str]:
    """`samples` responses per instruction from one checkpoint or LoRA adapter (temperature 1), decoded
    without specials."""
    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = load_lm(model_dir)
    batch = tok(
        [expert_prompt(x) for x in instructions for _ in range(samples)], return_tensors="pt", padding=True
    )
    torch.manual_seed(seed)
    out = model.generate(
        **batch,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_new_tokens=max_new_tokens,
        pad_token_id=tok.pad_token_id,
    )
    return tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def expert_table(
    kit: KitPaths, samples: int = 2, max_new_tokens: int = 96, seed: int = 0, limit: int | None = None
) -> dict:
    """{expert code: {dimension code: mean score}} over the kit's (first `limit`) held-out instructions."""
    if samples < 1 or (limit is not None and limit < 1):
        raise ValueError(f"samples and limit must be >= 1, got {samples}, {limit}")
    instructions = [r["prompt"] for r in json.loads(kit.eval_prompts.read_text())][:limit]
    table = {}
    for dim, path in zip(default_registry().dimensions, kit.experts, strict=True):
        responses = sample_responses(path, instructions, samples, max_new_tokens, seed)
        prompts = [""] * len(responses)
        table[dim.code] = {
            code: scorer.score(prompts, responses).mean().item() for code, scorer in SCORERS.items()
        }
    return table


def format_expert_table(table: dict) -> str:
    """Rows: experts; columns: dimensions; * marks the best expert of each column."""
    codes = list(SCORERS)
    best = {c: max(table, key=lambda e: table[e][c]) for c in codes}
    lines = ["expert \\ score " + "".join(f"{c:>9}" for c in codes)]
    for expert, row in table.items():
        cells = "".join(f"{row[c]:>8.2f}{'*' if best[c] == expert else ' '}" for c in codes)
        lines.append(f"{expert:<15}{cells}")
    return "\n".join(lines)
