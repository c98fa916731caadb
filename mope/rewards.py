"""Reward models, Bradley-Terry normalisation and the reward of a response under a preference.

A reward model scores (prompt, response) pairs: ``score(prompts, responses) -> Tensor (N,)``. Two kinds
ship: Hugging Face sequence-classification models (``HFRewardModel``) and rule-based scorers, built from a
spec ``{"type": name, ...kwargs}`` through a registry that users (and the demo) extend with
``register_scorer``. Rule-based scorers:

- ``length``: ``per_word * number of words`` (``per_word < 0`` prefers concise answers).
- ``keywords``: ``per_hit * occurrences`` of any of ``words`` (case-insensitive).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from mope.kernels.validate import describe
from mope.preferences import Preference


@runtime_checkable
class RewardModel(Protocol):
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> Tensor:
        """(N,) fp32 scores of the responses to the prompts; higher is better."""
        ...


def bt_normalize(r: Tensor, r_ref: Tensor) -> Tensor:
    """Bradley-Terry probability that the response beats the reference: sigmoid(r - r_ref)."""
    return torch.sigmoid(r - r_ref)


class HFRewardModel:
    """A local ``AutoModelForSequenceClassification`` (one output) scoring ``prompt + response``, batched."""

    def __init__(self, path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 batch_size: int = 16, max_length: int | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"reward model directory {path} has no config.json")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, local_files_only=True, dtype=dtype).to(device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward model {path} must have one output (num_labels=1), "
                             f"has {self.model.config.num_labels}")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        limits = [getattr(self.model.config, "max_position_embeddings", None), max_length,
                  self.tokenizer.model_max_length if self.tokenizer.model_max_length < 1e9 else None]
        self.max_length = min(n for n in limits if n)
        self.batch_size, self.device = batch_size, device

    @torch.inference_mode()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> Tensor:
        _check_lengths(prompts, responses)
        texts = [p + r for p, r in zip(prompts, responses, strict=True)]
        scores = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[i : i + self.batch_size], return_tensors="pt", padding=True,
                                   truncation=True, max_length=self.max_length).to(self.device)
            scores.append(self.model(**batch).logits[:, 0].float().cpu())
        return torch.cat(scores) if scores else torch.zeros(0)


class RuleScorer:
    """A rule-based reward model from a plain function ``(prompt, response) -> float``."""

    def __init__(self, fn: Callable[[str, str], float]):
        self.fn = fn

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> Tensor:
        _check_lengths(prompts, responses)
        return torch.tensor([float(self.fn(p, r)) for p, r in zip(prompts, responses, strict=True)])


def length_scorer(per_word: float = -1.0) -> RuleScorer:
    return RuleScorer(lambda _prompt, response: per_word * len(response.split()))


def keyword_scorer(words: Sequence[str], per_hit: float = 1.0) -> RuleScorer:
    if isinstance(words, str) or not words or not all(isinstance(w, str) and w for w in words):
        raise ValueError(f"keyword_scorer needs a non-empty list of non-empty words, got {words!r}")
    pattern = re.compile("|".join(re.escape(w) for w in words), re.IGNORECASE)
    return RuleScorer(lambda _prompt, response: per_hit * len(pattern.findall(response)))


SCORERS: dict[str, Callable[..., RewardModel]] = {
    "hf": HFRewardModel,
    "length": length_scorer,
    "keywords": keyword_scorer,
}


def register_scorer(name: str, factory: Callable[..., RewardModel]) -> None:
    """Make ``{"type": name, **kwargs}`` build ``factory(**kwargs)`` in reward specs."""
    if not name or not callable(factory):
        raise ValueError(f"register_scorer needs a name and a callable factory, got {name!r}, {factory!r}")
    SCORERS[name] = factory


def build_reward_model(spec: Mapping | RewardModel) -> RewardModel:
    """A reward model from ``{"type": "hf", "path": ...}``, ``{"type": "length", "per_word": -1}``, ...
    (or an object that already has ``score``)."""
    if isinstance(spec, RewardModel):
        return spec
    if not isinstance(spec, Mapping) or "type" not in spec:
        raise ValueError(f"a reward spec must be a mapping with a 'type', got {spec!r}")
    kwargs = {k: v for k, v in spec.items() if k != "type"}
    if spec["type"] not in SCORERS:
        raise ValueError(f"unknown reward type {spec['type']!r}; registered: {', '.join(sorted(SCORERS))}")
    try:
        return SCORERS[spec["type"]](**kwargs)
    except TypeError as e:
        raise ValueError(f"bad arguments for reward type {spec['type']!r}: {e}") from e


def preference_rewards(scorers: Mapping[str, RewardModel], prompts: Sequence[str],
                       preferences: Sequence[Preference], responses: Sequence[str],
                       references: Sequence[str]) -> tuple[Tensor, dict[str, Tensor]]:
    """Reward of each response: the mean over its preference's dimensions of bt_normalize(score, score of
    the reference). Returns (N,) rewards and, per dimension code, the (M,) BT scores of the rows that have it.
    """
    n = len(prompts)
    if not len(preferences) == len(responses) == len(references) == n:
        raise ValueError("prompts, preferences, responses and references must have one length")
    total, count = torch.zeros(n), torch.zeros(n)
    per_dim: dict[str, Tensor] = {}
    codes = dict.fromkeys(d.code for p in preferences for d in p.dimensions)
    for code in codes:
        if code not in scorers:
            raise ValueError(f"no reward model for dimension {code}; have: {', '.join(sorted(scorers))}")
        rows = [i for i, p in enumerate(preferences) if any(d.code == code for d in p.dimensions)]
        ps = [prompts[i] for i in rows]
        name = f"the reward model of {code} ({type(scorers[code]).__name__})"
        try:
            s = scorers[code].score(ps + ps, [responses[i] for i in rows] + [references[i] for i in rows])
        except Exception as e:
            e.add_note(f"raised by {name}")
            raise
        if not isinstance(s, Tensor) or s.shape != (2 * len(rows),):
            raise ValueError(f"{name} must return a ({2 * len(rows)},) tensor, one score per response, "
                             f"got {describe(s)}")
        s = s.float()
        bt = bt_normalize(s[: len(rows)], s[len(rows) :])
        total[rows] += bt
        count[rows] += 1
        per_dim[code] = bt
    if (count == 0).any():
        raise ValueError("every preference needs at least one dimension")
    return total / count, per_dim


class FieldReferences:
    """Reference responses taken from a field of the prompt records."""

    def __init__(self, records: Sequence[Mapping], field: str):
        missing = [i for i, r in enumerate(records) if field not in r]
        if missing:
            raise ValueError(f"reference field {field!r} missing in prompt records {missing[:5]}")
        not_text = [i for i, r in enumerate(records) if not isinstance(r[field], str)]
        if not_text:
            raise ValueError(f"reference field {field!r} is not a string in prompt records {not_text[:5]}")
        self.by_prompt: dict[str, str] = {}
        for i, r in enumerate(records):
            if self.by_prompt.setdefault(r["prompt"], r[field]) != r[field]:
                raise ValueError(f"prompt record {i} repeats an earlier prompt with another {field!r}")

    def get(self, prompts: Sequence[str], preferences: Sequence[Preference]) -> list[str]:
        return [self.by_prompt[p] for p in prompts]


class CachedReferences:
    """Reference responses generated once per (prompt, preference) by ``generate`` (e.g. greedy decoding
    with uniform weights over the active experts), then cached."""

    def __init__(self, generate: Callable[[list[str], list[Preference]], list[str]]):
        self.generate = generate
        self.cache: dict[tuple[str, str], str] = {}

    def get(self, prompts: Sequence[str], preferences: Sequence[Preference]) -> list[str]:
        keys = [(p, q.code) for p, q in zip(prompts, preferences, strict=True)]
        todo = list(dict.fromkeys(k for k in keys if k not in self.cache))
        if todo:
            by_code = {q.code: q for q in preferences}
            texts = self.generate([p for p, _ in todo], [by_code[c] for _, c in todo])
            self.cache.update(zip(todo, texts, strict=True))
        return [self.cache[k] for k in keys]


def _check_lengths(prompts: Sequence[str], responses: Sequence[str]) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"prompts ({len(prompts)}) and responses ({len(responses)}) must have one length")
