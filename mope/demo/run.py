"""`mope demo`: build (or reuse) the kit, REBEL-train the PCM on the 8 combinations, show what it learned."""

import json
import shutil
import time
from pathlib import Path

import torch

from mope.config import TrainConfig
from mope.demo.kit import KitPaths, KitRecipe, build_kit
from mope.demo.scorers import SCORERS
from mope.engine.sampling_params import SamplingParams
from mope.rewards import preference_rewards
from mope.trainer import Trainer

UNIFORM, BEST_EXPERT, PCM = "uniform", "best expert", "PCM"


def demo_config(kit: KitPaths, out_dir: str | Path, steps: int, seed: int, **overrides) -> TrainConfig:
    """The REBEL run of the demo: the kit's experts, its PCM backbone, the demo scorers as rewards."""
    settings = dict(
        experts=[str(p) for p in kit.experts],
        prompts=str(kit.train_prompts),
        rewards={code: {"type": "demo", "dimension": code} for code in SCORERS},
        output_dir=str(out_dir),
        pcm=str(kit.pcm_backbone),
        steps=steps,
        batch_size=16,
        epochs=2,
        lr=3e-3,
        eta=10.0,
        max_tokens=80,
        seed=seed,
        checkpoint_every=steps,
    )
    return TrainConfig(**{**settings, **overrides})


# what a demo run writes into its out_dir (the trainer's files and the results)
RUN_FILES = ("checkpoints", "config.json", "metrics.jsonl", "metrics.png", "demo_results.json")


def clear_previous_demo(out: Path) -> None:
    """Remove an earlier demo run's files from `out` (each demo is a fresh run); refuse a folder that holds
    another training run, whose checkpoints are not the demo's to delete."""
    if not (out / "checkpoints").exists():
        return
    try:
        rewards = json.loads((out / "config.json").read_text())["rewards"]
        is_demo = all(spec.get("type") == "demo" for spec in rewards.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        is_demo = False
    if not is_demo:
        raise ValueError(f"out_dir {out} holds another training run's checkpoints; choose another --out")
    print(f"replacing the previous demo run in {out}")
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def compare(trainer: Trainer, instructions: list[str], samples: int, seed: int) -> tuple[dict, dict]:
    """Mean reward per combination of uniform weights, the best single active expert and the PCM, on
    `samples` sampled responses (temperature 1) per instruction, each scored against the same reference
    as in training (the greedy uniform-weights response); and one (uniform, PCM) response pair each."""
    engine, registry, k = trainer.engine, trainer.registry, len(trainer.config.experts)
    preferences = registry.combinations()
    sampling = SamplingParams(temperature=1.0, max_tokens=trainer.config.max_tokens, seed=seed, n=samples)
    plain = [registry.format_prompt(x) for x in instructions]
    texts = lambda outs: [o.text for o in outs]
    per_expert = [
        texts(
            engine.generate(
                plain, weights=[[float(i == j) for i in range(k)]] * len(plain), sampling=sampling
            )
        )
        for j in range(k)
    ]
    prompts = [x for x in instructions for _ in range(samples)]
    results, examples = {}, {}
    for q in preferences:
        prefs = [q] * len(prompts)
        refs = trainer.references.get(prompts, prefs)
        reward = lambda responses, prefs=prefs, refs=refs: (
            preference_rewards(SCORERS, prompts, prefs, responses, refs)[0].mean().item()
        )
        mask = q.active_mask(trainer.config.experts)
        uniform = texts(
            engine.generate(plain, weights=[[m / sum(mask) for m in mask]] * len(plain), sampling=sampling)
        )
        pcm = texts(engine.generate(plain, preferences=[q.code] * len(plain), sampling=sampling))
        experts = {registry.dimensions[j].code: reward(per_expert[j]) for j in range(k) if mask[j]}
        best = max(experts, key=experts.get)
        results[q.code] = {
            UNIFORM: reward(uniform),
            BEST_EXPERT: experts[best],
            "best expert code": best,
            PCM: reward(pcm),
        }
        examples[q.code] = {"instruction": prompts[0], UNIFORM: uniform[0], PCM: pcm[0]}
    return results, examples


def format_results(results: dict) -> str:
    lines = [f"{'preference':<14}{UNIFORM:>10}{BEST_EXPERT:>18}{PCM:>8}"]
    for code, r in results.items():
        best = f"{r[BEST_EXPERT]:.3f} ({r['best expert code']})"
        lines.append(f"{code:<14}{r[UNIFORM]:>10.3f}{best:>18}{r[PCM]:>8.3f}")
    mean = {m: sum(r[m] for r in results.values()) / len(results) for m in (UNIFORM, BEST_EXPERT, PCM)}
    lines.append(f"{'mean':<14}{mean[UNIFORM]:>10.3f}{mean[BEST_EXPERT]:>18.3f}{mean[PCM]:>8.3f}")
    return "\n".join(lines)


def run_demo(
    steps: int = 40,
    out_dir: str | Path = "demo_out",
    kit_dir: str | Path | None = None,
    recipe: KitRecipe | None = None,
    eval_instructions: int = 8,
    eval_samples: int = 2,
    seed: int = 0,
    progress: bool = True,
    **train_overrides,
) -> dict:
    """Build or reuse the kit, REBEL-train the PCM for `steps` steps, compare it with uniform weights and
    the best single expert on `eval_instructions` held-out instructions (`eval_samples` responses each);
    print everything, with the time each phase took, and return the results."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if eval_samples < 1 or eval_instructions < 1:
        raise ValueError(
            f"eval_samples and eval_instructions must be >= 1, got {eval_samples}, {eval_instructions}"
        )
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {out} exists and is not a directory")
    try:  # before minutes of work, not after
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"out_dir {out} cannot be created: {e}") from e
    clear_previous_demo(out)
    torch.manual_seed(seed)
    clock = time.perf_counter()
    kit = build_kit(kit_dir, recipe, progress)
    print(f"demo kit: {kit.root} ({time.perf_counter() - clock:.0f} s)")
    clock = time.perf_counter()
    config = demo_config(kit, out_dir, steps, seed, progress=progress, **train_overrides)
    trainer = Trainer(config, scorers=SCORERS)
    trainer.train()
    print(f"REBEL: {steps} steps in {time.perf_counter() - clock:.0f} s")
    clock = time.perf_counter()
    instructions = [r["prompt"] for r in json.loads(kit.eval_prompts.read_text())][:eval_instructions]
    results, examples = compare(trainer, instructions, eval_samples, seed)
    print(f"comparison: {time.perf_counter() - clock:.0f} s")
    print(
        f"\nmean BT-normalised reward on {len(instructions)} held-out instructions "
        f"(x{eval_samples} samples, reference: greedy uniform weights)\n{format_results(results)}"
    )
    for code, ex in examples.items():
        print(f"\n[{code}] {ex['instruction']}\n  uniform: {ex[UNIFORM]}\n  PCM:     {ex[PCM]}")
    summary = {"kit": str(kit.root), "steps": steps, "results": results, "examples": examples}
    (out / "demo_results.json").write_text(json.dumps(summary, indent=2))
    print(f"\nmetrics: {out / 'metrics.jsonl'}\nplot:    {out / 'metrics.png'}")
    print(f"results: {out / 'demo_results.json'}")
    return summary
