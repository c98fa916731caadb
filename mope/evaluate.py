"""Evaluation: mean BT-normalised reward per preference combination of the PCM and the baselines."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from importlib import resources

import torch

from mope.engine.sampling_params import SamplingParams
from mope.preferences import Preference
from mope.rewards import RewardModel, preference_rewards

PCM_METHOD = "MoPE (PCM)"
UNIFORM_METHOD = "MPD (Uniform)"


def koala_prompts() -> list[str]:
    """The packaged Koala 50 evaluation prompts (see mope/data/README.md for the source and terms)."""
    data = json.loads(resources.files("mope").joinpath("data/koala_eval_50.json").read_text())
    return [r["prompt"] for r in data]


def evaluate(engine, scorers: Mapping[str, RewardModel], prompts: Sequence[str],
             preferences: Sequence[Preference], reference: str = "uniform",
             references: Mapping[str, str] | None = None, prompting_expert: int = 0,
             max_tokens: int = 128, progress: bool = False) -> dict:
    """Greedy responses of every method to every (prompt, preference), scored against a reference.

    Methods: the engine's PCM (when it has one), uniform weights over the active experts, each single
    expert, and preference prompting of expert ``prompting_expert`` (the preference prompts in its prompt).
    ``reference`` is "uniform" (the uniform-weights response) or "field" (``references[prompt]``).
    Returns {"results": {preference: {method: reward}}, "mean": {method: reward}, ...}. ``progress``: a
    bar per method's generation.
    """
    if not prompts or not preferences:
        raise ValueError("evaluate needs at least one prompt and one preference")
    k, names = engine.num_experts, [str(p) for p in engine.expert_paths]
    if not 0 <= prompting_expert < k:
        raise ValueError(f"prompting_expert must be in [0, {k}), got {prompting_expert}")
    if reference == "field" and (references is None or any(p not in references for p in prompts)):
        raise ValueError("reference 'field' needs a reference response for every prompt")
    registry = engine.registry
    pairs = [(p, q) for q in preferences for p in prompts]
    plain = [registry.format_prompt(p) for p, _ in pairs]
    masks = [q.active_mask(names) for _, q in pairs]
    greedy = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    run = lambda texts, **mix: [o.text for o in
                                engine.generate(texts, sampling=greedy, progress=progress, **mix)]
    one_hot = lambda j: [[float(i == j) for i in range(k)] for _ in pairs]

    responses = {UNIFORM_METHOD: run(plain, weights=[[m / sum(mask) for m in mask] for mask in masks])}
    if getattr(engine.provider, "model", None) is not None:
        responses[PCM_METHOD] = run(plain, preferences=[q.code for _, q in pairs])
    for j in range(k):
        responses[f"expert {j}"] = run(plain, weights=one_hot(j))
    prompted = [registry.format_prompt(p, q) for p, q in pairs]
    responses[f"prompting (expert {prompting_expert})"] = run(prompted, weights=one_hot(prompting_expert))

    refs = responses[UNIFORM_METHOD] if reference == "uniform" else [references[p] for p, _ in pairs]
    instructions, prefs = [p for p, _ in pairs], [q for _, q in pairs]
    results: dict[str, dict[str, float]] = {q.code: {} for q in preferences}
    means = {}
    for method, texts in responses.items():
        rewards, _ = preference_rewards(scorers, instructions, prefs, texts, refs)
        per_pref = rewards.view(len(preferences), len(prompts)).mean(1)
        for q, r in zip(preferences, per_pref.tolist(), strict=True):
            results[q.code][method] = r
        means[method] = float(torch.nanmean(rewards))
    return {"prompts": len(prompts), "reference": reference, "experts": names,
            "methods": list(responses), "results": results, "mean": means}


def format_table(report: dict) -> str:
    """The report as a plain-text table: one row per preference, one column per method."""
    methods = report["methods"]
    width = max(14, *(len(m) for m in methods))
    header = f"{'preference':<14}" + "".join(f"{m:>{width + 2}}" for m in methods)
    rows = [header, "-" * len(header)]
    for code, values in [*report["results"].items(), ("mean", report["mean"])]:
        rows.append(f"{code:<14}" + "".join(f"{values[m]:>{width + 2}.3f}" for m in methods))
    return "\n".join(rows)
