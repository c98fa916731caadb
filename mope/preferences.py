"""Preference dimensions, composite preferences and the prompt format.

A *dimension* (P1A, "elementary", ...) has an axis, a prompt text and the expert that serves it.
A *preference* is at most one dimension per axis ("P1A,P2B,P3A" or "elementary,informative,friendly").
Experts read the plain instruction in the prompt format; the PCM reads it with the preference prompts.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

INSTRUCTION_SLOT = "{instruction}"
PREFERENCE_SLOT = "{preference prompts joined by spaces}"


@dataclass(frozen=True)
class Dimension:
    """One preference dimension; ``expert`` is an index into the engine's experts or an expert's name."""

    code: str
    axis: str
    name: str
    prompt: str
    expert: int | str


class PreferenceRegistry:
    """Dimensions by code and by name, and the prompt format both experts and the PCM read."""

    def __init__(self, dimensions: Iterable[Dimension] = (), prompt_format: str | None = None):
        fmt = prompt_format if prompt_format is not None else default_registry().prompt_format
        if INSTRUCTION_SLOT not in fmt or PREFERENCE_SLOT not in fmt:
            raise ValueError(f"prompt_format must contain {INSTRUCTION_SLOT} and {PREFERENCE_SLOT}: {fmt!r}")
        if fmt.index(INSTRUCTION_SLOT) > fmt.index(PREFERENCE_SLOT):
            raise ValueError("prompt_format must put {instruction} before the preference prompts")
        self.prompt_format = fmt
        self._by_key: dict[str, Dimension] = {}
        self.dimensions: list[Dimension] = []
        for dim in dimensions:
            self.register(dim)

    def register(self, dim: Dimension) -> None:
        """Add a dimension; its code and name must both be new."""
        for key in (dim.code, dim.name):
            if not key or "," in key:
                raise ValueError(f"dimension code/name must be non-empty without commas: {key!r}")
            if key.lower() in self._by_key:
                raise ValueError(f"dimension {key!r} is already registered")
        if not isinstance(dim.expert, int | str) or (isinstance(dim.expert, int) and dim.expert < 0):
            raise ValueError(f"dimension {dim.code}: expert must be an index >= 0 or a name: {dim.expert!r}")
        self._by_key[dim.code.lower()] = dim
        self._by_key[dim.name.lower()] = dim
        self.dimensions.append(dim)

    def get(self, key: str) -> Dimension:
        dim = self._by_key.get(key.strip().lower())
        if dim is None:
            valid = ", ".join(f"{d.code} ({d.name})" for d in self.dimensions)
            raise ValueError(f"unknown preference dimension {key.strip()!r}; valid: {valid}")
        return dim

    def axes(self) -> list[str]:
        return list(dict.fromkeys(d.axis for d in self.dimensions))

    def combinations(self) -> list[Preference]:
        """Every preference with exactly one dimension per axis (the paper's 8 combinations)."""
        per_axis = [[d for d in self.dimensions if d.axis == axis] for axis in self.axes()]
        return [Preference(tuple(dims), self) for dims in itertools.product(*per_axis)]

    def _split_format(self) -> tuple[str, str, str]:
        fmt = self.prompt_format
        i, j = fmt.index(INSTRUCTION_SLOT), fmt.index(PREFERENCE_SLOT)
        return fmt[:i], fmt[i + len(INSTRUCTION_SLOT) : j], fmt[j + len(PREFERENCE_SLOT) :]

    def format_prompt(self, instruction: str, preference: Preference | None = None) -> str:
        """The instruction in the prompt format, with the preference prompts when given."""
        prefix, between, suffix = self._split_format()
        prefs = preference.prompt_text() if preference is not None else ""
        return prefix + instruction + (between + prefs if prefs else "") + suffix

    def instruction_of(self, prompt: str) -> str:
        """Inverse of ``format_prompt(instruction)``; a prompt not in the format is the instruction itself."""
        prefix, _, suffix = self._split_format()
        if len(prompt) >= len(prefix) + len(suffix) and prompt.startswith(prefix) and prompt.endswith(suffix):
            return prompt[len(prefix) : len(prompt) - len(suffix)]
        return prompt

    def parse(self, text: str | Preference) -> Preference:
        return Preference.parse(text, self)


@dataclass(frozen=True)
class Preference:
    """A composite preference: at most one dimension per axis."""

    dimensions: tuple[Dimension, ...]
    registry: PreferenceRegistry

    @classmethod
    def parse(cls, text: str | Preference, registry: PreferenceRegistry | None = None) -> Preference:
        """Parse "P1A,P2B,P3A" or "elementary,informative,friendly" (codes and names may be mixed)."""
        if isinstance(text, Preference):
            return text
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"preference must be a non-empty string like 'P1A,P2B,P3A', got {text!r}")
        registry = registry or default_registry()
        dims = tuple(registry.get(part) for part in text.split(","))
        seen: dict[str, str] = {}
        for dim in dims:
            if dim.axis in seen:
                raise ValueError(f"preference {text!r} has two dimensions of axis {dim.axis!r}: "
                                 f"{seen[dim.axis]} and {dim.code}")
            seen[dim.axis] = dim.code
        return cls(dims, registry)

    @property
    def code(self) -> str:
        return ",".join(d.code for d in self.dimensions)

    def __str__(self) -> str:
        return self.code

    def prompt_text(self) -> str:
        return " ".join(d.prompt for d in self.dimensions)

    def expert_indices(self, experts: int | Sequence[str]) -> list[int]:
        """Indices of the experts serving this preference; ``experts`` is K or the experts' names/paths."""
        names = [str(e) for e in experts] if not isinstance(experts, int) else None
        k = experts if names is None else len(names)
        indices = []
        for dim in self.dimensions:
            if isinstance(dim.expert, int):
                index = dim.expert
            elif names is not None and dim.expert in names:
                index = names.index(dim.expert)
            else:
                stems = [Path(n).name for n in names] if names is not None else []
                if dim.expert not in stems:
                    raise ValueError(f"dimension {dim.code}: no expert named {dim.expert!r} among {names}")
                index = stems.index(dim.expert)
            if index >= k:
                raise ValueError(f"dimension {dim.code} is served by expert {index}, "
                                 f"but there are only {k} experts")
            indices.append(index)
        return indices

    def active_mask(self, experts: int | Sequence[str]) -> list[bool]:
        """(K,) mask of the experts this preference activates."""
        k = experts if isinstance(experts, int) else len(experts)
        active = set(self.expert_indices(experts))
        return [i in active for i in range(k)]


def load_registry(source: str | Path | dict) -> PreferenceRegistry:
    """A registry from a preferences.json file (or its parsed dict); experts default to 0..n-1 in order."""
    data = source
    if not isinstance(source, dict):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"preferences file not found: {path}")
        data = json.loads(path.read_text())
    if "dimensions" not in data or "prompt_format" not in data:
        raise ValueError("preferences data must have 'dimensions' and 'prompt_format'")
    dims = [
        Dimension(code, d["axis"], d["name"], d["prompt"], d.get("expert", i))
        for i, (code, d) in enumerate(data["dimensions"].items())
    ]
    return PreferenceRegistry(dims, data["prompt_format"])


_DEFAULT: PreferenceRegistry | None = None


def default_registry() -> PreferenceRegistry:
    """The packaged dimensions P1A..P3B (experts 0..5); shared, so registrations are seen everywhere."""
    global _DEFAULT
    if _DEFAULT is None:
        text = resources.files("mope").joinpath("data/preferences.json").read_text()
        _DEFAULT = load_registry(json.loads(text))
    return _DEFAULT
