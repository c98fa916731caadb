"""REBEL training benchmark: our trainer against the naive REBEL step, side by side in one run.

`ours`: mope.trainer.Trainer — rollout through the engine (the pair's prompt blocks shared, K experts and
the PCM over one paged KV pool, fused mix-and-sample), update recomputing only the PCM teacher-forced and
reusing the experts' token log-probs recorded at rollout. `naive`: bench/baselines/naive_rebel.py — the
HF loop for rollouts and a full forward of every expert in the update. Same K random experts, the same
PCM (backbone + head), P prompts x 2 responses, `--new-tokens` each, `--epochs` optimiser epochs. Steps
run interleaved (ours, naive, ours, ...) after one warm-up step each; medians are reported.

    python bench/train.py                  # 3 llama-160m experts and a llama-160m PCM, 4 pairs, 32 tokens
    python bench/train.py --pcm-shape small   # the paper's proportions: a PCM much smaller than the experts
    python bench/train.py --smoke          # tiny shape, 1 pair, 4 tokens: a fast check that it all runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.baselines.hf_loop import LoopPCM  # noqa: E402
from bench.baselines.naive_rebel import naive_rebel_step  # noqa: E402
from bench.kernels import int_at_least, usable_device  # noqa: E402
from bench.shapes import SHAPES, Shape, make_random_checkpoint  # noqa: E402

PROMPTS = ["Explain why the sky is blue.", "Write a short poem about the sea and the wind.",
           "How do I sort a list in Python?", "Give three tips for a job interview.",
           "What is the capital of France, and why?", "Summarise the plot of Hamlet in two lines."]
KEYWORDS = {"P1A": "a", "P1B": "e", "P2A": "i", "P2B": "o", "P3A": "s", "P3B": "t"}
# each axis served by one expert: every composite preference activates all three
EXPERT_OF = {"P1A": 0, "P1B": 0, "P2A": 1, "P2B": 1, "P3A": 2, "P3B": 2}
PCM_SEED = 100
# The paper's PCM (160M) is ~44x smaller than its 7B experts; "small" keeps a PCM much smaller than the
# llama-160m experts (3.2M decoder parameters against 85M, the same 32000-token vocabulary).
PCM_SHAPES = {"small": Shape(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=4, intermediate_size=688, vocab_size=32000)}


def write_inputs(work: Path) -> tuple[Path, Path]:
    """The prompt file (with a reference field) and a registry mapping the six dimensions onto 3 experts."""
    from importlib import resources

    data = json.loads(resources.files("mope").joinpath("data/preferences.json").read_text())
    for code, dim in data["dimensions"].items():
        # one-word preference prompts: the naive loop's PCM reads the experts' prompt (hf_loop feeds every
        # model the same ids), so ours reads nearly the same number of tokens
        dim["expert"], dim["prompt"] = EXPERT_OF[code], f"{dim['name'].capitalize()}."
    (work / "preferences.json").write_text(json.dumps(data))
    records = [{"prompt": p, "ref": "a reference answer"} for p in PROMPTS]
    (work / "prompts.json").write_text(json.dumps(records))
    return work / "prompts.json", work / "preferences.json"


def kv_blocks(args, block_size: int = 16) -> int:
    """KV blocks for a step's 2 * pairs sequences, 4 tracks each (3 experts and the PCM; prompts are
    < 128 tokens of the character-level tokenizer)."""
    per_track = -(-(128 + args.new_tokens) // block_size)
    return 4 * per_track * 2 * args.pairs


def make_ours(args, experts: list[Path], pcm_dir: Path, work: Path):
    from mope.config import TrainConfig
    from mope.trainer import Trainer

    prompts, registry = write_inputs(work)
    config = TrainConfig(
        experts=[str(e) for e in experts], prompts=str(prompts), output_dir=str(work / "run"),
        pcm=str(pcm_dir),
        rewards={code: {"type": "keywords", "words": [w]} for code, w in KEYWORDS.items()},
        preferences_file=str(registry), reference="field:ref", steps=args.steps + 1, batch_size=args.pairs,
        epochs=args.epochs, max_tokens=args.new_tokens, lr=1e-5, schedule="constant", seed=PCM_SEED,
        device=args.device, dtype=args.dtype, plot=False, progress=False, num_kv_blocks=kv_blocks(args))
    return Trainer(config)


def make_naive(args, experts: list[Path], pcm_dir: Path, head: torch.nn.Linear):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, args.dtype)
    load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device)
    models = [load(e).eval() for e in experts]
    pcm = LoopPCM(load(pcm_dir).train(), head)
    params = [p for p in [*pcm.model.parameters(), *head.parameters()] if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(experts[0])
    from mope.preferences import default_registry
    from mope.rewards import keyword_scorer

    scorers = [keyword_scorer([w]) for w in list(KEYWORDS.values())[::2]]

    def rewards(responses: list[list[int]]) -> torch.Tensor:
        texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
        return torch.stack([s.score(texts, texts) for s in scorers]).sigmoid().mean(0)

    ids = [tokenizer(default_registry().format_prompt(p)).input_ids for p in PROMPTS]  # what our experts read
    return models, pcm, optimizer, rewards, ids


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-160m", choices=sorted(SHAPES),
                        help="experts' and PCM's shape")
    parser.add_argument("--pcm-shape", default="same", choices=["same", *PCM_SHAPES],
                        help="the PCM's shape: the experts' (same) or a smaller one")
    parser.add_argument("--pairs", type=int_at_least(1), default=4,
                        help="(prompt, preference) pairs per step")
    parser.add_argument("--new-tokens", type=int_at_least(1), default=32, help="tokens per response")
    parser.add_argument("--epochs", type=int_at_least(1), default=2, help="optimiser epochs per step")
    parser.add_argument("--steps", type=int_at_least(1), default=3,
                        help="timed steps per provider (after a warm-up)")
    parser.add_argument("--device", type=usable_device, default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/mope-bench"), help="random checkpoints")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shape, 1 pair, 4 tokens, 1 epoch, 1 step (overrides --shape, --pcm-shape, "
                        "--pairs, --new-tokens, --epochs, --steps)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.shape, args.pcm_shape = "tiny", "same"
        args.pairs, args.new_tokens, args.epochs, args.steps = 1, 4, 1, 1
    torch.manual_seed(0)
    experts = [make_random_checkpoint(args.cache_dir / args.shape / f"expert{i}", args.shape, seed=i)
               for i in range(3)]
    pcm_shape = args.shape if args.pcm_shape == "same" else PCM_SHAPES[args.pcm_shape]
    pcm_dir = make_random_checkpoint(args.cache_dir / args.shape / f"pcm-{args.pcm_shape}", pcm_shape,
                                     seed=PCM_SEED)

    with tempfile.TemporaryDirectory() as work:
        ours = make_ours(args, experts, pcm_dir, Path(work))
        head = torch.nn.Linear(ours.pcm.head.in_features, 3).to(ours.pcm.head.weight)
        head.load_state_dict(ours.pcm.head.state_dict())
        models, loop_pcm, optimizer, rewards, ids = make_naive(args, experts, pcm_dir, head)
        generator = torch.Generator(device=args.device).manual_seed(0)

        def ours_step(step: int) -> dict:
            start = time.perf_counter()
            rollout = ours.rollout(ours.batch(step), step)
            rolled = time.perf_counter()
            ours.update(rollout, ours.rewards(rollout)[0])
            return {"rollout_s": rolled - start, "update_s": time.perf_counter() - rolled,
                    "tokens": sum(rollout.lengths)}

        def naive_step(step: int) -> dict:
            prompts = [ids[(step * args.pairs + i) % len(ids)] for i in range(args.pairs)]
            return naive_rebel_step(models, loop_pcm, optimizer, prompts, rewards,
                                    max_new_tokens=args.new_tokens, epochs=args.epochs, generator=generator)

        runs: dict[str, list[dict]] = {"ours": [], "naive": []}
        for step in range(args.steps + 1):  # step 0 is the warm-up
            for name, fn in (("ours", ours_step), ("naive", naive_step)):
                record = fn(step + 1)
                if step:
                    runs[name].append(record)
    print(f"REBEL step: 3 {args.shape} experts + PCM ({args.pcm_shape}), {args.pairs} pairs x 2 responses x "
          f"{args.new_tokens} tokens, {args.epochs} epochs, {args.device} {args.dtype}, "
          f"median of {args.steps} steps\n")
    print("| provider | rollout tok/s | update tok/s | steps/s | step speedup |")
    print("| --- | ---: | ---: | ---: | ---: |")
    rates = {}
    for name, records in runs.items():
        tokens, rollout_s, update_s = (statistics.median(r[key] for r in records)
                                       for key in ("tokens", "rollout_s", "update_s"))
        rates[name] = (tokens / rollout_s, tokens * args.epochs / update_s,
                       1 / statistics.median(r["rollout_s"] + r["update_s"] for r in records))
    for name, (roll, upd, steps) in rates.items():
        print(f"| {name} | {roll:.1f} | {upd:.1f} | {steps:.4f} | {steps / rates['naive'][2]:.2f}x |")


if __name__ == "__main__":
    main()
